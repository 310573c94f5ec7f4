"""Checkpoints of the public multi-stage code (LucasYFL/Multistage_Diffusion) -> MultiStagePipeline folders.

The state dicts here are generated from the original `UNetModel_multistage`'s parameter names and shapes, as read
from its source (`latent-diffusion/ldm/modules/diffusionmodules/openaimodel.py`), at a tiny size. Setting
MULTISTAGE_DIFFUSION_REPO to a checkout's `latent-diffusion` folder also runs the original model (`--verify`).
"""

import os
import re

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from diffusers_stages import MultiStagePipeline
from diffusers_stages.conversion import original_multistage
from diffusers_stages.conversion.multistage_to_unet import multistage_stage_to_unet

TINY = dict(
    image_size=8,
    in_channels=3,
    out_channels=3,
    model_channels=32,
    num_res_blocks=1,
    attention_resolutions=[],
    channel_mult=[1, 2],
    num_head_channels=16,
    de_nfs=[32, 32, 32],
    stage_interval=[442, 631, 1000],
    stage_num=3,
)
# tailored decoders (wider, encoder-wide, narrower than the 64-wide encoder), as every published config has
TAILORED = {**TINY, "model_channels": 64, "de_nfs": [96, 64, 32]}
ATTN, PLAIN = "AttnUpBlock2D", "UpBlock2D"
# (overrides, each decoder's up block types): where the original's carried-over counter makes decoders attend
CONFIGS = {
    "plain": ({}, None),
    "class-conditional": ({"num_classes": 5}, None),
    "attention-heads": ({"channel_mult": [1], "attention_resolutions": [1], "num_head_channels": 8}, None),
    "attention-one-head": (
        {"channel_mult": [1], "attention_resolutions": [1], "num_heads": 1, "num_head_channels": -1},
        None,
    ),
    "tailored": (TAILORED, None),
    "tailored-attention-decoder-0-only": (
        {**TAILORED, "attention_resolutions": [2]},
        ((ATTN, PLAIN), (PLAIN, PLAIN), (PLAIN, PLAIN)),
    ),
    "tailored-attention-at-1": (
        {**TAILORED, "attention_resolutions": [1, 2], "num_classes": 5},
        ((ATTN, ATTN), (ATTN, PLAIN), (PLAIN, PLAIN)),
    ),
    # the class-conditional ImageNet configs: spatial transformers attending to a ClassEmbedder's context
    "cin-mul": (  # `cin-mul*`: 3 levels attending everywhere, heads of `num_head_channels` at every width
        {**TAILORED, "channel_mult": [1, 2, 4], "attention_resolutions": [4, 2, 1], "num_head_channels": 16,
         "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 24},
        (("CrossAttnUpBlock2D",) * 3, ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"), ("UpBlock2D",) * 3),
    ),
    "cin256-v2-mul": (  # one head of the whole width, no attention at the top level, decoder 1 nowhere
        {**TAILORED, "channel_mult": [1, 2, 3], "attention_resolutions": [4, 2], "num_heads": 1,
         "num_head_channels": -1, "use_spatial_transformer": True, "transformer_depth": 2, "context_dim": 24},
        (("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), ("UpBlock2D",) * 3, ("UpBlock2D",) * 3),
    ),
}  # fmt: skip
CLASSES = 10  # the ClassEmbedder's classes in the cross-attention configs


def resblock(prefix: str, cin: int, cout: int, emb: int, scale_shift: bool = False) -> dict:
    shapes = {
        "in_layers.0.weight": (cin,),
        "in_layers.0.bias": (cin,),
        "in_layers.2.weight": (cout, cin, 3, 3),
        "in_layers.2.bias": (cout,),
        "emb_layers.1.weight": ((2 if scale_shift else 1) * cout, emb),
        "emb_layers.1.bias": ((2 if scale_shift else 1) * cout,),
        "out_layers.0.weight": (cout,),
        "out_layers.0.bias": (cout,),
        "out_layers.3.weight": (cout, cout, 3, 3),
        "out_layers.3.bias": (cout,),
    }
    if cin != cout:
        shapes.update({"skip_connection.weight": (cout, cin, 1, 1), "skip_connection.bias": (cout,)})
    return {f"{prefix}.{k}": v for k, v in shapes.items()}


def attention_block(prefix: str, c: int) -> dict:
    shapes = {
        "norm.weight": (c,),
        "norm.bias": (c,),
        "qkv.weight": (3 * c, c, 1),
        "qkv.bias": (3 * c,),
        "proj_out.weight": (c, c, 1),
        "proj_out.bias": (c,),
    }
    return {f"{prefix}.{k}": v for k, v in shapes.items()}


def spatial_transformer(prefix: str, c: int, p: dict) -> dict:
    """ldm's SpatialTransformer at width ``c``: ``c // num_head_channels`` heads (or ``num_heads``) of ``c // heads``
    channels, ``transformer_depth`` blocks of self-attention, cross-attention to ``context_dim`` and a GEGLU."""
    heads = c // p["num_head_channels"] if p.get("num_head_channels", -1) != -1 else p["num_heads"]
    inner, context = heads * (c // heads), p["context_dim"]
    shapes = {"norm.weight": (c,), "norm.bias": (c,), "proj_in.weight": (inner, c, 1, 1), "proj_in.bias": (inner,)}
    for d in range(p["transformer_depth"]):
        block = {
            "attn1.to_q.weight": (inner, inner),
            "attn1.to_k.weight": (inner, inner),
            "attn1.to_v.weight": (inner, inner),
            "attn1.to_out.0.weight": (inner, inner),
            "attn1.to_out.0.bias": (inner,),
            "attn2.to_q.weight": (inner, inner),
            "attn2.to_k.weight": (inner, context),
            "attn2.to_v.weight": (inner, context),
            "attn2.to_out.0.weight": (inner, inner),
            "attn2.to_out.0.bias": (inner,),
            "ff.net.0.proj.weight": (inner * 8, inner),
            "ff.net.0.proj.bias": (inner * 8,),
            "ff.net.2.weight": (inner, inner * 4),
            "ff.net.2.bias": (inner,),
            **{f"norm{i}.{w}": (inner,) for i in (1, 2, 3) for w in ("weight", "bias")},
        }
        shapes.update({f"transformer_blocks.{d}.{k}": v for k, v in block.items()})
    shapes.update({"proj_out.weight": (c, inner, 1, 1), "proj_out.bias": (c,)})
    return {f"{prefix}.{k}": v for k, v in shapes.items()}


def original_shapes(p: dict) -> dict:
    """Names and shapes of `UNetModel_multistage(**p)`'s state dict (2D, conv resampling)."""
    mc, emb, nrb = p["model_channels"], 4 * p["model_channels"], p["num_res_blocks"]
    scale_shift = p.get("use_scale_shift_norm", False)

    def attention(prefix: str, c: int) -> dict:  # an AttentionBlock, or a SpatialTransformer
        return spatial_transformer(prefix, c, p) if p.get("use_spatial_transformer") else attention_block(prefix, c)

    shapes = {
        "time_embed.0.weight": (emb, mc),
        "time_embed.0.bias": (emb,),
        "time_embed.2.weight": (emb, emb),
        "time_embed.2.bias": (emb,),
        "input_blocks.0.0.weight": (mc, p["in_channels"], 3, 3),
        "input_blocks.0.0.bias": (mc,),
    }
    if p.get("num_classes"):
        shapes["label_emb.weight"] = (p["num_classes"], emb)
    skips, ch, ds, index = [mc], mc, 1, 1
    for level, mult in enumerate(p["channel_mult"]):  # encoder
        for _ in range(nrb):
            shapes.update(resblock(f"input_blocks.{index}.0", ch, mult * mc, emb, scale_shift))
            ch = mult * mc
            if ds in p["attention_resolutions"]:
                shapes.update(attention(f"input_blocks.{index}.1", ch))
            skips.append(ch)
            index += 1
        if level < len(p["channel_mult"]) - 1:
            shapes.update(
                {f"input_blocks.{index}.0.op.weight": (ch, ch, 3, 3), f"input_blocks.{index}.0.op.bias": (ch,)}
            )
            skips.append(ch)
            index, ds = index + 1, ds * 2
    shapes.update(resblock("middle_block.0", ch, ch, emb, scale_shift))
    shapes.update(attention("middle_block.1", ch))
    shapes.update(resblock("middle_block.2", ch, ch, emb, scale_shift))
    top = ch
    for s, nf in enumerate(p["de_nfs"]):  # decoders; `ds` carries over from one decoder to the next, as there
        pending, ch, index = list(skips), top, 0
        for level, mult in reversed(list(enumerate(p["channel_mult"]))):
            for i in range(nrb + 1):
                shapes.update(resblock(f"de_modules.{s}.{index}.0", ch + pending.pop(), nf * mult, emb, scale_shift))
                ch, layer = nf * mult, 1
                if ds in p["attention_resolutions"]:
                    shapes.update(attention(f"de_modules.{s}.{index}.1", ch))
                    layer = 2
                if level and i == nrb:
                    shapes.update(
                        {
                            f"de_modules.{s}.{index}.{layer}.conv.weight": (ch, ch, 3, 3),
                            f"de_modules.{s}.{index}.{layer}.conv.bias": (ch,),
                        }
                    )
                    ds //= 2
                index += 1
        shapes.update(
            {
                f"outs.{s}.0.weight": (ch,),
                f"outs.{s}.0.bias": (ch,),
                f"outs.{s}.2.weight": (p["out_channels"], nf, 3, 3),
                f"outs.{s}.2.bias": (p["out_channels"],),
            }
        )
    return shapes


def ema_key(name: str) -> str:
    """LitEma's buffer name for the U-Net weight ``name``: the DiffusionWrapper's parameter name without dots."""
    return "model_ema." + f"diffusion_model.{name}".replace(".", "")


def write_source(tmp_path, p: dict, edit=None, ema: bool = True, use_ema: bool | None = None) -> tuple[str, str]:
    """A Lightning state dict as the authors' training writes it: raw U-Net weights under `model.diffusion_model.`,
    with ``ema`` LitEma's (other values) under their dot-free names, and LitEma's decay and update count."""
    torch.manual_seed(0)
    state = {f"model.diffusion_model.{k}": torch.randn(shape) * 0.1 for k, shape in original_shapes(p).items()}
    state["first_stage_model.decoder.conv_out.weight"] = torch.zeros(1)  # the wrapper's other modules are ignored
    if p.get("use_spatial_transformer"):  # the ClassEmbedder: trained, outside LitEma
        state["cond_stage_model.embedding.weight"] = torch.randn(CLASSES, p["context_dim"])
    if edit:
        edit(state)
    if ema:
        unet = [k[len("model.diffusion_model.") :] for k in state if k.startswith("model.diffusion_model.")]
        state.update({ema_key(k): torch.randn_like(state[f"model.diffusion_model.{k}"]) * 0.1 for k in unet})
        state.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)})
    checkpoint, config = str(tmp_path / "last.safetensors"), str(tmp_path / "config.yaml")
    save_file(state, checkpoint)
    unet_config = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel_multistage", "params": p}
    params = {"timesteps": 1000, "linear_start": 0.0015, "linear_end": 0.0195, "unet_config": unet_config}
    if p.get("use_spatial_transformer"):
        embedder = "ldm.modules.encoders.modules.ClassEmbedder"
        params["conditioning_key"] = "crossattn"
        params["cond_stage_config"] = {
            "target": embedder,
            "params": {"embed_dim": p["context_dim"], "n_classes": CLASSES},
        }
    if use_ema is not None:
        params["use_ema"] = use_ema
    with open(config, "w") as f:
        yaml.safe_dump({"model": {"params": params}}, f)
    return checkpoint, config


def convert(tmp_path, p, *extra, edit=None, ema=True, use_ema=None):
    checkpoint, config = write_source(tmp_path, p, edit, ema, use_ema)
    argv = ["--checkpoint", checkpoint, "--original_config", config, "--output_path", str(tmp_path / "out"), *extra]
    return original_multistage.main(original_multistage.parse_args(argv))


@pytest.mark.parametrize("name", CONFIGS)
def test_converts_with_every_tensor_placed(tmp_path, name):
    overrides, up_block_types = CONFIGS[name]
    p = {**TINY, **overrides}
    # (a `num_classes` model's last class named the unconditional label: converted as is, no embedding appended)
    label = ["--unconditional_label", str(p["num_classes"] - 1)] if p.get("num_classes") else []
    pipe = convert(tmp_path, p, "--verify", *label)
    reloaded = MultiStagePipeline.from_pretrained(str(tmp_path / "out"))
    assert reloaded.partition.boundaries == (442.0, 631.0)
    config = reloaded.unet.config
    assert [list(w) for w in config.decoder_block_out_channels] == [
        [nf * m for m in p["channel_mult"]] for nf in p["de_nfs"]
    ]
    if up_block_types is not None:
        assert [tuple(t) for t in config.decoder_up_block_types] == list(up_block_types)
    assert reloaded.scheduler.config.beta_schedule == "scaled_linear"
    total = sum(torch.Size(s).numel() for s in original_shapes(p).values())
    assert sum(t.numel() for t in pipe.unet.state_dict().values()) == total  # nothing dropped, nothing invented
    assert torch.equal(pipe.unet.state_dict()["conv_in.weight"], reloaded.unet.state_dict()["conv_in.weight"])


def test_attention_qkv_is_split_per_head(tmp_path):
    p = {**TINY, "channel_mult": [1], "attention_resolutions": [1], "num_head_channels": 8}
    checkpoint, _ = write_source(tmp_path, p)
    qkv = load_file(checkpoint)[ema_key("middle_block.1.qkv.weight")].squeeze(-1)
    pipe = convert(tmp_path, p)
    attn = pipe.unet.mid_block.attentions[0]
    # legacy order: per head of 8 channels, 24 rows = (q, k, v) of that head
    assert torch.equal(attn.to_k.weight[8:16], qkv[24 + 8 : 24 + 16])
    assert torch.equal(attn.to_q.weight[:8], qkv[:8]) and torch.equal(attn.to_v.weight[:8], qkv[16:24])


def test_tailored_decoder_takes_the_encoder_skips_unadapted(tmp_path):
    p = CONFIGS["tailored-attention-at-1"][0]
    checkpoint, _ = write_source(tmp_path, p)
    first = load_file(checkpoint)[ema_key("de_modules.2.0.0.in_layers.2.weight")]
    decoder = convert(tmp_path, p).unet.decoders[2]
    # decoder 2 (32 wide, 64 at its deepest level) starts from the middle block's 128 channels + a 128-wide skip
    assert first.shape == (64, 256, 3, 3)
    assert torch.equal(decoder.up_blocks[0].resnets[0].conv1.weight, first)
    assert all(isinstance(a, torch.nn.Identity) for a in [decoder.mid_adapter, *decoder.skip_adapters])
    assert not hasattr(decoder.up_blocks[0], "attentions")  # the original's decoder 2 never attends


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"use_scale_shift_norm": True}, "use_scale_shift_norm"),
        ({"num_heads": 2, "num_head_channels": -1}, "fixed head count"),
    ],
    ids=["scale-shift", "fixed-heads"],
)
def test_architectures_without_an_exact_equivalent_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        convert(tmp_path, {**TINY, **overrides})
    assert not (tmp_path / "out").exists()


def test_missing_and_unexpected_keys_are_refused(tmp_path):
    with pytest.raises(ValueError, match="lacks 'outs.1.2.bias'"):
        convert(tmp_path, TINY, edit=lambda s: s.pop("model.diffusion_model.outs.1.2.bias"))
    with pytest.raises(ValueError, match="keys the original architecture does not.*de_modules.0.99"):
        convert(
            tmp_path, TINY, edit=lambda s: s.update({"model.diffusion_model.de_modules.0.99.0.weight": torch.zeros(1)})
        )
    assert not (tmp_path / "out").exists()


def test_attention_layout_disagreeing_with_the_config_is_refused(tmp_path):
    p = {**TAILORED, "attention_resolutions": [2]}  # decoder 1 has no attention: give it decoder 0's
    extra = attention_block("model.diffusion_model.de_modules.1.0.1", 192)

    def edit(state):
        state.update({k: torch.zeros(shape) for k, shape in extra.items()})

    with pytest.raises(ValueError, match=r"needs: 0 missing.*10 unexpected.*decoders\.1\.up_blocks\.0\.attentions"):
        convert(tmp_path, p, edit=edit)
    assert not (tmp_path / "out").exists()


def test_edm_checkpoint_is_sent_to_its_own_script(tmp_path):
    checkpoint = str(tmp_path / "edm.safetensors")
    save_file({"map_layer0.weight": torch.zeros(4, 4), "enc.8x8_conv.weight": torch.zeros(4, 3, 3, 3)}, checkpoint)
    _, config = write_source(tmp_path, TINY)
    argv = ["--checkpoint", checkpoint, "--original_config", config, "--output_path", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=r"EDM `MultistageUNet`.*conversion.original_multistage_edm"):
        original_multistage.main(original_multistage.parse_args(argv))


@pytest.mark.skipif(
    not os.environ.get("MULTISTAGE_DIFFUSION_REPO"), reason="set MULTISTAGE_DIFFUSION_REPO to run the original"
)
@pytest.mark.parametrize("name", CONFIGS)
def test_matches_the_original_model(tmp_path, name):
    pytest.importorskip("einops")
    p = {**TINY, **CONFIGS[name][0]}
    convert(tmp_path, p, "--verify", "--original_repo", os.environ["MULTISTAGE_DIFFUSION_REPO"])


def test_encoder_wide_stage_exports_to_a_plain_unet(tmp_path):
    # decoder 1 has the encoder's widths but, unlike decoder 0, no attention: it exports with its own block types
    pipe = convert(tmp_path, {**TAILORED, "attention_resolutions": [2]})
    unet = multistage_stage_to_unet(pipe.unet, stage=1)
    assert unet.config.up_block_types == ("UpBlock2D", "UpBlock2D")
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([500, 600])
    with torch.no_grad():
        assert torch.allclose(unet(x, t).sample, pipe.unet(x, t).sample, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# EMA weights (LitEma) and the authors' DDIM sampler
def convert_files(checkpoint: str, config: str, out, *extra):
    argv = ["--checkpoint", checkpoint, "--original_config", config, "--output_path", str(out), *extra]
    return original_multistage.main(original_multistage.parse_args(argv))


def forward(pipe, stage_timestep: int) -> torch.Tensor:
    x, t = torch.randn(2, 3, 8, 8, generator=torch.manual_seed(1)), torch.full((2,), stage_timestep)
    with torch.no_grad():
        return pipe.unet(x, t).sample


def test_ema_weights_are_converted_by_default_and_raw_ones_with_no_ema(tmp_path):
    checkpoint, config = write_source(tmp_path, TINY)
    state = load_file(checkpoint)
    ema_pipe = convert_files(checkpoint, config, tmp_path / "ema")
    raw_pipe = convert_files(checkpoint, config, tmp_path / "raw", "--no_ema")
    # the references: the EMA tensors, and the raw ones, each as the only weights of a checkpoint trained without EMA
    raw_names = [k[len("model.diffusion_model.") :] for k in state if k.startswith("model.diffusion_model.")]
    references = {}
    for kind in ("ema", "raw"):
        folder = tmp_path / f"{kind}-reference"
        folder.mkdir()
        weights = {
            f"model.diffusion_model.{k}": state[ema_key(k) if kind == "ema" else f"model.diffusion_model.{k}"]
            for k in raw_names
        }
        reference, reference_config = write_source(folder, TINY, use_ema=False)
        save_file(weights, reference)  # in place of write_source's weights
        references[kind] = convert_files(reference, reference_config, folder / "out")
    for t in (100, 500, 900):  # one timestep in each stage
        assert torch.equal(forward(ema_pipe, t), forward(references["ema"], t))
        assert torch.equal(forward(raw_pipe, t), forward(references["raw"], t))
        assert (forward(ema_pipe, t) - forward(raw_pipe, t)).abs().max() > 1e-3  # the two really differ


def test_checkpoint_without_ema_weights(tmp_path, capsys):
    # the config trains with EMA (`use_ema` defaults to true): refused, pointing to --no_ema
    with pytest.raises(ValueError, match=r"no EMA weights \(model_ema\.\*\).*--no_ema"):
        convert(tmp_path, TINY, ema=False)
    assert not (tmp_path / "out").exists()
    convert(tmp_path, TINY, "--no_ema", ema=False)
    # trained without EMA: the raw weights are what the authors sample with
    (tmp_path / "no-ema-config").mkdir()
    pipe = convert(tmp_path / "no-ema-config", TINY, ema=False, use_ema=False)
    assert "use_ema: false" in capsys.readouterr().out
    state = load_file(str(tmp_path / "no-ema-config" / "last.safetensors"))
    assert torch.equal(pipe.unet.conv_in.weight, state["model.diffusion_model.input_blocks.0.0.weight"])


def test_ema_weights_not_matching_the_raw_ones_are_refused(tmp_path):
    def drop_one(state):
        state.pop(ema_key("outs.1.2.bias"))

    checkpoint, config = write_source(tmp_path, TINY)
    state = load_file(checkpoint)
    drop_one(state)
    save_file(state, checkpoint)
    with pytest.raises(ValueError, match=r"1 raw weights without an EMA \(first: \['outs.1.2.bias'\]\)"):
        convert_files(checkpoint, config, tmp_path / "out")
    only_ema = {k: v for k, v in state.items() if not k.startswith("model.diffusion_model.")}
    save_file(only_ema, checkpoint)
    with pytest.raises(ValueError, match="no raw U-Net weights"):
        convert_files(checkpoint, config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_ema_names_that_lose_their_dots_to_the_same_string_are_refused():
    unet = {"input_blocks.1.10.weight": torch.zeros(1), "input_blocks.11.0.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="both map to the EMA name 'model_ema.diffusion_modelinput_blocks110weight'"):
        original_multistage.ema_weights(unet, {ema_key(k): v for k, v in unet.items()})


@pytest.mark.parametrize("steps", [20, 50])
def test_default_scheduler_is_the_authors_ddim(tmp_path, steps):
    convert(tmp_path, TINY)
    scheduler = MultiStagePipeline.from_pretrained(str(tmp_path / "out")).scheduler
    assert type(scheduler).__name__ == "DDIMScheduler"
    assert scheduler.config.steps_offset == 1 and not scheduler.config.set_alpha_to_one
    scheduler.set_timesteps(steps)
    # ldm.modules.diffusionmodules.util.make_ddim_timesteps("uniform"): range(0, T, T // steps) + 1, run backwards
    authors = [t + 1 for t in range(0, 1000, 1000 // steps)][::-1]
    assert scheduler.timesteps.tolist() == authors
    # the previous alpha of the last step is alphas_cumprod[0] (make_ddim_sampling_parameters), not 1
    assert scheduler.final_alpha_cumprod == scheduler.alphas_cumprod[0]


# --------------------------------------------------------------------------------------------------------------
# class-conditional cross-attention models (`cin-mul*`): the ClassEmbedder becomes the pipeline's class_embedder
def test_class_embedder_becomes_the_context_and_gets_an_unconditional_label(tmp_path, capsys):
    p = {**TINY, **CONFIGS["cin-mul"][0]}
    checkpoint, _ = write_source(tmp_path, p)
    weight = load_file(checkpoint)["cond_stage_model.embedding.weight"]
    pipe = convert(tmp_path, p)
    assert "never trained" in capsys.readouterr().out
    embedder = pipe.class_embedder
    assert embedder.config.num_class_embeds == CLASSES + 1  # every original class is a data class; 10 is added
    assert torch.equal(embedder.embedding.weight[:CLASSES], weight) and not embedder.embedding.weight[CLASSES].any()
    heads = [[a.transformer_blocks[0].attn1.heads for b in d.up_blocks for a in getattr(b, "attentions", [])]
             for d in pipe.unet.decoders]  # fmt: skip
    assert heads == [[24, 24, 12, 12, 6, 6], [16, 16], []]  # 16-channel heads: decoder 0 at 384, 192, 96; 1 at 256
    images = pipe(class_labels=[0, CLASSES - 1], num_inference_steps=2, generator=torch.manual_seed(0))
    assert len(images.images) == 2


def test_unconditional_label_of_the_original_is_kept_when_it_is_the_last_class(tmp_path):
    p = {**TINY, **CONFIGS["cin256-v2-mul"][0]}
    pipe = convert(tmp_path, p, "--unconditional_label", str(CLASSES - 1))
    assert pipe.class_embedder.config.num_class_embeds == CLASSES  # as the original: 9 classes + label 9
    with pytest.raises(ValueError, match="must be the last class"):
        convert(tmp_path, p, "--unconditional_label", "3", "--overwrite")
    with pytest.raises(ValueError, match="applies to class-conditional models only"):
        convert(tmp_path, TINY, "--unconditional_label", "3", "--overwrite")


def test_a_num_classes_model_keeps_every_class_unless_its_last_is_named_the_unconditional_label(tmp_path, capsys):
    """A `num_classes` model (a class embedding added to the time embedding) was converted as is, its last class
    silently becoming the pipeline's unconditional label (unsampleable). As the ClassEmbedder of `cin-mul*`: every
    class is a data class and an untrained zero label is appended, unless `--unconditional_label` names the last."""
    p = {**TINY, "num_classes": 5}
    checkpoint, _ = write_source(tmp_path, p)
    weight = load_file(checkpoint)[ema_key("label_emb.weight")]
    pipe = convert(tmp_path, p, "--verify")
    assert "never trained" in capsys.readouterr().out
    assert pipe.unet.config.num_class_embeds == 6
    embedding = pipe.unet.class_embedding.weight
    assert torch.equal(embedding[:5], weight) and not embedding[5].any()
    pipe.set_progress_bar_config(disable=True)
    assert pipe(class_labels=[4], num_inference_steps=2, output_type="np").images.shape == (1, 8, 8, 3)
    kept = convert(tmp_path, p, "--unconditional_label", "4", "--overwrite", "--verify")
    assert kept.unet.config.num_class_embeds == 5
    x, t, labels = torch.randn(2, 3, 8, 8), torch.tensor([100, 700]), torch.tensor([0, 3])
    with torch.no_grad():  # the data classes compute the same either way
        assert torch.equal(pipe.unet(x, t, class_labels=labels).sample, kept.unet(x, t, class_labels=labels).sample)
    with pytest.raises(ValueError, match=r"`--unconditional_label` must be the last class \(4\).*got 2"):
        convert(tmp_path, p, "--unconditional_label", "2", "--overwrite")
    with pytest.raises(ValueError, match="`--unconditional_label` applies to class-conditional models only"):
        convert(tmp_path, TINY, "--unconditional_label", "3", "--overwrite")


@pytest.mark.parametrize(
    ("edit_params", "edit_state", "match"),
    [
        (lambda params: params.update(conditioning_key="concat"), None, "ClassEmbedder context only"),
        (lambda params: params["cond_stage_config"].update(target="ldm.BERTEmbedder"), None, "ClassEmbedder"),
        (None, lambda state: state.pop("cond_stage_model.embedding.weight"), "whole LatentDiffusion state dict"),
        (None, lambda state: state.update({"cond_stage_model.embedding.weight": torch.zeros(3, 24)}), "shape"),
        (lambda params: params["unet_config"]["params"].update(context_dim=[24]), None, "`context_dim`"),
        (lambda params: params["unet_config"]["params"].update(num_classes=5), None, "`num_classes`=5"),
    ],
    ids=["not-crossattn", "text-encoder", "no-embedder", "embedder-shape", "context-list", "label-embedding-too"],
)
def test_cross_attention_checkpoints_without_a_class_context_are_refused(tmp_path, edit_params, edit_state, match):
    checkpoint, config = write_source(tmp_path, {**TINY, **CONFIGS["cin-mul"][0]}, edit=edit_state)
    if edit_params:
        document = yaml.safe_load(open(config))
        edit_params(document["model"]["params"])
        yaml.safe_dump(document, open(config, "w"))
    with pytest.raises(ValueError, match=match):
        convert_files(checkpoint, config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _unet_config(config):
    return config["model"]["params"]["unet_config"]


@pytest.mark.parametrize(
    "edit, message",
    [
        ("model: [unclosed", "is not YAML"),
        (lambda c: _unet_config(c).update(target=5), "describes a 5, not ldm's UNetModel_multistage"),
        (lambda c: c["model"]["params"].update(unet_config=[1]), "unet_config must be a mapping"),
        (lambda c: _unet_config(c).pop("params"), "unet_config.params must be a mapping"),
        (lambda c: _unet_config(c)["params"].pop("image_size"), r"lacks the U-Net options \['image_size'\]"),
        (lambda c: c["model"]["params"].update(parameterization="score"), "`parameterization`='score'"),
        (lambda c: c["model"]["params"].update(timesteps="1000"), "`timesteps`='1000' must be a number"),
        (lambda c: c["model"]["params"].update(linear_start=None), "`linear_start`=None must be a number"),
        (lambda c: c["model"]["params"].update(timesteps=-5), "`timesteps` must be a positive integer, got -5"),
        (lambda c: c["model"]["params"].update(parameterization=["eps"]), r"`parameterization`=\['eps'\]"),
        (
            lambda c: _unet_config(c)["params"].update(stage_interval=[[442], 631, 1000]),
            r"`stage_interval`=\[\[442\], 631, 1000\] must be a list of numbers",
        ),
        (
            lambda c: _unet_config(c)["params"].update(channel_mult=["1", "2"]),
            r"`channel_mult`=\['1', '2'\] must be a list of numbers",
        ),
    ],
    ids=[
        "not-yaml",
        "target-not-a-string",
        "unet-config-list",
        "no-params",
        "no-image-size",
        "parameterization",
        "timesteps-string",
        "linear-start-null",
        "timesteps-negative",
        "parameterization-list",
        "stage-interval-nested",
        "channel-mult-strings",
    ],  # fmt: skip
)
def test_a_malformed_config_is_named_and_writes_nothing(tmp_path, edit, message):
    # each was a yaml, Key, Attribute or Type error with a traceback, not the scripts' one-line error
    checkpoint, config_path = write_source(tmp_path, TINY)
    with open(config_path) as f:
        config = yaml.safe_load(f)
    if callable(edit):
        edit(config)
    with open(config_path, "w") as f:
        f.write(edit if isinstance(edit, str) else yaml.safe_dump(config))
    argv = ["--checkpoint", checkpoint, "--original_config", config_path, "--output_path", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=message):
        original_multistage.main(original_multistage.parse_args(argv))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("param, shape", [("weight", (97, 32, 1)), ("bias", (5,)), ("weight", ())])
def test_a_fused_qkv_of_another_shape_is_named(tmp_path, param, shape):
    # a torch RuntimeError (or IndexError) of the per-head split before
    p = {**TINY, "channel_mult": [1], "attention_resolutions": [1], "num_head_channels": 8}
    key = f"model.diffusion_model.middle_block.1.qkv.{param}"
    match = rf"'middle_block.1.qkv.{param}' of shape {re.escape(str(shape))}"
    with pytest.raises(ValueError, match=match):
        convert(tmp_path, p, edit=lambda s: s.update({key: torch.zeros(shape)}), ema=False, use_ema=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "option, value", [("channel_mult", 5), ("attention_resolutions", 4), ("de_nfs", 32), ("image_size", "big")]
)
def test_an_option_of_the_wrong_type_is_named(tmp_path, option, value):
    # a TypeError ("'int' object is not iterable", ...) from inside the conversion before
    checkpoint, config_path = write_source(tmp_path, TINY)
    with open(config_path) as f:
        config = yaml.safe_load(f)
    _unet_config(config)["params"][option] = value
    with open(config_path, "w") as f:
        yaml.safe_dump(config, f)
    argv = ["--checkpoint", checkpoint, "--original_config", config_path, "--output_path", str(tmp_path / "out")]
    # these options have no default here (image_size is required, de_nfs defaults to [model_channels]): the message
    # claimed one ("like its default 0", "[]")
    with pytest.raises(ValueError, match=rf"`{option}`={value!r} must be a (list|number)\.$"):
        original_multistage.main(original_multistage.parse_args(argv))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("scale_factor", [None, 0.5])
def test_the_vae_decodes_at_the_latent_scale_the_original_was_trained_at(tmp_path, scale_factor):
    """latent-diffusion scales the first stage's latents by `model.params.scale_factor` (1.0 when absent, as in the
    authors' VQ configs); the `--vae` folder's own `scaling_factor` (VQModel's default 0.18215) decoded the samples
    5.5 times too large. The pipeline's VAE now carries the original's scale, as diffusers' SD conversion does."""
    from diffusers import VQModel

    vae_folder = str(tmp_path / "vq")
    VQModel(block_out_channels=(8,), norm_num_groups=4, latent_channels=3, num_vq_embeddings=16).save_pretrained(
        vae_folder
    )
    checkpoint, config_path = write_source(tmp_path, TINY)
    if scale_factor is not None:
        with open(config_path) as f:
            config = yaml.safe_load(f)
        config["model"]["params"]["scale_factor"] = scale_factor
        with open(config_path, "w") as f:
            f.write(yaml.safe_dump(config))
    convert_files(checkpoint, config_path, tmp_path / "out", "--vae", vae_folder)
    reloaded = MultiStagePipeline.from_pretrained(str(tmp_path / "out"))
    assert type(reloaded.vae) is VQModel
    assert reloaded.vae.config.scaling_factor == (1.0 if scale_factor is None else scale_factor)


def ldm_betas(schedule: str, start: float = 0.0015, end: float = 0.0195, n: int = 1000) -> torch.Tensor:
    """ldm.modules.diffusionmodules.util.make_beta_schedule (cosine with its default cosine_s=8e-3)."""
    if schedule == "linear":
        return torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    if schedule == "sqrt_linear":
        return torch.linspace(start, end, n, dtype=torch.float64)
    steps = torch.arange(n + 1, dtype=torch.float64) / n + 8e-3
    alphas = torch.cos(steps / (1 + 8e-3) * torch.pi / 2) ** 2
    return (1 - alphas[1:] / alphas[:-1]).clamp(0, 0.999)


def write_schedule(tmp_path, **options) -> tuple[str, str]:
    checkpoint, config_path = write_source(tmp_path, TINY)
    with open(config_path) as f:
        config = yaml.safe_load(f)
    config["model"]["params"].update(options)
    with open(config_path, "w") as f:
        yaml.safe_dump(config, f)
    return checkpoint, config_path


@pytest.mark.parametrize("schedule", ["linear", "sqrt_linear", "cosine"])
def test_the_scheduler_has_the_configs_beta_schedule(tmp_path, schedule):
    # `beta_schedule` was not read: a model trained on sqrt_linear or cosine betas sampled on LDM's "linear" ones
    pipe = convert_files(*write_schedule(tmp_path, beta_schedule=schedule), tmp_path / "out")
    assert torch.allclose(pipe.scheduler.betas.double(), ldm_betas(schedule), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"beta_schedule": "sqrt"}, "`beta_schedule`='sqrt'"),
        ({"beta_schedule": "cosine", "cosine_s": 0.01}, "`cosine_s`=0.01"),
        ({"given_betas": [0.1] * 1000}, "`given_betas`"),
    ],
    ids=["sqrt", "cosine-s", "given-betas"],
)
def test_a_beta_schedule_diffusers_does_not_have_is_refused(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        convert_files(*write_schedule(tmp_path, **options), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key", ["concat", "hybrid"])
def test_a_model_conditioned_on_a_concatenated_image_is_refused(tmp_path, key):
    # (super-resolution, inpainting): written as an unconditional pipeline whose first sampling step failed with
    # "The size of tensor a (6) must match the size of tensor b (3)"
    checkpoint, config_path = write_source(tmp_path, {**TINY, "in_channels": 6})
    with open(config_path) as f:
        config = yaml.safe_load(f)
    config["model"]["params"]["conditioning_key"] = key
    with open(config_path, "w") as f:
        yaml.safe_dump(config, f)
    with pytest.raises(ValueError, match=f"`conditioning_key`='{key}'.*concatenated"):
        convert_files(checkpoint, config_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_vae_that_is_not_a_folder_is_named_before_any_work(tmp_path, monkeypatch):
    """A mistyped `--vae` was only loaded after the conversion, and as a Hub repository id: diffusers went online and
    the error spoke of the internet connection. It is refused first, by name, as every other input folder."""
    checkpoint, config = write_source(tmp_path, TINY)

    def no_conversion(*args, **kwargs):
        raise AssertionError("the checkpoint was converted before --vae was checked")

    monkeypatch.setattr(original_multistage, "ldm_to_multistage", no_conversion)
    for vae in (tmp_path / "vq-f8-diffusers", tmp_path / "last.safetensors"):
        with pytest.raises(ValueError, match=f"`--vae` must be a folder, got '{vae}'"):
            convert_files(checkpoint, config, tmp_path / "out", "--vae", str(vae))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("vae_kind", ["vq", "kl"])
def test_a_vae_whose_latents_the_unet_does_not_denoise_is_refused_and_writes_nothing(tmp_path, vae_kind):
    """A `--vae` of 4-channel latents beside a 3-channel U-Net was written into the pipeline: the folder loaded, and
    every sampling call failed (`vae` decodes latents of 4 channels, but the networks denoise `in_channels`=3)."""
    from diffusers import AutoencoderKL, VQModel

    vae_folder = str(tmp_path / "vae")
    options = dict(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)
    (VQModel(**options, num_vq_embeddings=16) if vae_kind == "vq" else AutoencoderKL(**options)).save_pretrained(
        vae_folder
    )
    checkpoint, config = write_source(tmp_path, TINY)  # in_channels 3
    with pytest.raises(ValueError, match=r"`--vae` .* decodes latents of 4 channels, but the checkpoint's U-Net .*3"):
        convert_files(checkpoint, config, tmp_path / "out", "--vae", vae_folder)
    assert not (tmp_path / "out").exists()


def test_a_pipeline_folder_given_as_vae_is_named_with_its_model_folders(tmp_path, ldm_folder):
    """An LDMPipeline folder given as `--vae` failed with "Cannot load a AutoencoderKL from ... no file named
    config.json": the error now says it is a pipeline folder and names the folders of its models."""
    checkpoint, config = write_source(tmp_path, TINY)
    with pytest.raises(
        ValueError, match=r"`--vae` .*ldm' is a pipeline folder: give the folder of one of its models \(.*vqvae\)"
    ):
        convert_files(checkpoint, config, tmp_path / "out", "--vae", ldm_folder)
    assert not (tmp_path / "out").exists()


def test_a_vq_vae_folder_that_does_not_load_is_named_for_what_it_is(tmp_path):
    """A VQModel `--vae` whose weights do not load (here: only a float16 variant) was reported as "neither a VQModel
    nor an AutoencoderKL folder: ... holds a VQModel, not the AutoencoderKL expected here": the VQModel's own
    reason is given now."""
    from diffusers import VQModel

    vae_folder = tmp_path / "vq"
    VQModel(block_out_channels=(8,), norm_num_groups=4, latent_channels=3, num_vq_embeddings=16).save_pretrained(
        vae_folder, variant="fp16"
    )
    checkpoint, config = write_source(tmp_path, TINY)
    with pytest.raises(ValueError) as error:
        convert_files(checkpoint, config, tmp_path / "out", "--vae", str(vae_folder))
    assert "holds no plain safetensors weights" in str(error.value) and "neither" not in str(error.value)
    assert not (tmp_path / "out").exists()
