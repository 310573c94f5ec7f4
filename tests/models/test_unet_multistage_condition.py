import json

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from diffusers_stages import MultiStageUNet2DConditionModel
from tests.models.staged_model_tester import assert_group_offload_keeps_outputs, assert_layerwise_casting_works

BOUNDARIES = (300, 600)
TIMESTEPS = [0, 299, 300, 450, 599.5, 600, 999, 1000]


def _inputs(batch: int, sdxl: bool = False, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """A latent batch and the conditioning a Stable Diffusion (or SDXL) pipeline passes."""
    generator = torch.manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=generator)
    kwargs = {"encoder_hidden_states": torch.randn(batch, 5, 64 if sdxl else 32, generator=generator)}
    if sdxl:
        time_ids = torch.tensor([16.0, 16.0, 0.0, 0.0, 16.0, 16.0]).repeat(batch, 1)
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 32, generator=generator),
            "time_ids": time_ids,
        }
    return x, kwargs


def _config(unet) -> dict:
    return {k: v for k, v in unet.config.items() if not k.startswith("_")}


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
def test_from_unet_is_exact_at_every_timestep_stage_and_mixed_batch(tiny_cond_unet, sdxl):
    unet = tiny_cond_unet(0, sdxl=sdxl)
    staged = MultiStageUNet2DConditionModel.from_unet(unet, stage_boundaries=BOUNDARIES).eval()
    assert staged.num_stages == 3 and staged.config.cross_attention_dim == unet.config.cross_attention_dim
    x, kwargs = _inputs(2, sdxl)
    with torch.no_grad():
        for t in TIMESTEPS:  # one stage holds the batch: the very same computation as the source
            assert torch.equal(staged(x, t, **kwargs).sample, unet(x, t, **kwargs).sample), t
        for stage in range(3):  # an explicit stage index: each decoder is a copy of the source's up path
            assert torch.equal(staged(x, 450, **kwargs, stage_index=stage).sample, unet(x, 450, **kwargs).sample)
        t = torch.cat([torch.arange(1001.0), torch.tensor([299.5, 612.25])])  # every training timestep, mixed
        x, kwargs = _inputs(len(t), sdxl)
        assert torch.allclose(staged(x, t, **kwargs).sample, unet(x, t, **kwargs).sample, atol=1e-5)


def test_from_unet_keeps_the_source_mode_so_dropout_configs_match_too(tiny_cond_unet):
    # a source from `from_pretrained` is in eval mode: the warm start must be too (or dropout > 0 samples noise)
    unet = tiny_cond_unet(0, dropout=0.3)
    staged = MultiStageUNet2DConditionModel.from_unet(unet, stage_boundaries=BOUNDARIES)
    assert not staged.training
    x, kwargs = _inputs(2)
    with torch.no_grad():
        assert torch.equal(staged(x, 450, **kwargs).sample, unet(x, 450, **kwargs).sample)
    assert MultiStageUNet2DConditionModel.from_unet(unet.train(), stage_boundaries=BOUNDARIES).training


def test_from_unet_of_a_fused_source_is_exact_and_fused_as_the_source(tiny_cond_unet):
    # `pipe.fuse_qkv_projections()` adds `to_qkv`/`to_kv` copies of the projections, and diffusers'
    # `unfuse_qkv_projections()` keeps them: a source fused at any time still warm-starts exactly
    unet = tiny_cond_unet(0)
    x, kwargs = _inputs(2)
    with torch.no_grad():
        expected = unet(x, 450, **kwargs).sample
        unet.fuse_qkv_projections()
        staged = MultiStageUNet2DConditionModel.from_unet(unet, stage_boundaries=BOUNDARIES)
        assert {type(p).__name__ for p in staged.attn_processors.values()} == {"FusedAttnProcessor2_0"}
        assert torch.allclose(staged(x, 450, **kwargs).sample, expected, atol=1e-5)
        unet.unfuse_qkv_projections()
        staged = MultiStageUNet2DConditionModel.from_unet(unet, stage_boundaries=BOUNDARIES)
        assert "FusedAttnProcessor2_0" not in {type(p).__name__ for p in staged.attn_processors.values()}
        assert torch.equal(staged(x, 450, **kwargs).sample, expected)


def test_from_unet_of_a_source_with_freeu_keeps_it(tiny_cond_unet):
    # `pipe.enable_freeu(...)` sets FreeU on the source's up blocks (not in its config or weights): the warm start of
    # such a source equals it too, and `disable_freeu` turns FreeU off in every decoder
    unet = tiny_cond_unet(0)
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    x, kwargs = _inputs(2)
    with torch.no_grad():
        staged = MultiStageUNet2DConditionModel.from_unet(unet, stage_boundaries=BOUNDARIES)
        assert torch.equal(staged(x, 450, **kwargs).sample, unet(x, 450, **kwargs).sample)
        staged.disable_freeu()
        unet.disable_freeu()
        assert torch.equal(staged(x, 450, **kwargs).sample, unet(x, 450, **kwargs).sample)


def test_mixed_batch_decodes_each_stage_on_its_own_rows_of_every_tensor(tiny_cond_unet):
    torch.manual_seed(0)
    staged = MultiStageUNet2DConditionModel(
        **_config(tiny_cond_unet(0, sdxl=True)),
        stage_boundaries=BOUNDARIES,
        decoder_block_out_channels=((16, 32), (8, 16), (4, 8)),  # tailored: wide clean decoder, narrow noisy one
    ).eval()
    x, kwargs = _inputs(5, sdxl=True)
    t = torch.tensor([900, 10, 450, 20, 999])
    mask = torch.ones(5, 5)
    mask[1, 3:] = 0  # sample 1 attends to its first 3 tokens only
    kwargs["encoder_attention_mask"] = mask
    sizes = {s: [] for s in range(3)}
    for s, decoder in enumerate(staged.decoders):
        decoder.register_forward_pre_hook(lambda m, args, s=s: sizes[s].append(args[3]["encoder_hidden_states"].shape))
    with torch.no_grad():
        out = staged(x, t, **kwargs).sample
        assert sizes == {0: [(2, 5, 64)], 1: [(1, 5, 64)], 2: [(2, 5, 64)]}  # each decoder once, on its rows only
        for rows, stage in (([1, 3], 0), ([2], 1), ([0, 4], 2)):
            alone = staged(x[rows], t[rows], **_select(kwargs, rows)).sample
            assert torch.allclose(out[rows], alone, atol=1e-5), stage
        masked = staged(x[1:2], t[1:2], **_select({**kwargs, "encoder_attention_mask": None}, [1])).sample
        assert not torch.allclose(out[1:2], masked, atol=1e-4)  # the mask reached the decoder's cross-attention


def _select(kwargs: dict, rows: list[int]) -> dict:
    from diffusers_stages.routing import select_rows

    return select_rows(kwargs, torch.tensor(rows), batch=5)


def test_guidance_doubled_batch_stays_in_one_stage_per_sample(tiny_cond_unet):
    unet = tiny_cond_unet(0)
    staged = MultiStageUNet2DConditionModel.from_unet(unet, stage_boundaries=BOUNDARIES).eval()
    for decoder in staged.decoders:  # decoders fine-tuned apart
        torch.nn.init.normal_(decoder.conv_out.weight, std=0.1)
    x, kwargs = _inputs(2)
    text = torch.cat([torch.zeros_like(kwargs["encoder_hidden_states"]), kwargs["encoder_hidden_states"]])
    t = torch.tensor([100, 900])  # two samples in different stages, each with its unconditional twin
    with torch.no_grad():
        uncond, cond = staged(torch.cat([x, x]), torch.cat([t, t]), text).sample.chunk(2)
        for i in range(2):
            stage = int(staged.partition.stage_for_timestep(t[i : i + 1])[0])
            pair = staged(torch.cat([x[i : i + 1]] * 2), t[i], text[i::2], stage_index=stage).sample
            assert torch.allclose(torch.stack([uncond[i], cond[i]]), pair, atol=1e-5)


def test_controlnet_residuals_match_the_source(tiny_cond_unet):
    unet = tiny_cond_unet(0)
    staged = MultiStageUNet2DConditionModel.from_unet(unet, stage_boundaries=BOUNDARIES).eval()
    x, kwargs = _inputs(2)
    with torch.no_grad():
        # one residual per encoder skip (conv_in, down block 0 with its downsampler, down block 1), and the middle
        down = tuple(torch.randn(2, *shape) for shape in [(8, 8, 8), (8, 8, 8), (8, 4, 4), (16, 4, 4)])
        residuals = {
            "down_block_additional_residuals": down,
            "mid_block_additional_residual": torch.randn(2, 16, 4, 4),
        }
        expected = unet(x, 10, **kwargs, **residuals).sample
        assert torch.equal(staged(x, 10, **kwargs, **residuals).sample, expected)
        with pytest.raises(ValueError, match="pairs"):
            staged(x, 10, **kwargs, down_block_additional_residuals=down)


@pytest.mark.parametrize("controlnet", [False, True], ids=["adapter", "adapter+controlnet"])
def test_t2i_adapter_residuals_match_the_source(tiny_cond_unet, controlnet):
    # `down_intrablock_additional_residuals` (what StableDiffusionAdapterPipeline passes) were refused: T2I-Adapter
    # features join the shared encoder as in UNet2DConditionModel (after a plain down block, inside the last layer of
    # a cross-attention one, after the middle block when of its shape), also beside ControlNet residuals
    unet = tiny_cond_unet(0)
    staged = MultiStageUNet2DConditionModel.from_unet(unet, stage_boundaries=BOUNDARIES).eval()
    x, kwargs = _inputs(4)
    t = torch.tensor([10, 450, 900, 900])  # a mixed batch: the residuals reach every decoder's rows
    features = [torch.randn(4, *shape) for shape in [(8, 4, 4), (16, 4, 4), (16, 4, 4)]]  # block 0, 1, middle
    if controlnet:
        down = tuple(torch.randn(4, *shape) for shape in [(8, 8, 8), (8, 8, 8), (8, 4, 4), (16, 4, 4)])
        kwargs.update(down_block_additional_residuals=down, mid_block_additional_residual=torch.randn(4, 16, 4, 4))
    with torch.no_grad():
        plain = unet(x, t, **kwargs).sample
        expected = unet(x, t, **kwargs, down_intrablock_additional_residuals=[f.clone() for f in features]).sample
        assert not torch.allclose(expected, plain, atol=1e-3)
        given = list(features)
        out = staged(x, t, **kwargs, down_intrablock_additional_residuals=given).sample
        assert torch.allclose(out, expected, atol=1e-5)
        assert len(given) == 3 and all(a is b for a, b in zip(given, features))  # the caller's list is left as it is
        for stage in range(3):
            out = staged(x, 450, **kwargs, down_intrablock_additional_residuals=list(features), stage_index=stage)
            reference = unet(x, 450, **kwargs, down_intrablock_additional_residuals=list(features)).sample
            assert torch.equal(out.sample, reference)


def test_attention_processors_and_slicing(tiny_cond_unet):
    staged = MultiStageUNet2DConditionModel.from_unet(tiny_cond_unet(0), stage_boundaries=BOUNDARIES).eval()
    processors = staged.attn_processors
    assert any(name.startswith("decoders.2.up_blocks") for name in processors) and len(processors) == 4 * 4
    x, kwargs = _inputs(2)
    with torch.no_grad():
        reference = staged(x, 700, **kwargs).sample
        staged.set_attn_processor(AttnProcessor())
        assert {type(p) for p in staged.attn_processors.values()} == {AttnProcessor}
        assert torch.allclose(staged(x, 700, **kwargs).sample, reference, atol=1e-5)
        staged.set_attn_processor(AttnProcessor2_0())
        staged.set_default_attn_processor()
        assert {type(p) for p in staged.attn_processors.values()} == {AttnProcessor}
        staged.set_attention_slice(1)
        assert torch.allclose(staged(x, 700, **kwargs).sample, reference, atol=1e-5)


def test_freeu_and_fused_qkv_in_the_pipeline_act_on_every_decoder_as_on_the_source(tiny_sd_components):
    # `pipe.enable_freeu` raised AttributeError; `pipe.fuse_qkv_projections` set the fused processor on unfused
    # layers (AttributeError `to_qkv` at the first step)
    from diffusers import StableDiffusionPipeline

    source = StableDiffusionPipeline(**tiny_sd_components)
    staged = StableDiffusionPipeline(**tiny_sd_components)
    staged.unet = MultiStageUNet2DConditionModel.from_unet(source.unet, stage_boundaries=BOUNDARIES)
    for pipe in (source, staged):
        pipe.set_progress_bar_config(disable=True)

    def images(pipe):
        return pipe("a cat", num_inference_steps=3, generator=torch.manual_seed(0), output_type="latent").images

    plain = images(staged)
    for pipe in (source, staged):
        pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    assert all(block.b1 == 1.2 for decoder in staged.unet.decoders for block in decoder.up_blocks)
    freeu = images(staged)
    assert torch.equal(freeu, images(source)) and not torch.allclose(freeu, plain, atol=1e-3)
    for pipe in (source, staged):
        pipe.disable_freeu()
        pipe.fuse_qkv_projections(vae=False)  # one VAE in both pipelines: fused once would be enough
    layers = [m for m in staged.unet.modules() if isinstance(m, Attention)]
    assert len(layers) == 16 and all(hasattr(m, "to_kv" if m.is_cross_attention else "to_qkv") for m in layers)
    assert torch.allclose(images(staged), plain, atol=1e-5) and torch.equal(images(staged), images(source))
    for pipe in (source, staged):
        pipe.unfuse_qkv_projections(vae=False)
    assert torch.equal(images(staged), plain)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_cond_unet):
    x, kwargs = _inputs(2)
    grads = []
    for checkpointing in (False, True):
        staged = MultiStageUNet2DConditionModel.from_unet(tiny_cond_unet(0), stage_boundaries=BOUNDARIES).train()
        if checkpointing:
            staged.enable_gradient_checkpointing()
            assert staged.is_gradient_checkpointing
        staged(x, torch.tensor([100, 900]), **kwargs).sample.square().mean().backward()
        grads.append(staged.decoders[2].up_blocks[0].attentions[0].proj_out.weight.grad.clone())
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
def test_attention_masks_match_the_source(tiny_cond_unet, sdxl):
    # `encoder_attention_mask` (text tokens) and `attention_mask` (the self-attention's 4x4 = 16 tokens of the tiny
    # layout's one attending level) reach the shared encoder and each decoder's rows as the source's blocks take them
    unet = tiny_cond_unet(0, sdxl=sdxl)
    staged = MultiStageUNet2DConditionModel.from_unet(unet, stage_boundaries=BOUNDARIES).eval()
    x, kwargs = _inputs(3, sdxl)
    text_mask = torch.ones(3, 5)
    text_mask[0, 3:] = 0
    self_mask = torch.ones(3, 16)
    self_mask[2, :6] = 0
    masks = {"encoder_attention_mask": text_mask, "attention_mask": self_mask}
    with torch.no_grad():
        plain = unet(x, torch.tensor([10, 450, 900]), **kwargs).sample
        for name, mask in [*masks.items(), ("both", None)]:
            given = masks if mask is None else {name: mask}
            for t in (torch.tensor([10, 450, 900]), 450):  # a mixed batch, and one stage
                expected = unet(x, t, **kwargs, **given).sample
                assert torch.allclose(staged(x, t, **kwargs, **given).sample, expected, atol=1e-5), (name, t)
            assert not torch.allclose(expected, plain, atol=1e-4), name  # the mask acted


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
def test_warm_start_gradients_sum_to_the_source_gradients(tiny_cond_unet, sdxl):
    # a mixed training batch, gradient checkpointing on: the encoder's gradients are the source's down path's, and
    # each decoder's (its samples' share) sum over the decoders to the source's up path's
    unet = tiny_cond_unet(0, sdxl=sdxl).train()
    staged = MultiStageUNet2DConditionModel.from_unet(unet, stage_boundaries=BOUNDARIES).train()
    for model in (unet, staged):
        model.enable_gradient_checkpointing()
    x, kwargs = _inputs(4, sdxl)
    t = torch.tensor([100, 800, 450, 10])
    for model in (unet, staged):
        model(x, t, **kwargs).sample.square().mean().backward()
    summed = {}
    for name, parameter in staged.named_parameters():
        source_name = name.split(".", 2)[2] if name.startswith("decoders.") else name
        summed[source_name] = summed.get(source_name, 0) + parameter.grad
    expected = {name: parameter.grad for name, parameter in unet.named_parameters()}
    assert summed.keys() == expected.keys()
    for name, grad in expected.items():
        assert torch.allclose(summed[name], grad, atol=1e-6), name
    assert all(decoder.conv_out.weight.grad.abs().sum() > 0 for decoder in staged.decoders)  # every stage trained


def test_save_and_reload_is_identical_and_strict(tiny_cond_unet, tmp_path):
    staged = MultiStageUNet2DConditionModel(
        **_config(tiny_cond_unet(0)), stage_boundaries=(500,), decoder_block_out_channels=((16, 32), (4, 8))
    ).eval()
    staged.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = MultiStageUNet2DConditionModel.from_pretrained(tmp_path).eval()
    assert loaded.config.decoder_block_out_channels == [[16, 32], [4, 8]]
    x, kwargs = _inputs(2)
    with torch.no_grad():
        t = torch.tensor([100, 900])
        assert torch.equal(loaded(x, t, **kwargs).sample, staged(x, t, **kwargs).sample)
    # a checkpoint saved from another configuration is an error, never random weights
    config = json.loads((tmp_path / "config.json").read_text())
    config["decoder_block_out_channels"][1] = [8, 16]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match its config"):
        MultiStageUNet2DConditionModel.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"down_block_types": ("DownBlock2D", "SimpleCrossAttnDownBlock2D")}, "down_block_types"),
        ({"addition_embed_type": "image"}, "addition_embed_type"),
        ({"encoder_hid_dim": 16}, "encoder_hid_dim"),
        ({"attention_type": "gated"}, "attention_type"),
        ({"decoder_block_out_channels": ((8, 16),) * 2}, "one decoder per stage"),
        ({"decoder_block_out_channels": ((8, 16), (8, 16), (4, 6))}, "norm_num_groups"),
        ({"decoder_block_out_channels": ((8, 16), (8, 16), (4, 12)), "attention_head_dim": 8}, "attention heads"),
        ({"stage_boundaries": (600, 300)}, "`stage_boundaries` must be strictly increasing"),
        ({"decoder_up_block_types": (("CrossAttnUpBlock2D", "UpBlock2D"),) * 2}, "decoder_up_block_types"),
        ({"decoder_skip_adapters": "no"}, "decoder_skip_adapters"),
        ({"decoder_attention_head_dim": (2, 2)}, "decoder_attention_head_dim"),
        ({"decoder_attention_head_dim": (2, (2, 0), 2)}, "decoder_attention_head_dim"),
        ({"decoder_attention_head_dim": (2, 2, 3)}, "attention heads"),  # 16 channels do not split into 3 heads
        # an even kernel's padding shrinks the map: a shape error at the first forward; zero channels: empty layers
        ({"conv_in_kernel": 4}, "`conv_in_kernel` must be an odd positive integer"),
        ({"conv_out_kernel": 2}, "`conv_out_kernel` must be an odd positive integer"),
        ({"in_channels": 0}, "`in_channels` must be a positive integer"),
        ({"out_channels": 0}, "`out_channels` must be a positive integer"),
        # built silently before, failing only in torch at the first forward (a shape, type or division error)
        ({"layers_per_block": 0}, r"`layers_per_block` must be a positive integer or one per block, got 0"),
        ({"layers_per_block": (1, 0)}, r"`layers_per_block` must be .* got \(1, 0\)"),
        ({"layers_per_block": 1.0}, "`layers_per_block` must be a positive integer"),
        ({"attention_head_dim": 0}, "`attention_head_dim` must be a positive integer or one per block, got 0"),
        ({"norm_num_groups": 0}, "`norm_num_groups` must be a positive integer, got 0"),
        ({"norm_num_groups": None}, "`norm_num_groups` must be a positive integer, got None"),
        ({"sample_size": -3}, r"`sample_size` must be a positive integer, a \(height, width\) pair of them or None"),
        # built silently (NaN outputs; a failure in the first training forward only), as MultiStageUNet2DModel did
        ({"norm_eps": float("nan")}, r"`norm_eps` must be a positive finite number, got nan"),
        ({"norm_eps": -1e-5}, r"`norm_eps` must be a positive finite number, got -1e-05"),
        ({"dropout": float("nan")}, r"`dropout` must be a number in \[0, 1\), got nan"),
        ({"dropout": 1.0}, r"`dropout` must be a number in \[0, 1\), got 1.0"),
        # built silently, then a shape or type error in the first forward, or NaN outputs (the shared rules of
        # `check_options`, as MultiStageUNet2DModel's)
        ({"downsample_padding": -1}, r"`downsample_padding` must be an integer >= 0, got -1"),
        ({"freq_shift": "1"}, r"`freq_shift` must be a finite number, got '1'"),
        ({"freq_shift": float("nan")}, r"`freq_shift` must be a finite number, got nan"),
        (
            {"mid_block_scale_factor": float("nan")},
            r"`mid_block_scale_factor` must be a positive finite number, got nan",
        ),
        ({"resnet_out_scale_factor": 0}, r"`resnet_out_scale_factor` must be a positive finite number, got 0"),
        ({"center_input_sample": 1}, r"`center_input_sample` must be True or False, got 1"),
        ({"use_linear_projection": "no"}, r"`use_linear_projection` must be True or False, got 'no'"),  # was True
        ({"upcast_attention": "no"}, r"`upcast_attention` must be True or False, got 'no'"),
        ({"class_embeddings_concat": 1}, r"`class_embeddings_concat` must be True or False, got 1"),
        ({"resnet_skip_time_act": "yes"}, r"`resnet_skip_time_act` must be True or False, got 'yes'"),
        # the sinusoidal frequencies divide by (width // 2 - freq_shift): 0 made every output NaN, silently
        ({"freq_shift": 4}, r"`freq_shift`=4 must differ from 4, half .*block_out_channels"),
        ({"act_fn": None}, r"`act_fn` must be one of .*, got None"),  # was an AttributeError (None.lower())
        ({"time_embedding_act_fn": "foo"}, r"`time_embedding_act_fn` must be None or one of .*, got 'foo'"),
        ({"timestep_post_act": 1}, r"`timestep_post_act` must be None or one of .*, got 1"),
        (
            {"resnet_time_scale_shift": "foo"},
            r"`resnet_time_scale_shift` must be 'default' or 'scale_shift', got 'foo'",
        ),
        # sizes of zero built silently (a time embedding of the default width for 0, empty layers), negative or
        # float ones a RuntimeError or TypeError inside torch that named none
        ({"time_embedding_dim": 0}, r"`time_embedding_dim` must be a positive integer or None, got 0"),
        ({"time_cond_proj_dim": 0}, r"`time_cond_proj_dim` must be a positive integer or None, got 0"),
        ({"num_class_embeds": 0}, r"`num_class_embeds` must be a positive integer or None, got 0"),
        ({"num_class_embeds": -1}, r"`num_class_embeds` must be a positive integer or None, got -1"),
        ({"num_class_embeds": 2.0}, r"`num_class_embeds` must be a positive integer or None, got 2.0"),
        ({"addition_time_embed_dim": 0}, r"`addition_time_embed_dim` must be a positive integer or None, got 0"),
        (
            {"projection_class_embeddings_input_dim": 0},
            r"`projection_class_embeddings_input_dim` must be a positive integer or None, got 0",
        ),
        (
            {"cross_attention_dim": True},
            r"`cross_attention_dim` must be a positive integer or one per block, got True",
        ),
        ({"cross_attention_dim": (32, 0)}, r"`cross_attention_dim` must be .*, got \(32, 0\)"),
        # zero transformer layers built cross-attention blocks that attend to nothing; a float a TypeError
        (
            {"transformer_layers_per_block": 0},
            r"`transformer_layers_per_block` must be a positive integer or one per block .*, got 0",
        ),
        ({"transformer_layers_per_block": True}, r"`transformer_layers_per_block` must be .*, got True"),
        ({"transformer_layers_per_block": (1, 0)}, r"`transformer_layers_per_block` must be .*, got \(1, 0\)"),
        ({"transformer_layers_per_block": 1.5}, r"`transformer_layers_per_block` must be .*, got 1.5"),
        # a string was one flag per letter ("no": both blocks only cross-attention)
        ({"only_cross_attention": "no"}, r"`only_cross_attention` must be True or False or one per block, got 'no'"),
        (
            {"mid_block_only_cross_attention": 1},
            r"`mid_block_only_cross_attention` must be True, False or None, got 1",
        ),
        # an unknown class embedding was no class embedding, silently (as MultiStageUNet2DModel refuses it)
        ({"class_embed_type": "foo"}, r"`class_embed_type` must be one of .*, got 'foo'"),
        # decoders' up blocks are refused as the encoder's are (one ran, as a block no option supports)
        (
            {"decoder_up_block_types": (("AttnUpBlock2D", "UpBlock2D"),) * 3},
            "`decoder_up_block_types`=.* not supported",
        ),
        ({"decoder_up_block_types": (("Foo", "UpBlock2D"),) * 3}, "`decoder_up_block_types`=.* not supported"),
    ],
)
def test_bad_configurations_are_refused_by_name(tiny_cond_unet, overrides, match):
    with pytest.raises(ValueError, match=match):
        MultiStageUNet2DConditionModel(**{**_config(tiny_cond_unet(0)), "stage_boundaries": BOUNDARIES, **overrides})


# the authors' latent-diffusion decoders (`cin-mul*`): skips at the encoder's widths, attention at fewer levels,
# heads of a fixed width at every decoder width
AUTHORS_LAYOUT = dict(
    decoder_block_out_channels=((16, 32), (8, 16), (4, 8)),
    decoder_skip_adapters=False,
    decoder_up_block_types=(
        ("CrossAttnUpBlock2D", "UpBlock2D"),
        ("UpBlock2D", "UpBlock2D"),
        ("UpBlock2D", "UpBlock2D"),
    ),
    decoder_attention_head_dim=((4, 8), (2, 4), (1, 2)),  # 4-channel heads
)


def test_authors_decoders_take_the_encoder_skips_attend_at_their_own_levels_with_their_own_heads(tiny_cond_unet):
    torch.manual_seed(0)
    staged = MultiStageUNet2DConditionModel(
        **_config(tiny_cond_unet(0)), stage_boundaries=BOUNDARIES, **AUTHORS_LAYOUT
    ).eval()
    wide, _, narrow = staged.decoders
    # no adapters: each decoder starts from the 16-wide middle block and a 16-wide encoder skip
    assert all(isinstance(a, torch.nn.Identity) for a in [narrow.mid_adapter, *narrow.skip_adapters])
    assert narrow.up_blocks[0].resnets[0].conv1.in_channels == 16 + 16
    assert narrow.up_blocks[1].resnets[0].conv1.in_channels == 8 + 8  # its own 8 channels + the encoder's 8
    assert wide.up_blocks[0].resnets[0].conv1.in_channels == 16 + 16
    # attention where each decoder has it, with 4-channel heads at its own widths
    assert wide.up_blocks[0].attentions[0].transformer_blocks[0].attn1.heads == 8
    assert not any(hasattr(block, "attentions") for d in staged.decoders[1:] for block in d.up_blocks)
    x, kwargs = _inputs(3)
    with torch.no_grad():
        out = staged(x, torch.tensor([100, 450, 900]), **kwargs).sample
        for i, t in enumerate([100, 450, 900]):
            assert torch.allclose(
                out[i : i + 1], staged(x[i : i + 1], t, kwargs["encoder_hidden_states"][i : i + 1]).sample, atol=1e-5
            )


def test_decoders_without_adapters_at_the_encoder_widths_are_the_warm_start(tiny_cond_unet):
    unet = tiny_cond_unet(0)
    warm = MultiStageUNet2DConditionModel.from_unet(unet, stage_boundaries=BOUNDARIES).eval()
    plain = MultiStageUNet2DConditionModel(
        **_config(unet), stage_boundaries=BOUNDARIES, decoder_skip_adapters=False, decoder_attention_head_dim=(2, 2, 2)
    ).eval()
    plain.load_state_dict(warm.state_dict(), strict=True)  # the same layers under the same names
    x, kwargs = _inputs(3)
    t = torch.tensor([100, 450, 900])
    with torch.no_grad():
        assert torch.equal(plain(x, t, **kwargs).sample, warm(x, t, **kwargs).sample)


def test_authors_layout_saves_and_reloads(tiny_cond_unet, tmp_path):
    staged = MultiStageUNet2DConditionModel(
        **_config(tiny_cond_unet(0)), stage_boundaries=BOUNDARIES, **AUTHORS_LAYOUT
    )
    staged.save_pretrained(tmp_path)
    loaded = MultiStageUNet2DConditionModel.from_pretrained(tmp_path).eval()
    assert loaded.config.decoder_attention_head_dim == [[4, 8], [2, 4], [1, 2]]
    x, kwargs = _inputs(3)
    t = torch.tensor([100, 450, 900])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, **kwargs).sample, staged.eval()(x, t, **kwargs).sample)


def test_bad_inputs_are_refused_by_name(tiny_cond_unet):
    staged = MultiStageUNet2DConditionModel.from_unet(tiny_cond_unet(0, sdxl=True), stage_boundaries=BOUNDARIES)
    x, kwargs = _inputs(2, sdxl=True)
    with pytest.raises(ValueError, match="added_cond_kwargs"):
        staged(x, 10, kwargs["encoder_hidden_states"])
    with pytest.raises(ValueError, match="sample"):
        staged(x[:, :3], 10, **kwargs)
    with pytest.raises(ValueError, match="stage_index"):
        staged(x, 10, **kwargs, stage_index=3)
    with pytest.raises(ValueError, match="timestep"):
        staged(x, torch.tensor([10, 1001]), **kwargs)
    # each of these raised an error deep in torch (a shape error, a TypeError), or passed (boolean timesteps)
    text, added = kwargs["encoder_hidden_states"], kwargs["added_cond_kwargs"]
    for bad in (torch.tensor([1, 2, 3]), torch.tensor([[1], [2]]), None, "10", torch.tensor([True, False])):
        with pytest.raises(ValueError, match="`timestep` must"):
            staged(x, bad, **kwargs)
    for bad in (text[..., :16], text[:1], text[0], None):
        with pytest.raises(ValueError, match=r"`encoder_hidden_states` must be .* shape \(2, tokens, 64\)"):
            staged(x, 10, bad, added_cond_kwargs=added)
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        MultiStageUNet2DConditionModel.from_unet(torch.nn.Linear(2, 2))


def test_a_sample_of_another_dtype_is_named(tiny_cond_unet):
    # was torch's "Input type (double) and bias type (float) should be the same" from inside `conv_in`
    staged = MultiStageUNet2DConditionModel.from_unet(tiny_cond_unet(0), stage_boundaries=BOUNDARIES).eval()
    x, kwargs = _inputs(1)
    with pytest.raises(ValueError, match="`sample` must have the model's dtype torch.float32, got torch.float64"):
        staged(x.double(), 10, **kwargs)


def test_layerwise_casting_runs_and_stays_close(tiny_cond_unet):
    model = MultiStageUNet2DConditionModel.from_unet(tiny_cond_unet(), stage_boundaries=BOUNDARIES).eval()
    x, kwargs = _inputs(3)
    t = torch.tensor([10, 450, 900])

    def run(m, dtype):
        return m(x.to(dtype), t, encoder_hidden_states=kwargs["encoder_hidden_states"].to(dtype)).sample

    assert_layerwise_casting_works(model, run)


def test_a_text_mask_of_another_shape_is_named(tiny_cond_unet):
    # was a shape error from inside the attention (masks of the wrong length or batch), or an AttributeError (a list)
    staged = MultiStageUNet2DConditionModel.from_unet(tiny_cond_unet(0), stage_boundaries=BOUNDARIES).eval()
    x, kwargs = _inputs(2)
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        for good in (keep, keep.bool(), keep[:, None].float()):  # (batch, tokens) or (batch, 1, tokens), as diffusers
            staged(x, torch.tensor([10, 900]), **kwargs, encoder_attention_mask=good)
    for bad in (keep[:, :4], keep[:1], keep[0], keep[:, :, None], keep.tolist()):
        with pytest.raises(ValueError, match=r"`encoder_attention_mask` must be a tensor of shape \(2, 5\)"):
            staged(x, 10, **kwargs, encoder_attention_mask=bad)


def test_controlnet_residuals_of_another_count_are_named(tiny_cond_unet):
    # one too few was a shape error inside the first up block; one too many was dropped silently
    staged = MultiStageUNet2DConditionModel.from_unet(tiny_cond_unet(0), stage_boundaries=BOUNDARIES).eval()
    x, kwargs = _inputs(2)
    down = tuple(torch.randn(2, *shape) for shape in [(8, 8, 8), (8, 8, 8), (8, 4, 4), (16, 4, 4)])
    for bad in (down[:-1], (*down, down[-1])):
        with pytest.raises(ValueError, match=rf"`down_block_additional_residuals` must hold 4 .*got {len(bad)}"):
            staged(x, 10, **kwargs, down_block_additional_residuals=bad, mid_block_additional_residual=down[-1])


def test_class_labels_of_a_class_conditional_unet_are_checked_as_the_other_models_check_them(
    tiny_cond_unet, host_reads
):
    # an index out of range was torch's IndexError (a device-side assert on an accelerator); labels of another batch
    # a shape error in the time embedding's sum
    unet = tiny_cond_unet(0, num_class_embeds=3)
    staged = MultiStageUNet2DConditionModel.from_unet(unet, stage_boundaries=BOUNDARIES).eval()
    x, kwargs = _inputs(2)
    with torch.no_grad():
        for good in (torch.tensor([0, 2]), torch.tensor([1]), torch.tensor(1)):  # one per sample, or one for all
            expected = unet(x, torch.tensor([10, 900]), **kwargs, class_labels=good).sample
            assert torch.allclose(
                staged(x, torch.tensor([10, 900]), **kwargs, class_labels=good).sample, expected, atol=1e-5
            )
        for bad, match in (
            (torch.tensor([0, 3]), r"`class_labels` must be class indices in \[0, 3\), got \[0, 3\]"),
            (torch.tensor([0, 1, 2]), r"`class_labels` must hold one label or one per sample \(2\)"),
            (torch.tensor([0.0, 1.0]), r"`class_labels` must be integer class indices"),
            (None, r"`class_labels` must be given"),
        ):
            with pytest.raises(ValueError, match=match):
                staged(x, 10, **kwargs, class_labels=bad)
        # the pipelines' per-step call (a stage index) reads no tensor value for the check
        labels = torch.tensor([0, 2])
        assert host_reads(lambda: staged(x, 10, **kwargs, class_labels=labels, stage_index=0)) == 0


def test_one_class_label_as_a_number_tensor_serves_a_timestep_class_embedding(tiny_cond_unet):
    # a 0-d label failed diffusers' `Timesteps` assertion ("should be a 1d-array")
    unet = tiny_cond_unet(0, class_embed_type="timestep")
    staged = MultiStageUNet2DConditionModel.from_unet(unet, stage_boundaries=BOUNDARIES).eval()
    x, kwargs = _inputs(2)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        expected = unet(x, t, **kwargs, class_labels=torch.tensor([7])).sample
        assert torch.allclose(staged(x, t, **kwargs, class_labels=torch.tensor(7)).sample, expected, atol=1e-5)


def test_boundaries_given_as_a_numpy_array_save_and_reload(tiny_cond_unet, tmp_path):
    # `from_unet` turned the array into numpy integers: save_pretrained raised "not JSON serializable"
    staged = MultiStageUNet2DConditionModel.from_unet(tiny_cond_unet(0), stage_boundaries=np.array(BOUNDARIES))
    staged.save_pretrained(tmp_path)
    loaded = MultiStageUNet2DConditionModel.from_pretrained(tmp_path)
    assert loaded.partition.boundaries == staged.partition.boundaries == (300.0, 600.0)


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
def test_group_offload_gives_the_same_outputs(tiny_cond_unet, tmp_path, sdxl):
    # diffusers' `enable_group_offload`: the shared encoder and every stage's decoder, on a batch across the stages
    # and on one stage's (a sampling step's); groups of several decoders are refused (see the shared tester)
    model = MultiStageUNet2DConditionModel.from_unet(tiny_cond_unet(0, sdxl=sdxl), stage_boundaries=BOUNDARIES).eval()
    x, kwargs = _inputs(3, sdxl)
    t = torch.tensor([10, 450, 900])

    def run(m):
        return torch.cat([m(x, t, **kwargs).sample, m(x, 450, **kwargs).sample, m(x, 900, **kwargs).sample])

    assert_group_offload_keeps_outputs(model, run, tmp_path, blocks_per_group=(1,))
    with pytest.raises(ValueError, match="`num_blocks_per_group`=2 would put several of .*`decoders`"):
        model.enable_group_offload(torch.device("cpu"), offload_type="block_level", num_blocks_per_group=2)


def test_a_numpy_float_timestep_is_taken_as_its_value(tiny_cond_unet):
    # the routing took np.float32(450.5) (a real number, as MultiStageUNet2DModel does), but the time embedding was
    # built from the raw number by diffusers' get_time_embed, which raised "TypeError: 'numpy.float32' object cannot
    # be interpreted as an integer"
    staged = MultiStageUNet2DConditionModel.from_unet(tiny_cond_unet(0), stage_boundaries=BOUNDARIES).eval()
    x, kwargs = _inputs(2)
    with torch.no_grad():
        expected = staged(x, 450.5, **kwargs).sample
        assert torch.equal(staged(x, np.float32(450.5), **kwargs).sample, expected)
        assert torch.equal(staged(x, np.float32(450.5), **kwargs, stage_index=1).sample, expected)


@pytest.mark.parametrize("label", [torch.tensor(3), torch.tensor([3])], ids=["0-d", "one"])
def test_one_class_label_for_the_batch_with_concatenated_class_embeddings(tiny_cond_unet, label):
    # one label for the whole batch is accepted (check_class_labels) and broadcast where the class embedding is added,
    # but with `class_embeddings_concat=True` it failed inside torch.cat ("Tensors must have same number of
    # dimensions" / "Sizes of tensors must match")
    unet = tiny_cond_unet(0, num_class_embeds=5, class_embeddings_concat=True)
    staged = MultiStageUNet2DConditionModel.from_unet(unet, stage_boundaries=BOUNDARIES).eval()
    x, kwargs = _inputs(2)
    with torch.no_grad():
        for t in (450, torch.tensor([10, 900])):
            expected = staged(x, t, class_labels=torch.tensor([3, 3]), **kwargs).sample
            assert torch.equal(staged(x, t, class_labels=label, **kwargs).sample, expected)


def test_a_cpu_tensor_of_timesteps_reaches_a_model_on_the_accelerator(tiny_cond_unet):
    # one timestep per sample as a CPU tensor (what a user's loop often holds) with the model and the latents on the
    # GPU: the routing moved them, but the time embedding was built from the caller's CPU tensor (diffusers'
    # get_time_embed moves a 0-d tensor only): a device mismatch in the time embedding's first linear layer
    from tests.fake_cuda import fake_cuda

    staged = MultiStageUNet2DConditionModel.from_unet(tiny_cond_unet(0), stage_boundaries=BOUNDARIES).eval()
    x, kwargs = _inputs(2)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        expected = staged(x, t, **kwargs).sample
        with fake_cuda():
            staged.to("cuda")
            out = staged(x.to("cuda"), t, encoder_hidden_states=kwargs["encoder_hidden_states"].to("cuda")).sample
            out = out.cpu()
    assert torch.allclose(out, expected, atol=1e-6)
