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


@pytest.mark.parametrize("conditional", [True, False], ids=["UNet2DConditionModel", "UNet2DModel"])
def test_the_staged_model_is_built_in_the_source_dtype_without_a_random_float32_copy(tiny_cond_unet, conditional,
                                                                                      monkeypatch):  # fmt: skip
    # was built on the CPU in float32 with random weights, then filled and cast: for SDXL's U-Net with three stages
    # about 22 GB of host memory (and its random initialisation) before a bfloat16 model on the GPU
    from diffusers_stages import MultiStageUNet2DConditionModel

    unet = (tiny_cond_unet(0) if conditional else UNet2DModel(**TINY_UNET)).to(torch.bfloat16)
    staged_class = MultiStageUNet2DConditionModel if conditional else MultiStageUNet2DModel
    initialised, init = [], torch.nn.init.kaiming_uniform_

    def record(*args, **kwargs):
        initialised.append((args[0] if args else kwargs["tensor"]).device.type)
        return init(*args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", record)
    staged = staged_class.from_unet(unet, stage_boundaries=(500,))
    assert initialised and set(initialised) == {"meta"}  # no random weights in real memory
    assert {p.dtype for p in staged.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in staged.parameters()} == {"cpu"}
    source = unet.state_dict()
    for key, value in staged.state_dict().items():  # the source's weights, each decoder its own copy
        name = key.split(".", 2)[2] if key.startswith("decoders.") else key
        assert torch.equal(value, source[name]), key
    first, second = staged.decoders[0].conv_out.weight, staged.decoders[1].conv_out.weight
    assert first.data_ptr() != second.data_ptr() and first.data_ptr() != unet.conv_out.weight.data_ptr()


@pytest.mark.parametrize("conditional", [True, False], ids=["UNet2DConditionModel", "UNet2DModel"])
def test_a_source_whose_weights_are_not_in_memory_is_refused(tiny_cond_unet, conditional):
    # built on the meta device and filled from the source, a source on the meta device (`init_empty_weights`, a
    # `device_map` offload, `enable_sequential_cpu_offload`) gave a staged model without weights, silently
    from accelerate import cpu_offload

    from diffusers_stages import MultiStageUNet2DConditionModel

    unet = tiny_cond_unet(0) if conditional else UNet2DModel(**TINY_UNET)
    staged_class = MultiStageUNet2DConditionModel if conditional else MultiStageUNet2DModel
    cpu_offload(unet, execution_device="cpu")  # what `enable_sequential_cpu_offload` does to a pipeline's unet
    with pytest.raises(ValueError, match=r"`unet` has weights on the meta device \('conv_in.weight'"):
        staged_class.from_unet(unet, stage_boundaries=(500,))


def test_a_source_offloaded_to_disk_is_refused_not_copied_as_placeholders(tmp_path):
    # group offloading to disk keeps the weights in its files and leaves uninitialised placeholders in the modules:
    # `from_unet` copied those into every stage, silently (what `save_pretrained` already refuses)
    unet = UNet2DModel(**TINY_UNET).eval()
    unet.enable_group_offload(torch.device("cpu"), offload_type="leaf_level", offload_to_disk_path=str(tmp_path))
    with pytest.raises(
        ValueError, match=r"`from_unet` cannot copy `unet`: group offloading to disk .*offload_to_disk"
    ):
        MultiStageUNet2DModel.from_unet(unet, stage_boundaries=(500,))
