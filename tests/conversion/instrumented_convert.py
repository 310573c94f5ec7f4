"""Run a conversion script killed at its most dangerous point (used by the tests as a subprocess).

python instrumented_convert.py --kill-after-retire NAME [ARGS...]  # `diffusers_stages.conversion.NAME`, SIGKILLed
                                                                   # once --overwrite moved the old output aside,
                                                                   # before the new one is renamed into place
"""

import os
import runpy
import signal
import sys

from diffusers_stages.conversion import common

mode, name = sys.argv[1], sys.argv[2]
if mode != "--kill-after-retire":
    raise SystemExit(f"unknown mode {mode!r}")
retire = common._retire


def retire_then_die(output_path, locks):
    retire(output_path, locks)
    os.kill(os.getpid(), signal.SIGKILL)  # a real, abrupt kill: the new output is never renamed into place


common._retire = retire_then_die
sys.argv = [name, *sys.argv[3:]]
runpy.run_module(f"diffusers_stages.conversion.{name}", run_name="__main__")
