"""Run a training script with one instrument attached (used by the tests as a subprocess, under any launcher).

python instrumented_run.py --kill-after-checkpoint SCRIPT [ARGS...]   # SIGKILL right after the first checkpoint
python instrumented_run.py --dump-weights DIR SCRIPT [ARGS...]        # each rank writes its final weights to DIR
"""

import os
import runpy
import signal
import sys

import accelerate
from safetensors.torch import save_file

mode = sys.argv[1]
if mode == "--kill-after-checkpoint":
    save_state = accelerate.Accelerator.save_state

    def save_then_die(self, *args, **kwargs):
        save_state(self, *args, **kwargs)
        self.wait_for_everyone()
        os.kill(os.getpid(), signal.SIGKILL)  # a real, abrupt kill: nothing after the checkpoint runs

    accelerate.Accelerator.save_state = save_then_die
    script_args = sys.argv[2:]
elif mode == "--dump-weights":
    folder = sys.argv[2]
    end_training = accelerate.Accelerator.end_training

    def dump_then_end(self):
        for i, model in enumerate(self._models):
            state = {k: v.detach().cpu().contiguous() for k, v in self.unwrap_model(model).state_dict().items()}
            save_file(state, os.path.join(folder, f"rank{self.process_index}_model{i}.safetensors"))
        end_training(self)

    accelerate.Accelerator.end_training = dump_then_end
    script_args = sys.argv[3:]
else:
    raise SystemExit(f"unknown mode {mode!r}")
sys.argv = script_args
runpy.run_path(script_args[0], run_name="__main__")
