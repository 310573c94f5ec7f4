import pytest
import torch
from diffusers import UNet2DModel

from diffusers_stages import MultiStageUNet2DModel
from tests.conftest import TINY_UNET


@pytest.mark.parametrize("bad", [0, 0.0])
def test_a_schedule_length_of_zero_is_refused_not_replaced(bad):
    unet = UNet2DModel(**TINY_UNET)
    with pytest.raises(ValueError, match=f"`num_train_timesteps` must be a positive integer, got {bad}"):
        MultiStageUNet2DModel.from_unet(unet, stage_boundaries=(300,), num_train_timesteps=bad)


@pytest.mark.parametrize("steps", [500, 2000])
def test_a_learned_time_embedding_keeps_its_table_length(steps):
    torch.manual_seed(0)
    unet = UNet2DModel(**TINY_UNET, time_embedding_type="learned", num_train_timesteps=1000).eval()
    with pytest.raises(ValueError, match=rf"`num_train_timesteps`={steps} differs from the source.s 1000.*learned"):
        MultiStageUNet2DModel.from_unet(unet, stage_boundaries=(300,), num_train_timesteps=steps)
    staged = MultiStageUNet2DModel.from_unet(unet, stage_boundaries=(300,), num_train_timesteps=1000).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.allclose(staged(x, t).sample, unet(x, t).sample, atol=1e-5)


def test_config_keys_the_source_class_ignores_are_left_out(tiny_cond_unet):
    """A config key diffusers ignored when it built the source (a folder of another diffusers version) is not
    passed on to the staged class, where it was a TypeError."""
    from diffusers_stages import MultiStageUNet2DConditionModel

    unet = tiny_cond_unet(0)
    unet.register_to_config(an_option_of_another_version=3)
    staged = MultiStageUNet2DConditionModel.from_unet(unet, stage_boundaries=(500,))
    assert "an_option_of_another_version" not in staged.config
    plain = UNet2DModel(**TINY_UNET)
    plain.register_to_config(an_option_of_another_version=3)
    assert "an_option_of_another_version" not in MultiStageUNet2DModel.from_unet(plain, stage_boundaries=(500,)).config
