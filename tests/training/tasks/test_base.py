"""`noise_schedulers`: the schedulers of a run, from the arguments or from a fine-tuned folder's scheduler config."""

import pytest

from diffusers_stages.training import build_parser
from diffusers_stages.training.tasks.base import noise_schedulers


@pytest.mark.parametrize(
    "config",
    [
        {"num_train_timesteps": "1000", "beta_schedule": "scaled_linear"},
        {"beta_schedule": "nonsense"},
        {"_class_name": "EDMEulerScheduler", "sigma_min": "x"},
    ],
)
def test_a_source_scheduler_config_of_wrong_values_is_named(tmp_path, config):
    # read from a folder: before, a string step count was a TypeError from inside `torch.linspace`
    args = build_parser("train_experts.py").parse_args([])
    args.pretrained_model_name_or_path = "src"  # an option of the scripts' own
    source = {"_class_name": "DDIMScheduler", **config}
    with pytest.raises(
        ValueError, match="`--pretrained_model_name_or_path` 'src': its scheduler config does not build"
    ):
        noise_schedulers(args, source)
