"""EDM checkpoints of the public multi-stage code (LucasYFL/Multistage_Diffusion, `edm/training/networks.py`,
``MultistageUNet`` under ``EDMPrecond``) -> MultiStagePipeline folders with a MultiStageDDPMppUNet2DModel.

The state dicts here are generated from the original's parameter names and shapes, as read from its source, at a
tiny size, and the converted model is compared with `edm_reference`: the original's forward pass restated here from
its definition (DDPM++ blocks, per-layer group counts, sqrt(0.5) residual scaling, [sin, cos] noise embedding,
first-sample routing). Setting MULTISTAGE_DIFFUSION_EDM_REPO to a checkout's `edm` folder also runs the original
network itself (`--verify --original_repo`).
"""

import json
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from diffusers_stages import MultiStagePipeline
from diffusers_stages.conversion import original_multistage_edm

TINY = dict(
    model_type="MultistageUNet",
    embedding_type="positional",
    encoder_type="standard",
    decoder_type="standard",
    channel_mult_noise=1,
    resample_filter=[1, 1],
    en_model_channels=16,
    de_model_channels=[24, 16, 8],
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[4],
    dropout=0.0,
)
CONFIGS = {  # (network options, label_dim, augment_dim)
    "plain": ({}, 0, 0),
    "class-conditional-with-augmentation": ({}, 5, 9),
    "three-levels-attention-at-the-top": (
        {"channel_mult": [1, 2, 2], "attn_resolutions": [8, 2], "num_blocks": 2, "de_model_channels": [32, 16, 8]},
        0,
        0,
    ),
    "two-stages": (
        {"stage_num": 2, "stage_interval": [[[0, 1.5]], [[1.5, math.inf]]], "de_model_channels": [16, 8]},
        3,
        0,
    ),
}
RESOLUTION, CHANNELS = 8, 3
INTERVALS = [[[0, 2.5103]], [[2.5103, 7.6577]], [[7.6577, math.inf]]]  # the original's default


def unet_block(name: str, cin: int, cout: int, emb: int, resample: bool = False, attention: bool = False) -> dict:
    """Names and shapes of one original ``UNetBlock`` (DDPM++ options: resample_proj, one attention head)."""
    shapes = {
        "norm0.weight": (cin,),
        "norm0.bias": (cin,),
        "conv0.weight": (cout, cin, 3, 3),
        "conv0.bias": (cout,),
        "affine.weight": (cout, emb),
        "affine.bias": (cout,),
        "norm1.weight": (cout,),
        "norm1.bias": (cout,),
        "conv1.weight": (cout, cout, 3, 3),
        "conv1.bias": (cout,),
    }
    if cin != cout or resample:
        shapes.update({"skip.weight": (cout, cin, 1, 1), "skip.bias": (cout,)})
    if resample:  # buffers of the convolutions that resample
        shapes.update({"conv0.resample_filter": (1, 1, 2, 2), "skip.resample_filter": (1, 1, 2, 2)})
    if attention:
        shapes.update(
            {
                "norm2.weight": (cout,),
                "norm2.bias": (cout,),
                "qkv.weight": (3 * cout, cout, 1, 1),
                "qkv.bias": (3 * cout,),
                "proj.weight": (cout, cout, 1, 1),
                "proj.bias": (cout,),
            }
        )
    return {f"{name}.{k}": v for k, v in shapes.items()}


def layout(p: dict) -> tuple[list, list]:
    """The original's encoder and decoder blocks in order: (name, resample, attention, output multiplier)."""
    encoder, decoder, levels = [], [], len(p["channel_mult"])
    for level, mult in enumerate(p["channel_mult"]):
        res = RESOLUTION >> level
        if level:
            encoder.append((f"{res}x{res}_down", "down", False, None))
        encoder += [
            (f"{res}x{res}_block{i}", None, res in p["attn_resolutions"], mult) for i in range(p["num_blocks"])
        ]
    for level, mult in reversed(list(enumerate(p["channel_mult"]))):
        res = RESOLUTION >> level
        if level == levels - 1:
            decoder += [(f"{res}x{res}_in0", None, True, None), (f"{res}x{res}_in1", None, False, None)]
        else:
            decoder.append((f"{res}x{res}_up", "up", False, None))
        decoder += [
            (f"{res}x{res}_block{i}", None, i == p["num_blocks"] and res in p["attn_resolutions"], mult)
            for i in range(p["num_blocks"] + 1)
        ]
    return encoder, decoder


def original_shapes(p: dict, label_dim: int, augment_dim: int) -> dict:
    """Names and shapes of ``MultistageUNet(**p)``'s state dict."""
    nc, emb = p["en_model_channels"], 4 * p["en_model_channels"]
    shapes = {
        "map_layer0.weight": (emb, nc),
        "map_layer0.bias": (emb,),
        "map_layer1.weight": (emb, emb),
        "map_layer1.bias": (emb,),
        f"enc.{RESOLUTION}x{RESOLUTION}_conv.weight": (nc, CHANNELS, 3, 3),
        f"enc.{RESOLUTION}x{RESOLUTION}_conv.bias": (nc,),
    }
    if label_dim:
        shapes.update({"map_label.weight": (nc, label_dim), "map_label.bias": (nc,)})
    if augment_dim:
        shapes["map_augment.weight"] = (nc, augment_dim)
    encoder, decoder = layout(p)
    skips, width = [nc], nc
    for name, resample, attention, mult in encoder:
        out = width if mult is None else nc * mult
        shapes.update(unet_block(f"enc.{name}", width, out, emb, resample is not None, attention))
        skips.append(out)
        width = out
    for s, dc in enumerate(p["de_model_channels"]):
        pending, cur = list(skips), width
        for name, resample, attention, mult in decoder:
            cin = cur + (pending.pop() if mult is not None else 0)
            out = cur if mult is None else dc * mult
            shapes.update(unet_block(f"decs.{s}.{name}", cin, out, emb, resample is not None, attention))
            cur = out
        shapes.update(
            {
                f"decs.{s}.{RESOLUTION}x{RESOLUTION}_aux_norm.weight": (cur,),
                f"decs.{s}.{RESOLUTION}x{RESOLUTION}_aux_norm.bias": (cur,),
                f"decs.{s}.{RESOLUTION}x{RESOLUTION}_aux_conv.weight": (CHANNELS, cur, 3, 3),
                f"decs.{s}.{RESOLUTION}x{RESOLUTION}_aux_conv.bias": (CHANNELS,),
            }
        )
    return shapes


def random_state(p: dict, label_dim: int, augment_dim: int) -> dict:
    torch.manual_seed(0)
    state = {}
    for key, shape in original_shapes(p, label_dim, augment_dim).items():
        state[key] = torch.full(shape, 0.25) if key.endswith("resample_filter") else torch.randn(shape) * 0.2
    return state


# --------------------------------------------------------------------------------------------------------------
# the original's forward pass, restated from its definition
def group_norm(x, state, key):
    return F.group_norm(x, min(16, x.shape[1] // 4), state[f"{key}.weight"], state[f"{key}.bias"], eps=1e-6)


def resample(x, direction):
    if direction == "down":  # conv2d with the [1,1] x [1,1] / 4 filter, stride 2, per channel
        return F.conv2d(x, torch.full((x.shape[1], 1, 2, 2), 0.25), stride=2, groups=x.shape[1])
    if direction == "up":  # transposed conv with the filter times 4, stride 2, per channel
        return F.conv_transpose2d(x, torch.ones(x.shape[1], 1, 2, 2), stride=2, groups=x.shape[1])
    return x


def reference_block(x, emb, state, name, direction, attention):
    h = F.conv2d(
        resample(F.silu(group_norm(x, state, f"{name}.norm0")), direction),
        state[f"{name}.conv0.weight"],
        state[f"{name}.conv0.bias"],
        padding=1,
    )
    h = h + F.linear(emb, state[f"{name}.affine.weight"], state[f"{name}.affine.bias"])[:, :, None, None]
    h = F.conv2d(
        F.silu(group_norm(h, state, f"{name}.norm1")),
        state[f"{name}.conv1.weight"],
        state[f"{name}.conv1.bias"],
        padding=1,
    )
    skip = x
    if f"{name}.skip.weight" in state:
        skip = F.conv2d(resample(x, direction), state[f"{name}.skip.weight"], state[f"{name}.skip.bias"])
    x = (h + skip) * math.sqrt(0.5)
    if attention:
        n, c, height, width = x.shape
        qkv = F.conv2d(group_norm(x, state, f"{name}.norm2"), state[f"{name}.qkv.weight"], state[f"{name}.qkv.bias"])
        q, k, v = qkv.reshape(n, c, 3, -1).unbind(2)
        w = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(c)).softmax(dim=2)
        a = torch.einsum("nqk,nck->ncq", w, v).reshape(n, c, height, width)
        x = (F.conv2d(a, state[f"{name}.proj.weight"], state[f"{name}.proj.bias"]) + x) * math.sqrt(0.5)
    return x


def edm_reference(state, p, x, noise_labels, one_hot=None):
    intervals = p.get("stage_interval", INTERVALS)
    sigma = math.exp(4 * float(noise_labels[0]))  # the whole batch goes to the first sample's stage
    stage = max(s for s, ((low, _),) in enumerate(intervals) if sigma > low)
    half = p["en_model_channels"] // 2
    freqs = (1 / 10000) ** (torch.arange(half) / (half - 1))
    e = noise_labels[:, None] * freqs[None]
    emb = torch.cat([e.sin(), e.cos()], dim=1)  # [cos, sin], then swapped
    if one_hot is not None:
        emb = emb + F.linear(one_hot * math.sqrt(one_hot.shape[1]), state["map_label.weight"], state["map_label.bias"])
    emb = F.silu(F.linear(emb, state["map_layer0.weight"], state["map_layer0.bias"]))
    emb = F.silu(F.linear(emb, state["map_layer1.weight"], state["map_layer1.bias"]))
    conv = f"enc.{RESOLUTION}x{RESOLUTION}_conv"
    x = F.conv2d(x, state[f"{conv}.weight"], state[f"{conv}.bias"], padding=1)
    skips = [x]
    encoder, decoder = layout(p)
    for name, direction, attention, _ in encoder:
        x = reference_block(x, emb, state, f"enc.{name}", direction, attention)
        skips.append(x)
    for name, direction, attention, mult in decoder:
        if mult is not None:
            x = torch.cat([x, skips.pop()], dim=1)
        x = reference_block(x, emb, state, f"decs.{stage}.{name}", direction, attention)
    head = f"decs.{stage}.{RESOLUTION}x{RESOLUTION}"
    x = F.silu(group_norm(x, state, f"{head}_aux_norm"))
    return F.conv2d(x, state[f"{head}_aux_conv.weight"], state[f"{head}_aux_conv.bias"], padding=1)


# --------------------------------------------------------------------------------------------------------------
def write_source(tmp_path, p, label_dim=0, augment_dim=0, edit=None, config_edit=None, prefix="model."):
    state = random_state(p, label_dim, augment_dim)
    if edit:
        edit(state)
    checkpoint, config = str(tmp_path / "edm.safetensors"), str(tmp_path / "training_options.json")
    save_file({prefix + k: v for k, v in state.items()}, checkpoint)
    network_kwargs = {"class_name": "training.networks.EDMPrecond", **p, "use_fp16": False}
    if config_edit:
        config_edit(network_kwargs)
    with open(config, "w") as f:
        json.dump({"network_kwargs": network_kwargs, "batch_size": 512}, f)  # as EDM's train.py writes it
    return checkpoint, config, state


def convert(tmp_path, checkpoint, config, *extra):
    argv = ["--checkpoint", checkpoint, "--original_config", config, "--output_path", str(tmp_path / "out"), *extra]
    return original_multistage_edm.main(original_multistage_edm.parse_args(argv))


@pytest.mark.parametrize("name", CONFIGS)
def test_converted_model_computes_the_original_network(tmp_path, name):
    overrides, label_dim, augment_dim = CONFIGS[name]
    p = {**TINY, **overrides}
    checkpoint, config, state = write_source(tmp_path, p, label_dim, augment_dim)
    pipe = convert(tmp_path, checkpoint, config, "--verify")
    model = MultiStagePipeline.from_pretrained(str(tmp_path / "out")).unet
    parameters = sum(
        torch.Size(s).numel()
        for k, s in original_shapes(p, label_dim, augment_dim).items()
        if not k.endswith("resample_filter")
    )
    assert sum(t.numel() for t in pipe.unet.state_dict().values()) == parameters  # nothing dropped or invented
    x = torch.randn(2, CHANNELS, RESOLUTION, RESOLUTION, generator=torch.manual_seed(1))
    labels = torch.tensor([0, label_dim - 1]) if label_dim else None
    one_hot = F.one_hot(labels, label_dim).float() if label_dim else None
    intervals = p.get("stage_interval", INTERVALS)
    for stage, ((low, high),) in enumerate(intervals):
        sigma = 2.0 * low if high == math.inf else (low + high) / 2 if low else high / 2
        noise_labels = torch.full((2,), math.log(sigma) / 4)
        with torch.no_grad():
            expected = edm_reference(state, p, x, noise_labels, one_hot)
            assert model.partition.stage_for_timestep(noise_labels).tolist() == [stage, stage]
            assert torch.allclose(model(x, noise_labels, class_labels=labels).sample, expected, atol=1e-5), stage


def test_pipeline_uses_edm_preconditioning_and_samples(tmp_path):
    checkpoint, config, _ = write_source(tmp_path, TINY, label_dim=5)
    pipe = convert(tmp_path, checkpoint, config)
    # the EDM scheduler closest to the authors' Heun sampler: second order, on generate.py's Karras schedule
    assert type(pipe.scheduler).__name__ == "EDMDPMSolverMultistepScheduler"
    config = pipe.scheduler.config
    assert config.prediction_type == "epsilon" and config.sigma_data == 0.5 and config.solver_order == 2
    assert (config.sigma_min, config.sigma_max, config.rho) == (0.002, 80.0, 7.0)
    assert pipe.partition.units == "sigma" and pipe.partition.boundaries == (2.5103, 7.6577)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[0, 4], num_inference_steps=4, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (2, RESOLUTION, RESOLUTION, 3)


def test_attention_qkv_is_deinterleaved(tmp_path):
    checkpoint, config, state = write_source(tmp_path, TINY)
    attention = convert(tmp_path, checkpoint, config).unet.decoders[1].mid_blocks[0].attention
    qkv = state["decs.1.4x4_in0.qkv.weight"].flatten(1)
    # the original reads channel c of q, k and v from rows 3c, 3c + 1 and 3c + 2
    assert torch.equal(attention.to_q.weight, qkv[0::3]) and torch.equal(attention.to_k.weight, qkv[1::3])
    assert torch.equal(attention.to_v.weight, qkv[2::3])


def test_bare_network_state_dict_converts_too(tmp_path):
    checkpoint, config, _ = write_source(tmp_path, TINY, prefix="")
    assert convert(tmp_path, checkpoint, config).unet.num_stages == 3


@pytest.mark.parametrize(
    "config_edit, message",
    [
        (lambda c: c.update(embedding_type="fourier"), "embedding_type"),
        (lambda c: c.update(class_name="training.networks.VPPrecond"), "VPPrecond"),
        (lambda c: c.update(stage_interval=[[[0, 1]], [[1, 2], [5, 9]], [[2, 5], [9, math.inf]]]), "stage_interval"),
        (lambda c: c.update(img_resolution=16), "img_resolution"),
        (lambda c: c.update(de_model_channels=[24, 16]), "de_model_channels"),
    ],
    ids=["fourier", "vp-precond", "split-intervals", "resolution", "decoder-count"],
)
def test_options_without_an_equivalent_are_refused(tmp_path, config_edit, message):
    checkpoint, config, _ = write_source(tmp_path, TINY, config_edit=config_edit)
    with pytest.raises(ValueError, match=message):
        convert(tmp_path, checkpoint, config)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("decs.2.8x8_aux_conv.bias"), "lacks 'decs.2.8x8_aux_conv.bias'"),
        (lambda s: s.update({"decs.3.8x8_aux_conv.bias": torch.zeros(3)}), "keys the original architecture does not"),
        (lambda s: s.update({"enc.4x4_down.conv0.resample_filter": torch.ones(1, 1, 2, 2)}), "resample_filter"),
        (lambda s: s.update({"enc.8x8_block0.conv0.weight": torch.zeros(16, 16, 1, 1)}), "wrong shape"),
        # the next two were torch RuntimeErrors of the rename's reshapes
        (
            lambda s: s.update({"decs.1.4x4_in0.qkv.weight": torch.zeros(97, 32, 1, 1)}),
            r"decs.1.4x4_in0.qkv.weight'.*\(97, 32, 1, 1\)",
        ),
        (
            lambda s: s.update({"enc.4x4_down.conv0.resample_filter": torch.ones(3)}),
            "enc.4x4_down.conv0.resample_filter",
        ),
    ],
    ids=["missing", "unexpected", "other-filter", "shape", "qkv-shape", "filter-shape"],
)
def test_bad_checkpoints_are_refused_and_leave_nothing(tmp_path, edit, message):
    checkpoint, config, _ = write_source(tmp_path, TINY, edit=edit)
    with pytest.raises(ValueError, match=message):
        convert(tmp_path, checkpoint, config)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "edit",
    [{"en_model_channels": 65536, "de_model_channels": [32, 32, 32]}, {"num_blocks": 10**6}],
    ids=["width", "blocks"],
)
def test_a_config_edited_to_sizes_the_checkpoint_lacks_is_refused_before_anything_is_allocated(tmp_path, edit):
    # the model was built from the config before its weights were compared: `en_model_channels` edited to 65536
    # tried to allocate 64 GB (a RuntimeError from the allocator, or the machine's memory), `num_blocks` built for ever
    checkpoint, config, _ = write_source(tmp_path, TINY, config_edit=lambda kwargs: kwargs.update(edit))
    with pytest.raises(ValueError, match=f"{re.escape(checkpoint)}.*does not fit"):
        convert(tmp_path, checkpoint, config)
    assert not (tmp_path / "out").exists()


def test_latent_diffusion_checkpoint_points_to_its_script(tmp_path):
    _, config, _ = write_source(tmp_path, TINY)
    checkpoint = str(tmp_path / "ldm.safetensors")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 3, 3, 3)}, checkpoint)
    with pytest.raises(ValueError, match="conversion.original_multistage`"):
        convert(tmp_path, checkpoint, config)


@pytest.mark.skipif(
    not os.environ.get("MULTISTAGE_DIFFUSION_EDM_REPO"), reason="set MULTISTAGE_DIFFUSION_EDM_REPO to run the original"
)
@pytest.mark.parametrize("name", CONFIGS)
def test_matches_the_original_network(tmp_path, name):
    overrides, label_dim, augment_dim = CONFIGS[name]
    p = {**TINY, **overrides}
    checkpoint, config, _ = write_source(tmp_path, p, label_dim, augment_dim)
    convert(tmp_path, checkpoint, config, "--verify", "--original_repo", os.environ["MULTISTAGE_DIFFUSION_EDM_REPO"])


def test_stage_export_to_a_plain_unet_is_refused_with_the_reason(tmp_path):
    from diffusers_stages.conversion import multistage_to_unet

    checkpoint, config, _ = write_source(tmp_path, TINY)
    convert(tmp_path, checkpoint, config)
    argv = ["--source", str(tmp_path / "out"), "--stage", "0", "--output_path", str(tmp_path / "stage0")]
    with pytest.raises(ValueError, match="no UNet2DModel equivalent.*sqrt\\(0.5\\)"):
        multistage_to_unet.main(multistage_to_unet.parse_args(argv))
    assert not (tmp_path / "stage0").exists()


def test_scheduler_steps_through_the_authors_noise_levels(tmp_path):
    checkpoint, config, _ = write_source(tmp_path, TINY)
    scheduler = convert(tmp_path, checkpoint, config).scheduler
    scheduler.set_timesteps(18)
    # generate.py's edm_sampler: t_i = (80^(1/7) + i/17 (0.002^(1/7) - 80^(1/7)))^7, then 0
    i = torch.arange(18, dtype=torch.float64)
    authors = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert torch.allclose(scheduler.sigmas[:-1].double(), authors, rtol=1e-5) and scheduler.sigmas[-1] == 0


@pytest.mark.parametrize(
    "option, value", [("channel_mult", 5), ("stage_interval", 5), ("attn_resolutions", 5), ("dropout", "high")]
)
def test_an_option_of_the_wrong_type_is_named(tmp_path, option, value):
    # a TypeError ("'int' object is not iterable") from inside the conversion, or float()'s own message
    checkpoint, config, _ = write_source(tmp_path, TINY, config_edit=lambda c: c.update({option: value}))
    with pytest.raises(ValueError, match=rf"`{option}`={value!r} must be a (list|number) like its default"):
        convert(tmp_path, checkpoint, config)
    assert not (tmp_path / "out").exists()


def test_a_config_with_none_of_the_networks_options_is_named_not_read_as_all_defaults(tmp_path):
    """score_sde's config as JSON (sections `model`, `data`, ...) given as the config was read as network arguments
    none of which the network has, so every option took its default, and the error was about those."""
    checkpoint, config, _ = write_source(tmp_path, TINY)
    with open(config, "w") as f:
        json.dump({"model": {"name": "ncsnpp_multistage"}, "data": {"image_size": 8}, "training": {}}, f)
    with pytest.raises(ValueError, match=r"`--original_config` .* no `network_kwargs` .* none of .*\['data', 'model'"):
        convert(tmp_path, checkpoint, config)
    assert not (tmp_path / "out").exists()
