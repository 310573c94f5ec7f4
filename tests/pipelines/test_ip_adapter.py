"""IP-Adapter on the staged text-to-image U-Nets: `pipe.load_ip_adapter` with an IP-Adapter made for the source
`UNet2DConditionModel` (its down/mid cross-attention layers to the shared encoder, its up-path ones to every
decoder; every expert of an `ExpertRoutingModel`), `set_ip_adapter_scale`, `unload_ip_adapter`, and the refusals."""

import copy
import re

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from safetensors.torch import save_file

from diffusers_stages import ExpertRoutingModel, MultiStageUNet2DConditionModel
from tests.pipelines.conftest import SD_BOUNDARIES as BOUNDARIES

IMAGE_EMBED_DIM = 12  # the width of the (stand-in) CLIP image embedding


def ip_adapter_state_dict(unet, seed: int = 0) -> dict:
    """An IP-Adapter for ``unet`` in the original format diffusers' `load_ip_adapter` reads: ``image_proj``
    (``proj``/``norm`` of an `ImageProjection`, 4 tokens) and ``ip_adapter`` (``{i}.to_k_ip``/``{i}.to_v_ip`` per
    cross-attention layer, ``i`` = 1, 3, 5, ... in ``attn_processors`` order)."""
    generator = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    image_proj = {
        "proj.weight": torch.randn(4 * cross, IMAGE_EMBED_DIM, generator=generator) * 0.3,
        "proj.bias": torch.randn(4 * cross, generator=generator) * 0.1,
        "norm.weight": 1 + 0.1 * torch.randn(cross, generator=generator),
        "norm.bias": 0.1 * torch.randn(cross, generator=generator),
    }
    ip_adapter, key_id = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            shape = unet.get_submodule(name[: -len(".processor")]).to_k.weight.shape
            ip_adapter[f"{key_id}.to_k_ip.weight"] = torch.randn(shape, generator=generator) * 0.5
            ip_adapter[f"{key_id}.to_v_ip.weight"] = torch.randn(shape, generator=generator) * 0.5
            key_id += 2
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def save_ip_adapter(state_dict: dict, folder) -> str:
    """``state_dict`` as an IP-Adapter folder: ``models/ip-adapter.safetensors`` with ``image_proj.``/``ip_adapter.``
    keys (the layout of ``h94/IP-Adapter``)."""
    flat = {f"{part}.{key}": value for part, tensors in state_dict.items() for key, value in tensors.items()}
    (folder / "models").mkdir(parents=True, exist_ok=True)
    save_file(flat, str(folder / "models" / "ip-adapter.safetensors"))
    return str(folder)


def _embeds(seed: int = 1) -> list[torch.Tensor]:
    """One image's embedding, negative and positive (classifier-free guidance): ``[(2, 1, IMAGE_EMBED_DIM)]``."""
    return [torch.randn(2, 1, IMAGE_EMBED_DIM, generator=torch.Generator().manual_seed(seed))]


def _images(pipe, ip: bool = True, steps: int = 3) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    extra = {"ip_adapter_image_embeds": _embeds()} if ip else {}
    return pipe(
        "a cat",
        num_inference_steps=steps,
        guidance_scale=5.0,
        generator=torch.manual_seed(0),
        output_type="np",
        **extra,
    ).images


def _load(pipe, adapter) -> None:
    if isinstance(adapter, dict):
        pipe.load_ip_adapter(adapter, subfolder="", weight_name="", image_encoder_folder=None)
    else:
        pipe.load_ip_adapter(
            adapter, subfolder="models", weight_name="ip-adapter.safetensors", image_encoder_folder=None
        )


def _ip_processors(model) -> dict:
    return {
        name: processor
        for name, processor in model.attn_processors.items()
        if isinstance(processor, IPAdapterAttnProcessor2_0)
    }


def _check_scale_and_unload(source, other, plain: np.ndarray, with_ip: np.ndarray) -> None:
    """``other`` follows ``source`` through `set_ip_adapter_scale` (0 gives the plain images) and `unload_ip_adapter`."""
    for scale, expected in ((0.0, plain), (0.4, None)):
        for pipe in (source, other):
            pipe.set_ip_adapter_scale(scale)
        images = _images(other)
        assert np.abs(images - _images(source)).max() < 1e-5
        if expected is not None:
            assert np.abs(images - expected).max() < 1e-5
        else:
            assert np.abs(images - with_ip).max() > 1e-3 and np.abs(images - plain).max() > 1e-3
    for pipe in (source, other):
        pipe.unload_ip_adapter()
    assert not _ip_processors(other.unet) and other.unet.encoder_hid_proj is None
    assert np.abs(_images(other, ip=False) - plain).max() < 1e-5


@pytest.mark.parametrize("as_dict", [False, True], ids=["folder", "state-dict"])
def test_source_ip_adapter_on_the_staged_pipeline_gives_the_source_images(source_and_staged, tmp_path, as_dict):
    source, staged = source_and_staged
    plain = _images(source, ip=False)
    state_dict = ip_adapter_state_dict(source.unet)
    adapter = state_dict if as_dict else save_ip_adapter(state_dict, tmp_path)
    _load(source, adapter)
    _load(staged, adapter)
    with_ip = _images(source)
    assert np.abs(with_ip - plain).max() > 1e-2  # the IP-Adapter changes the images
    assert np.abs(_images(staged) - with_ip).max() < 1e-5

    # down/mid layers are the encoder's, each up-path layer's weights are in every decoder, each decoder its own copy
    processors, source_processors = _ip_processors(staged.unet), _ip_processors(source.unet)
    up = [name for name in source_processors if name.startswith("up_blocks.")]
    assert up and all(f"decoders.{s}.{name}" in processors for s in range(3) for name in up)
    assert all(name in processors for name in source_processors if not name.startswith("up_blocks."))
    assert len(processors) == len(source_processors) + 2 * len(up)
    weights = [processors[f"decoders.{s}.{up[0]}"].to_k_ip[0].weight for s in range(3)]
    assert weights[0].data_ptr() != weights[1].data_ptr() and torch.equal(weights[0], weights[1])
    assert torch.equal(weights[0], source_processors[up[0]].to_k_ip[0].weight)
    assert staged.unet.config.encoder_hid_dim_type == "ip_image_proj"

    _check_scale_and_unload(source, staged, plain, with_ip)


def test_an_ip_adapter_image_goes_through_the_image_encoder_as_for_the_source(tiny_sd_components):
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=16,
        patch_size=8, projection_dim=IMAGE_EMBED_DIM,
    )  # fmt: skip
    components = dict(
        tiny_sd_components,
        image_encoder=CLIPVisionModelWithProjection(vision).eval(),
        feature_extractor=CLIPImageProcessor(size=16, crop_size=16),
    )
    source = StableDiffusionPipeline(**components)
    staged = StableDiffusionPipeline(**dict(components, unet=copy.deepcopy(source.unet)))
    staged.unet = MultiStageUNet2DConditionModel.from_unet(staged.unet, stage_boundaries=BOUNDARIES)
    state_dict = ip_adapter_state_dict(source.unet)
    _load(source, state_dict)
    _load(staged, state_dict)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))

    def images(pipe) -> np.ndarray:
        pipe.set_progress_bar_config(disable=True)
        generator = torch.manual_seed(0)
        return pipe(
            "a cat", num_inference_steps=3, generator=generator, output_type="np", ip_adapter_image=image
        ).images

    with_image = images(source)
    assert np.abs(images(staged) - with_image).max() < 1e-5
    staged.set_ip_adapter_scale(0.0)
    assert np.abs(images(staged) - with_image).max() > 1e-2  # the image prompt did act


def test_a_mixed_batch_routes_the_image_embeddings_with_the_rest(source_and_staged):
    source, staged = source_and_staged
    state_dict = ip_adapter_state_dict(source.unet)
    _load(source, state_dict)
    _load(staged, state_dict)
    torch.manual_seed(3)
    x, text = torch.randn(3, 4, 8, 8), torch.randn(3, 5, 32)
    added = {"image_embeds": [torch.randn(3, 1, IMAGE_EMBED_DIM)]}
    t = torch.tensor([900, 100, 500])  # one sample per stage, in no stage order
    expected = source.unet(x, t, text, added_cond_kwargs=added).sample
    assert torch.allclose(staged.unet(x, t, text, added_cond_kwargs=added).sample, expected, atol=1e-5)
    with pytest.raises(ValueError, match="image_embeds"):  # as diffusers: the adapter needs the image embeddings
        staged.unet(x, t, text)
    with pytest.raises(ValueError, match=r"image_embeds.*one row per sample \(3\).*\(2, 1, 12\)"):
        staged.unet(x, t, text, added_cond_kwargs={"image_embeds": [torch.randn(2, 1, IMAGE_EMBED_DIM)]})
    # a tuple passed the check, then failed inside diffusers ("'tuple' object has no attribute 'unsqueeze'")
    with pytest.raises(ValueError, match=r"image_embeds.*must be a list of tensors.*got tuple"):
        staged.unet(x, t, text, added_cond_kwargs={"image_embeds": (torch.randn(3, 1, IMAGE_EMBED_DIM),)})


def test_source_ip_adapter_on_a_staged_sdxl_pipeline(tiny_sdxl_components):
    source = StableDiffusionXLPipeline(**tiny_sdxl_components)
    staged = StableDiffusionXLPipeline(**dict(tiny_sdxl_components, unet=copy.deepcopy(source.unet)))
    staged.unet = MultiStageUNet2DConditionModel.from_unet(staged.unet, stage_boundaries=BOUNDARIES)
    plain = _images(source, ip=False)
    state_dict = ip_adapter_state_dict(source.unet)
    _load(source, state_dict)
    _load(staged, state_dict)
    with_ip = _images(source)
    assert np.abs(with_ip - plain).max() > 1e-2
    assert np.abs(_images(staged) - with_ip).max() < 1e-5
    _check_scale_and_unload(source, staged, plain, with_ip)


def test_tailored_decoders_refuse_the_source_up_path_ip_adapter_before_any_change(tiny_cond_unet):
    source = tiny_cond_unet(0)
    config = {k: v for k, v in source.config.items() if not k.startswith("_")}
    tailored = MultiStageUNet2DConditionModel(
        **config, stage_boundaries=(500,), decoder_block_out_channels=((8, 16), (16, 32))
    )
    processors = {name: type(p) for name, p in tailored.attn_processors.items()}
    before = {k: v.clone() for k, v in tailored.state_dict().items()}
    with pytest.raises(ValueError, match=r"decoder 1\b.*shape") as error:
        tailored._load_ip_adapter_weights([ip_adapter_state_dict(source)])
    assert "decoder_block_out_channels" in str(error.value)
    assert {name: type(p) for name, p in tailored.attn_processors.items()} == processors
    assert tailored.encoder_hid_proj is None and tailored.config.encoder_hid_dim_type is None
    after = tailored.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_an_ip_adapter_of_another_layout_is_refused_by_name(source_and_staged, tiny_cond_unet):
    source, staged = source_and_staged
    other = ip_adapter_state_dict(tiny_cond_unet(0, layers_per_block=2))  # more cross-attention layers
    with pytest.raises(ValueError, match=r"ip_adapter.*cross-attention layers"):
        staged.unet._load_ip_adapter_weights([other])
    assert not _ip_processors(staged.unet) and staged.unet.encoder_hid_proj is None
    with pytest.raises(ValueError, match="state_dicts"):
        staged.unet._load_ip_adapter_weights(["not a state dict"])
    # a layer number that is not a number (a file's key: any string) is the same refusal, not int()'s error
    renamed = ip_adapter_state_dict(source.unet)
    renamed["ip_adapter"] = {key.replace("1.", "x.", 1): value for key, value in renamed["ip_adapter"].items()}
    with pytest.raises(ValueError, match=r"ip_adapter.*cross-attention layers"):
        staged.unet._load_ip_adapter_weights([renamed])


# ---------------------------------------------------------------------------------------------------------------
# ExpertRoutingModel: the source's IP-Adapter in every expert
def test_source_ip_adapter_in_every_expert_gives_the_source_images(source_and_routed, tmp_path):
    source, routed = source_and_routed
    plain = _images(source, ip=False)
    adapter = save_ip_adapter(ip_adapter_state_dict(source.unet), tmp_path)
    _load(source, adapter)
    _load(routed, adapter)
    with_ip = _images(source)
    assert np.abs(with_ip - plain).max() > 1e-2
    assert np.abs(_images(routed) - with_ip).max() < 1e-5
    for expert in routed.unet.experts:
        assert len(_ip_processors(expert)) == len(_ip_processors(source.unet))
        assert expert.config.encoder_hid_dim_type == "ip_image_proj"
    assert routed.unet.config.encoder_hid_dim_type == "ip_image_proj"
    _check_scale_and_unload(source, routed, plain, with_ip)
    assert all(expert.encoder_hid_proj is None for expert in routed.unet.experts)
    assert all(expert.config.encoder_hid_dim_type is None for expert in routed.unet.experts)


def test_experts_with_an_ip_adapter_name_the_missing_image_embeddings(source_and_routed):
    # the source pipeline without `ip_adapter_image_embeds` fails inside diffusers with "argument of type 'NoneType'
    # is not iterable"; the routing names the argument, as the staged model does, for a whole batch and a mixed one
    source, routed = source_and_routed
    _load(routed, ip_adapter_state_dict(source.unet))
    with pytest.raises(ValueError, match=r"`added_cond_kwargs` must hold `image_embeds`"):
        _images(routed, ip=False)
    torch.manual_seed(3)
    x, text, t = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32), torch.tensor([900, 100])
    for added in (None, {}):
        with pytest.raises(ValueError, match=r"`added_cond_kwargs` must hold `image_embeds`"):
            routed.unet(x, t, text, added_cond_kwargs=added)
    with pytest.raises(ValueError, match=r"image_embeds.*one row per sample \(2\).*\(3, 1, 12\)"):
        routed.unet(x, t, text, added_cond_kwargs={"image_embeds": [torch.randn(3, 1, IMAGE_EMBED_DIM)]})
    routed.unload_ip_adapter()
    assert routed.unet(x, t, text).sample.shape == x.shape  # no adapter: no image embeddings needed


def test_staged_experts_take_the_source_ip_adapter(source_and_routed):
    source, routed = source_and_routed
    routed.unet.experts[1] = MultiStageUNet2DConditionModel.from_unet(routed.unet.experts[1], stage_boundaries=(700,))
    state_dict = ip_adapter_state_dict(source.unet)
    _load(source, state_dict)
    _load(routed, state_dict)
    assert np.abs(_images(routed) - _images(source)).max() < 1e-5


def faceid_state_dict(unet, seed: int = 0) -> dict:
    """An IP-Adapter FaceID for ``unet`` in the original format: ``image_proj`` of an `IPAdapterFaceIDImageProjection`
    (``proj.0``/``proj.2``/``norm``, 2 tokens) and ``ip_adapter`` with, for every attention layer ``i`` (in
    ``attn_processors`` order), a LoRA of its projections (``{i}.to_q_lora.down``, ...) and, for the cross-attention
    layers, ``{i}.to_k_ip``/``{i}.to_v_ip``."""
    generator = torch.Generator().manual_seed(seed)
    cross, hidden, tokens = unet.config.cross_attention_dim, 2 * IMAGE_EMBED_DIM, 2
    image_proj = {
        "proj.0.weight": torch.randn(hidden, IMAGE_EMBED_DIM, generator=generator) * 0.3,
        "proj.0.bias": torch.zeros(hidden),
        "proj.2.weight": torch.randn(tokens * cross, hidden, generator=generator) * 0.3,
        "proj.2.bias": torch.zeros(tokens * cross),
        "norm.weight": torch.ones(cross),
        "norm.bias": torch.zeros(cross),
    }
    ip_adapter = {}
    for key_id, name in enumerate(unet.attn_processors):
        attention = unet.get_submodule(name[: -len(".processor")])
        for projection, layer in (("q", attention.to_q), ("k", attention.to_k), ("v", attention.to_v)):
            ip_adapter[f"{key_id}.to_{projection}_lora.down.weight"] = torch.randn(
                4, layer.in_features, generator=generator
            )
            ip_adapter[f"{key_id}.to_{projection}_lora.up.weight"] = torch.randn(layer.out_features, 4) * 0.1
        out = attention.to_out[0]
        ip_adapter[f"{key_id}.to_out_lora.down.weight"] = torch.randn(4, out.in_features, generator=generator)
        ip_adapter[f"{key_id}.to_out_lora.up.weight"] = torch.randn(out.out_features, 4, generator=generator) * 0.1
        if name.endswith("attn2.processor"):
            for projection in "kv":
                weight = getattr(attention, f"to_{projection}").weight
                ip_adapter[f"{key_id}.to_{projection}_ip.weight"] = (
                    torch.randn(weight.shape, generator=generator) * 0.5
                )
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


@pytest.mark.parametrize("kind", ["staged", "staged-expert"])
def test_a_faceid_ip_adapter_and_its_lora_give_the_source_images(source_and_staged, source_and_routed, kind):
    # FaceID: diffusers reads the LoRA part with `unet._load_ip_adapter_loras` (the source's layer names, here from
    # the staged model's view of them) and loads it with `pipe.load_lora_weights`, which renames the up path's onto
    # every decoder; the image projection is an `IPAdapterFaceIDImageProjection`
    pytest.importorskip("peft")
    source, other = source_and_staged if kind == "staged" else source_and_routed
    if kind == "staged-expert":
        other.unet.experts[1] = MultiStageUNet2DConditionModel.from_unet(
            other.unet.experts[1], stage_boundaries=(700,)
        )
    plain = _images(source, ip=False)
    state_dict = faceid_state_dict(source.unet)
    for pipe in (source, other):
        pipe.load_ip_adapter([copy.deepcopy(state_dict)], subfolder=[""], weight_name=[""], image_encoder_folder=None)
        assert pipe.get_list_adapters() == {"unet": ["faceid_0"]}
    staged = other.unet if kind == "staged" else other.unet.experts[1]
    layers = {name for name, module in staged.named_modules() if hasattr(module, "lora_A")}
    assert all(any(name.startswith(f"decoders.{s}.up_blocks.") for name in layers) for s in range(staged.num_stages))
    with_faceid = _images(source)
    assert np.abs(with_faceid - plain).max() > 1e-2
    assert np.abs(_images(other) - with_faceid).max() < 1e-5


def test_masks_of_one_row_per_ip_adapter_reach_the_expert_as_for_the_source(source_and_routed):
    # diffusers takes `ip_adapter_masks` as one tensor of one row per IP-Adapter (its backward-compatible form): rows
    # that are not the samples', refused by the routing when the batch (4: 2 images per prompt, guidance) went
    # whole to one expert, as the source takes them
    source, routed = source_and_routed
    adapters = [ip_adapter_state_dict(source.unet, seed) for seed in (0, 1)]
    for pipe in (source, routed):
        pipe.load_ip_adapter(adapters, subfolder=["", ""], weight_name=["", ""], image_encoder_folder=None)
    masks = torch.ones(2, 1, 16, 16)
    masks[0, :, :, 8:] = 0  # the first image prompt on the left half only

    def images(pipe, **masked) -> np.ndarray:
        return pipe(
            "a cat",
            num_inference_steps=2,
            num_images_per_prompt=2,
            generator=torch.manual_seed(0),
            output_type="np",
            ip_adapter_image_embeds=_embeds(1) + _embeds(2),
            **masked,
        ).images

    masked = images(routed, cross_attention_kwargs={"ip_adapter_masks": masks})
    assert np.abs(masked - images(source, cross_attention_kwargs={"ip_adapter_masks": masks})).max() < 1e-5
    assert np.abs(masked - images(routed)).max() > 1e-3  # the masks did act


def test_an_expert_of_other_widths_refuses_the_ip_adapter_before_any_change(tiny_cond_unet):
    experts = [tiny_cond_unet(0), tiny_cond_unet(1, block_out_channels=(16, 32))]
    routed = ExpertRoutingModel(experts, stage_boundaries=(500,))
    with pytest.raises(ValueError, match=r"Expert 1\b.*shape"):
        routed._load_ip_adapter_weights([ip_adapter_state_dict(experts[0])])
    assert all(not _ip_processors(expert) and expert.encoder_hid_proj is None for expert in experts)


def test_warm_start_from_a_source_with_an_ip_adapter_loaded_is_refused_by_name(source_and_staged):
    source, _ = source_and_staged
    _load(source, ip_adapter_state_dict(source.unet))
    with pytest.raises(ValueError, match="IP-Adapter loaded.*unload_ip_adapter"):
        MultiStageUNet2DConditionModel.from_unet(source.unet, stage_boundaries=BOUNDARIES)
    source.unload_ip_adapter()  # the way out: the plain U-Net, then the IP-Adapter into the staged model
    staged = MultiStageUNet2DConditionModel.from_unet(source.unet, stage_boundaries=BOUNDARIES)
    assert staged.encoder_hid_proj is None


def test_experts_without_the_loaders_are_named_before_an_adapter_loads():
    # experts of a class diffusers gives no LoRA or IP-Adapter loader (UNet2DModel): each refusal names the method
    from diffusers import UNet2DModel

    from tests.conftest import TINY_UNET

    model = ExpertRoutingModel([UNet2DModel(**TINY_UNET), UNet2DModel(**TINY_UNET)], stage_boundaries=(500,))
    with pytest.raises(ValueError, match=r"Expert 0 \(UNet2DModel\) cannot load an IP-Adapter: it has no `_load_ip"):
        model._load_ip_adapter_weights([{}])
    with pytest.raises(
        ValueError, match=r"Expert 0 \(UNet2DModel\) cannot load a LoRA: it has no `load_lora_adapter`"
    ):
        model.load_lora_adapter({})


# ---------------------------------------------------------------------------------------------------------------
# block-wise (dict) scales, diffusers' InstantStyle form: the same layers as on the source U-Net
STYLE = {"down": {"block_1": 0.0}, "up": {"block_0": [0.0, 1.0]}}  # the tiny SD layout: down 1 and up 0 attend
STAGED_PREFIX = re.compile(r"^(experts\.\d+\.)?(decoders\.\d+\.)?")  # a layer's name less this is the source's


def _assert_source_scales(source, other) -> None:
    """Every IP-Adapter processor of ``other`` has the scales of the source's processor of the same layer (its name
    without ``experts.{e}.`` and ``decoders.{s}.``)."""
    expected = {name: list(p.scale) for name, p in _ip_processors(source.unet).items()}
    scales = {name: list(p.scale) for name, p in _ip_processors(other.unet).items()}
    assert scales and len({STAGED_PREFIX.sub("", name) for name in scales}) == len(expected)
    for name, scale in scales.items():
        assert scale == expected[STAGED_PREFIX.sub("", name)], name


@pytest.mark.parametrize("kind", ["staged", "routed", "staged-expert"])
def test_a_dict_scale_sets_the_source_layers_scales(source_and_staged, source_and_routed, kind):
    source, other = source_and_routed if kind != "staged" else source_and_staged
    if kind == "staged-expert":
        other.unet.experts[1] = MultiStageUNet2DConditionModel.from_unet(
            other.unet.experts[1], stage_boundaries=(700,)
        )
    state_dict = ip_adapter_state_dict(source.unet)
    _load(source, state_dict)
    _load(other, state_dict)
    uniform = _images(source)
    for pipe in (source, other):
        pipe.set_ip_adapter_scale(STYLE)
    assert {tuple(p.scale) for p in _ip_processors(source.unet).values()} == {(0.0,), (1.0,)}
    _assert_source_scales(source, other)
    images = _images(other)
    assert np.abs(images - _images(source)).max() < 1e-5
    assert np.abs(images - uniform).max() > 1e-3  # the dict did act
    for pipe in (source, other):  # a float scale again: every layer
        pipe.set_ip_adapter_scale(0.7)
    _assert_source_scales(source, other)


def test_a_dict_scale_per_ip_adapter_sets_the_source_layers_scales(source_and_staged):
    source, staged = source_and_staged
    adapters = [ip_adapter_state_dict(source.unet, seed) for seed in (0, 1)]
    for pipe in (source, staged):
        pipe.load_ip_adapter(adapters, subfolder=["", ""], weight_name=["", ""], image_encoder_folder=None)
        pipe.set_ip_adapter_scale([STYLE, {"up": {"block_0": [0.5, 0.0]}, "mid": 0.3}])
    _assert_source_scales(source, staged)
    for pipe in (source, staged):
        pipe.set_ip_adapter_scale([0.2, 0.9])
    _assert_source_scales(source, staged)


def test_a_dict_scale_with_the_wrong_number_of_layers_is_diffusers_error(source_and_staged):
    source, staged = source_and_staged
    state_dict = ip_adapter_state_dict(source.unet)
    for pipe in (source, staged):
        _load(pipe, state_dict)
        with pytest.raises(ValueError, match=r"Expected 2 scales for up\.block_0, got 3"):
            pipe.set_ip_adapter_scale({"up": {"block_0": [0.0, 1.0, 0.0]}})


@pytest.mark.parametrize("kind", ["staged", "experts"])
def test_a_pipeline_saved_with_an_ip_adapter_loaded_reloads_as_a_plain_one_does(
    source_and_staged, source_and_routed, tmp_path, kind
):
    # `save_pretrained` writes the IP-Adapter's weights (`encoder_hid_proj.*`, `*.processor.to_k_ip.*`) with the
    # U-Net but not its config entry; diffusers reloads such a folder without them (a warning names them), the
    # strict loading refused it as a checkpoint that does not match its config
    source, other = source_and_staged if kind == "staged" else source_and_routed
    plain = _images(source, ip=False)
    state_dict = ip_adapter_state_dict(source.unet)
    for pipe in (source, other):
        _load(pipe, state_dict)
        pipe.save_pretrained(tmp_path / type(pipe.unet).__name__)
    reloaded = StableDiffusionPipeline.from_pretrained(tmp_path / type(other.unet).__name__)
    assert not _ip_processors(reloaded.unet) and reloaded.unet.encoder_hid_proj is None
    plain_reloaded = StableDiffusionPipeline.from_pretrained(tmp_path / "UNet2DConditionModel")
    assert np.abs(_images(plain_reloaded, ip=False) - plain).max() < 1e-5  # as the source pipeline's folder
    assert np.abs(_images(reloaded, ip=False) - plain).max() < 1e-5
    _load(reloaded, state_dict)  # and the IP-Adapter loads again
    assert np.abs(_images(reloaded) - _images(source)).max() < 1e-5
