"""Loading's memory: `realign_storage` copies a loaded model to aligned storage without doubling its memory."""

import subprocess
import sys

import pytest
import torch

from diffusers_stages import MultiStageUNet2DModel
from diffusers_stages.models.loading import realign_storage

PEAK = """
import resource, sys
from diffusers_stages import MultiStageUNet2DModel
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = MultiStageUNet2DModel.from_pretrained(sys.argv[1])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024 / sum(p.numel() * p.element_size() for p in model.parameters()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak resident memory of a process")
def test_loading_peaks_at_the_parameters_plus_one_tensor(tmp_path):
    torch.manual_seed(0)
    model = MultiStageUNet2DModel(  # 80 MB of parameters, in tensors of at most 2.4 MB
        sample_size=8, block_out_channels=(128, 256), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=2, norm_num_groups=8,
    )  # fmt: skip
    model.save_pretrained(tmp_path)
    growth = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path)], capture_output=True, text=True, check=True)
    # before: every mapped page read stayed resident until the last copy, twice the parameters (2.0)
    assert float(growth.stdout.split()[-1]) < 1.3


def test_realigned_tensors_keep_their_values_and_unaligned_ones_are_copied():
    base = torch.arange(40.0)
    module = torch.nn.Linear(3, 3)
    module.weight.data = base[1:10].reshape(3, 3)  # 4 bytes past an aligned address
    weight, bias = module.weight.detach().clone(), module.bias.data_ptr()
    realign_storage(module)
    assert module.weight.data_ptr() % 64 == 0 and torch.equal(module.weight, weight)
    assert bias % 64 or module.bias.data_ptr() == bias  # an aligned tensor is left where it is
