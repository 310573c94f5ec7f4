"""Run a training script with one instrument attached (used by the tests as a subprocess, under any launcher).

python instrumented_run.py --kill-after-checkpoint[=N] SCRIPT [ARGS...]  # SIGKILL right after the N-th (first)
                                                                         # checkpoint is complete
python instrumented_run.py --kill-before-rename[=N] SCRIPT [ARGS...]     # SIGKILL once the N-th (first) checkpoint's
                                                                         # temporary folder is written, before it is
                                                                         # renamed into place and older ones pruned
python instrumented_run.py --dump-weights DIR SCRIPT [ARGS...]           # each rank writes its final weights to DIR
python instrumented_run.py --fsdp-on-cpu SCRIPT [ARGS...]                 # Accelerate's FSDP on CPU (gloo), under
                                                                         # `accelerate launch --config_file fsdp.yaml`
"""

import os
import runpy
import signal
import sys

import accelerate
from safetensors.torch import save_file

from diffusers_stages.training import loop


def kill_after(function, count: int):
    """``function(accelerator, ...)``, which kills every process (a real, abrupt SIGKILL, once all of them got there)
    right after its ``count``-th call returns: nothing after that point runs."""
    calls = []

    def call_then_die(accelerator, *args, **kwargs):
        result = function(accelerator, *args, **kwargs)
        calls.append(args)
        if len(calls) == count:
            accelerator.wait_for_everyone()
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    return call_then_die


mode, _, ordinal = sys.argv[1].partition("=")
if mode == "--kill-after-checkpoint":
    loop.save_checkpoint = kill_after(loop.save_checkpoint, int(ordinal or 1))
    script_args = sys.argv[2:]
elif mode == "--kill-before-rename":
    # `save_checkpoint` has `save_state` write the temporary folder, then marks it complete, renames it and prunes
    accelerate.Accelerator.save_state = kill_after(accelerate.Accelerator.save_state, int(ordinal or 1))
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
elif mode == "--fsdp-on-cpu":
    # Accelerate enables FSDP on GPUs only: switch it on after the Accelerator is built, as it does there
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    init = accelerate.Accelerator.__init__

    def init_sharded(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the launch's FSDP_* settings

    accelerate.Accelerator.__init__ = init_sharded
    script_args = sys.argv[2:]
else:
    raise SystemExit(f"unknown mode {mode!r}")
sys.argv = script_args
runpy.run_path(script_args[0], run_name="__main__")
