"""LoRA on the staged text-to-image U-Nets: `pipe.load_lora_weights` with a LoRA made for the source
`UNet2DConditionModel` (down/mid keys to the shared encoder, up-path keys to every decoder; every expert of an
`ExpertRoutingModel`), a LoRA saved from the staged model itself, and diffusers' adapter switches."""

import copy

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from diffusers_stages import ExpertRoutingModel, MultiStageUNet2DConditionModel
from tests.pipelines.conftest import SD_BOUNDARIES as BOUNDARIES

peft = pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _images(pipe, steps: int = 3, **kwargs) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        "a cat",
        num_inference_steps=steps,
        guidance_scale=5.0,
        generator=torch.manual_seed(0),
        output_type="np",
        **kwargs,
    ).images


def _add_lora(model, seed: int = 0, name: str = "default", **config):
    """A non-trivial LoRA (random ``lora_B``, alpha != rank) on ``model``'s attention projections (or ``config``'s
    ``target_modules``)."""
    torch.manual_seed(seed)
    config = {"target_modules": TARGETS, **config}
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **config), name)
    return model


def _save_lora(model, folder, metadata: bool = True, pipeline_class=StableDiffusionPipeline, name: str = "default"):
    """``model``'s adapter ``name`` as diffusers' training scripts save it (``pytorch_lora_weights.safetensors``)."""
    kwargs = {"unet_lora_adapter_metadata": model.peft_config[name].to_dict()} if metadata else {}
    layers = get_peft_model_state_dict(model, adapter_name=name)
    pipeline_class.save_lora_weights(str(folder), unet_lora_layers=layers, **kwargs)
    return str(folder)


def _source_lora(unet, folder, seed: int = 0, metadata: bool = True, pipeline_class=StableDiffusionPipeline) -> str:
    """A LoRA made for ``unet`` (a copy: ``unet`` itself is left plain), saved in ``folder``."""
    return _save_lora(_add_lora(copy.deepcopy(unet), seed), folder, metadata, pipeline_class)


def _lora_layers(model) -> dict:
    return {name: module for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}


@pytest.mark.parametrize("metadata", [True, False], ids=["metadata", "no-metadata"])
@pytest.mark.parametrize("as_dict", [False, True], ids=["folder", "state-dict"])
def test_source_lora_on_the_staged_pipeline_gives_the_source_images(source_and_staged, tmp_path, metadata, as_dict):
    source, staged = source_and_staged
    plain = _images(source)
    folder = _source_lora(source.unet, tmp_path, metadata=metadata)
    lora = folder
    if as_dict:
        lora, _ = StableDiffusionPipeline.lora_state_dict(folder)
    source.load_lora_weights(lora if not as_dict else dict(lora))
    staged.load_lora_weights(lora)
    with_lora = _images(source)
    assert np.abs(with_lora - plain).max() > 1e-2  # the LoRA changes the images
    assert np.abs(_images(staged) - with_lora).max() < 1e-5

    # down/mid keys went to the encoder, the up path's to every decoder, each with its own copy of the adapter
    layers = _lora_layers(staged.unet)
    source_layers = _lora_layers(source.unet)
    up = [name for name in source_layers if name.startswith("up_blocks.")]
    assert up and all(f"decoders.{s}.{name}" in layers for s in range(3) for name in up)
    assert all(name in layers for name in source_layers if not name.startswith("up_blocks."))
    assert len(layers) == len(source_layers) + 2 * len(up)
    weights = [layers[f"decoders.{s}.{up[0]}"].lora_A["default_0"].weight for s in range(3)]
    assert weights[0].data_ptr() != weights[1].data_ptr() and torch.equal(weights[0], weights[1])
    assert staged.get_list_adapters() == {"unet": ["default_0"]}


def test_source_lora_on_a_staged_sdxl_pipeline(tiny_sdxl_components, tmp_path):
    source = StableDiffusionXLPipeline(**tiny_sdxl_components)
    staged = StableDiffusionXLPipeline(**dict(tiny_sdxl_components, unet=copy.deepcopy(source.unet)))
    staged.unet = MultiStageUNet2DConditionModel.from_unet(staged.unet, stage_boundaries=BOUNDARIES)
    folder = _source_lora(source.unet, tmp_path, pipeline_class=StableDiffusionXLPipeline)
    source.load_lora_weights(folder)
    staged.load_lora_weights(folder)
    assert np.abs(_images(staged) - _images(source)).max() < 1e-5


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
def test_a_lora_scale_in_cross_attention_kwargs_acts_as_on_the_source(
    tiny_sd_components, tiny_sdxl_components, tmp_path, sdxl
):
    # `pipe(..., cross_attention_kwargs={"scale": s})` scales the LoRA for one call (the U-Net's `apply_lora_scale`),
    # in the shared encoder and the decoder that runs alike, and leaves it at 1 afterwards
    pipeline_class = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    components = tiny_sdxl_components if sdxl else tiny_sd_components
    source = pipeline_class(**components)
    staged = pipeline_class(**dict(components, unet=copy.deepcopy(source.unet)))
    staged.unet = MultiStageUNet2DConditionModel.from_unet(staged.unet, stage_boundaries=BOUNDARIES)
    plain = _images(source)
    folder = _source_lora(source.unet, tmp_path, pipeline_class=pipeline_class)
    for pipe in (source, staged):
        pipe.load_lora_weights(folder)
    full = _images(source)
    for scale in (0.0, 0.5):
        expected = _images(source, cross_attention_kwargs={"scale": scale})
        assert np.abs(_images(staged, cross_attention_kwargs={"scale": scale}) - expected).max() < 1e-5
        assert np.abs(expected - full).max() > 1e-3  # the scale acted
    assert np.abs(expected - plain).max() > 1e-3 and np.abs(_images(staged) - full).max() < 1e-5


def test_adapter_switches_act_on_the_staged_pipeline_as_on_the_source(source_and_staged, tmp_path):
    source, staged = source_and_staged
    plain = _images(source)
    first = _source_lora(source.unet, tmp_path / "a", seed=1)
    second = _source_lora(source.unet, tmp_path / "b", seed=2)
    for pipe in (source, staged):
        pipe.load_lora_weights(first, adapter_name="a")
        pipe.load_lora_weights(second, adapter_name="b")

    def same() -> np.ndarray:
        images = _images(staged)
        assert np.abs(images - _images(source)).max() < 1e-5
        return images

    both = same()
    for pipe in (source, staged):
        pipe.set_adapters(["a", "b"], adapter_weights=[0.5, 1.5])
    assert np.abs(same() - both).max() > 1e-3
    for pipe in (source, staged):  # block-wise scales, as diffusers' UNet2DConditionModel takes them
        pipe.set_adapters("a", adapter_weights={"unet": {"down": 0.5, "mid": 0.0, "up": {"block_0": 2.0}}})
    same()
    for pipe in (source, staged):
        pipe.set_adapters(["a", "b"])
        pipe.disable_lora()
    assert np.abs(same() - plain).max() < 1e-5
    for pipe in (source, staged):
        pipe.enable_lora()
        pipe.fuse_lora(components=["unet"], lora_scale=0.7)
    fused = same()
    assert all(layer.merged for layer in _lora_layers(staged.unet).values())
    for pipe in (source, staged):
        pipe.unfuse_lora(components=["unet"])
        pipe.delete_adapters("a")
    assert np.abs(same() - fused).max() > 1e-3
    assert staged.get_list_adapters() == {"unet": ["b"]}
    for pipe in (source, staged):
        pipe.unload_lora_weights()
    assert np.abs(same() - plain).max() < 1e-5
    assert not _lora_layers(staged.unet)


def test_block_wise_scales_reach_the_decoders_resnet_layers_as_the_source_s(source_and_staged, tmp_path):
    # diffusers' `set_adapters` gives a LoRA layer outside the attentions (`up_blocks.{i}.resnets.{j}.conv1`) the scale
    # of `up_blocks.{i}.attentions.{j}`, reading the first parts of its name; a decoder's layer (`decoders.{s}.up_blocks
    # ...`) took 1.0 instead, so the up path's resnet LoRA ignored the scale
    source, staged = source_and_staged
    folder = _save_lora(
        _add_lora(copy.deepcopy(source.unet), seed=5, name="c", target_modules=[*TARGETS, "conv1", "conv2"]),
        tmp_path,
        name="c",
    )
    for pipe in (source, staged):
        pipe.load_lora_weights(folder, adapter_name="c")
    for weights in ({"up": {"block_0": 0.0}}, {"down": 0.5, "mid": 0.0, "up": 2.0}):
        for pipe in (source, staged):
            pipe.set_adapters("c", adapter_weights={"unet": weights})
        assert np.abs(_images(staged) - _images(source)).max() < 1e-5


def test_tailored_decoders_refuse_the_source_up_path_lora_before_any_change(tiny_cond_unet, tmp_path):
    source = tiny_cond_unet(0)
    config = {k: v for k, v in source.config.items() if not k.startswith("_")}
    tailored = MultiStageUNet2DConditionModel(
        **config, stage_boundaries=(500,), decoder_block_out_channels=((8, 16), (16, 32))
    )
    state_dict, _ = StableDiffusionPipeline.lora_state_dict(_source_lora(source, tmp_path))
    before = {k: v.clone() for k, v in tailored.state_dict().items()}
    with pytest.raises(ValueError, match=r"decoder 1\b.*shape") as error:
        tailored.load_lora_adapter(state_dict, prefix="unet")
    assert "decoder_block_out_channels" in str(error.value)
    assert not _lora_layers(tailored) and not getattr(tailored, "peft_config", None)
    after = tailored.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_lora_mixing_source_and_staged_keys_is_refused(source_and_staged, tmp_path):
    source, staged = source_and_staged
    state_dict, _ = StableDiffusionPipeline.lora_state_dict(_source_lora(source.unet, tmp_path))
    up_path = {k.replace("unet.", "unet.decoders.0.", 1): v for k, v in state_dict.items() if "up_blocks" in k}
    state_dict = {**state_dict, **up_path}
    with pytest.raises(ValueError, match="both"):
        staged.unet.load_lora_adapter(state_dict, prefix="unet")
    assert not _lora_layers(staged.unet)


def test_lora_trained_on_the_staged_model_saves_and_reloads_as_is(tiny_sd_components, tmp_path):
    pipe = StableDiffusionPipeline(**tiny_sd_components)
    base = MultiStageUNet2DConditionModel.from_unet(pipe.unet, stage_boundaries=BOUNDARIES)
    pipe.unet = _add_lora(copy.deepcopy(base), seed=3)
    with torch.no_grad():  # "training": the decoders' adapters drift apart
        for s, decoder in enumerate(pipe.unet.decoders):
            for name, parameter in decoder.named_parameters():
                if "lora_B" in name:
                    parameter.add_(0.1 * s)
    trained = _images(pipe)
    folder = _save_lora(pipe.unet, tmp_path)
    pipe.unet = copy.deepcopy(base)
    pipe.load_lora_weights(folder)
    assert np.abs(_images(pipe) - trained).max() < 1e-5
    assert any(name.startswith("decoders.2.") for name in _lora_layers(pipe.unet))
    # the model's own `save_lora_adapter` / `load_lora_adapter` round trip too
    pipe.unet.save_lora_adapter(str(tmp_path / "adapter"), adapter_name="default_0")
    reloaded = copy.deepcopy(base)
    reloaded.load_lora_adapter(str(tmp_path / "adapter"), prefix=None, adapter_name="x")
    pipe.unet = reloaded
    assert np.abs(_images(pipe) - trained).max() < 1e-5


def test_without_peft_the_user_is_told_to_install_it(source_and_staged, tmp_path, monkeypatch):
    import diffusers.utils

    source, staged = source_and_staged
    folder = _source_lora(source.unet, tmp_path)
    monkeypatch.setattr(diffusers.utils, "USE_PEFT_BACKEND", False)
    with pytest.raises(ValueError, match="PEFT backend is required"):
        staged.load_lora_weights(folder)
    with pytest.raises(ImportError, match="pip install peft"):
        staged.unet.load_lora_adapter(folder, prefix="unet")


# ---------------------------------------------------------------------------------------------------------------
# ExpertRoutingModel: the source's LoRA on every expert
def test_source_lora_on_every_expert_gives_the_source_images(source_and_routed, tmp_path):
    source, routed = source_and_routed
    plain = _images(source)
    folder = _source_lora(source.unet, tmp_path)
    source.load_lora_weights(folder)
    routed.load_lora_weights(folder)
    with_lora = _images(source)
    assert np.abs(with_lora - plain).max() > 1e-2
    assert np.abs(_images(routed) - with_lora).max() < 1e-5
    for expert in routed.unet.experts:
        assert list(expert.peft_config) == ["default_0"] and len(_lora_layers(expert)) == len(
            _lora_layers(source.unet)
        )
    assert routed.get_list_adapters() == {"unet": ["default_0"]}

    # the switches reach every expert
    for pipe in (source, routed):
        pipe.set_adapters("default_0", adapter_weights=0.5)
    assert np.abs(_images(routed) - _images(source)).max() < 1e-5
    for pipe in (source, routed):
        pipe.disable_lora()
    assert np.abs(_images(routed) - plain).max() < 1e-5
    for pipe in (source, routed):
        pipe.enable_lora()
        pipe.fuse_lora(components=["unet"])
    assert np.abs(_images(routed) - _images(source)).max() < 1e-5
    for pipe in (source, routed):
        pipe.unfuse_lora(components=["unet"])
        pipe.unload_lora_weights()
    assert np.abs(_images(routed) - plain).max() < 1e-5
    assert not _lora_layers(routed.unet) and routed.get_list_adapters() == {}


def test_an_expert_of_other_widths_refuses_the_lora_before_any_change(tiny_cond_unet, tmp_path):
    source = tiny_cond_unet(0)
    routed = ExpertRoutingModel([copy.deepcopy(source), tiny_cond_unet(1, block_out_channels=(16, 32))], (500,))
    state_dict, _ = StableDiffusionPipeline.lora_state_dict(_source_lora(source, tmp_path))
    with pytest.raises(ValueError, match=r"expert 1\b.*shape"):
        routed.load_lora_adapter(state_dict, prefix="unet")
    assert not _lora_layers(routed)
    assert all(not getattr(expert, "peft_config", None) for expert in routed.experts)


def test_lora_trained_on_the_experts_saves_and_reloads_as_is(source_and_routed, tmp_path):
    _, pipe = source_and_routed
    base = copy.deepcopy(pipe.unet)
    _add_lora(pipe.unet, seed=4)
    assert all(list(expert.peft_config) == ["default"] for expert in pipe.unet.experts)
    with torch.no_grad():
        for name, parameter in pipe.unet.experts[1].named_parameters():
            if "lora_B" in name:
                parameter.add_(0.1)  # the experts' adapters differ
    trained = _images(pipe)
    folder = _save_lora(pipe.unet, tmp_path)
    pipe.unet.save_lora_adapter(str(tmp_path / "adapter"))  # the model's own (was an AttributeError)
    pipe.unet = copy.deepcopy(base)
    pipe.load_lora_weights(folder)
    assert np.abs(_images(pipe) - trained).max() < 1e-5
    pipe.unet = base
    pipe.unet.load_lora_adapter(str(tmp_path / "adapter"), prefix=None, adapter_name="x")
    assert [list(expert.peft_config) for expert in pipe.unet.experts] == [["x"], ["x"]]
    assert np.abs(_images(pipe) - trained).max() < 1e-5


def test_warm_start_from_a_source_with_a_lora_loaded_is_refused_by_name(source_and_staged, tmp_path):
    source, _ = source_and_staged
    source.load_lora_weights(_source_lora(source.unet, tmp_path), adapter_name="style")
    with pytest.raises(ValueError, match=r"`unet` has LoRA adapters loaded \(\['style'\]\)"):
        MultiStageUNet2DConditionModel.from_unet(source.unet, stage_boundaries=BOUNDARIES)
    # the way the message gives: the LoRA baked in, then the exact warm start of the fused U-Net
    with_lora = _images(source)
    source.unet.fuse_lora()
    source.unet.unload_lora()
    source.unet = MultiStageUNet2DConditionModel.from_unet(source.unet, stage_boundaries=BOUNDARIES)
    assert np.abs(_images(source) - with_lora).max() < 1e-5


def test_source_lora_on_staged_experts_and_bad_input(source_and_routed, tmp_path):
    source, routed = source_and_routed
    experts = routed.unet.experts
    routed.unet = ExpertRoutingModel(
        [MultiStageUNet2DConditionModel.from_unet(experts[0], stage_boundaries=(250,)), experts[1]], (500,)
    )
    folder = _source_lora(source.unet, tmp_path)
    with pytest.raises(ValueError, match="`pretrained_model_name_or_path_or_dict` must be .* got list"):
        routed.unet.load_lora_adapter([folder], prefix="unet")
    with pytest.raises(ValueError, match="`weight_name` must name a .safetensors file"):
        routed.unet.experts[0].load_lora_adapter(folder, prefix="unet", weight_name="lora.bin")
    source.load_lora_weights(folder)
    routed.load_lora_weights(folder)
    assert np.abs(_images(routed) - _images(source)).max() < 1e-5
    assert any(name.startswith("experts.0.decoders.1.") for name in _lora_layers(routed.unet))


@pytest.mark.parametrize("fused", [False, True], ids=["loaded", "fused-not-unloaded"])
@pytest.mark.parametrize("fixture", ["source_and_staged", "source_and_routed"])
def test_saving_with_a_lora_loaded_is_refused_before_anything_is_written(fixture, fused, tmp_path, request):
    # the LoRA-wrapped layers save under other names (`to_q.base_layer.weight`, `lora_A`): a folder no loader reads
    # (diffusers writes it for a plain U-Net, and its reload fails); refused, naming the ways out
    source, pipe = request.getfixturevalue(fixture)
    pipe.load_lora_weights(_source_lora(source.unet, tmp_path / "lora"))
    if fused:
        pipe.fuse_lora()
    for save in (
        lambda: pipe.unet.save_pretrained(tmp_path / "unet"),
        lambda: pipe.save_pretrained(tmp_path / "pipe"),
    ):
        with pytest.raises(ValueError, match=r"LoRA adapters loaded.*save_lora_weights.*unload_lora"):
            save()
    assert not (tmp_path / "unet").exists()
    assert not (tmp_path / "pipe" / "unet").exists()
    expected = _images(pipe)
    if fused:  # baked in: the weights save under their own names and load as they run
        pipe.unload_lora_weights()
    else:
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    pipe.unet.save_pretrained(tmp_path / "unet")
    pipe.unet = type(pipe.unet).from_pretrained(tmp_path / "unet")
    assert np.abs(_images(pipe) - expected).max() < 1e-5
