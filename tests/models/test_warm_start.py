import pytest
from diffusers import UNet2DModel

from diffusers_stages import MultiStageUNet2DModel
from tests.conftest import TINY_UNET


@pytest.mark.parametrize("bad", [0, 0.0])
def test_a_schedule_length_of_zero_is_refused_not_replaced(bad):
    unet = UNet2DModel(**TINY_UNET)
    with pytest.raises(ValueError, match=f"`num_train_timesteps` must be a positive integer, got {bad}"):
        MultiStageUNet2DModel.from_unet(unet, stage_boundaries=(300,), num_train_timesteps=bad)
