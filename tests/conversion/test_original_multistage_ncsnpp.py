"""score_sde checkpoints of the public multi-stage code (LucasYFL/Multistage_Diffusion, `dpm-solver/score_sde_pytorch`,
``NCSNpp_multimodel`` = ``ncsnpp_multistage``) -> MultiStagePipeline folders with a MultiStageDDPMppUNet2DModel.

The state dicts here are generated from the original's parameter names and shapes, as read from its source, at a
tiny size, and the converted model is compared with `ncsnpp_reference`: the original's forward pass restated here
from its definition (BigGAN-type blocks with StyleGAN2's FIR up/down-sampling, NIN attention, the residual input
pyramid, middle blocks in the encoder, first-sample routing on ``999 t`` against ``1000 x stage_interval``). Setting
MULTISTAGE_DIFFUSION_DPM_REPO to a checkout's `dpm-solver/score_sde_pytorch` folder also runs the original network
and the authors' DPM-Solver sampler (`--verify --original_repo`).
"""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from diffusers_stages import MultiStageDDPMppUNet2DModel, MultiStagePipeline
from diffusers_stages.conversion import original_multistage_ncsnpp
from diffusers_stages.conversion.common import load_converted

TINY = {"en_nf": 16, "de_nfs": [24, 16, 8], "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [4]}
CONFIGS = {  # model options over TINY (the published config's FIR resampling and residual input pyramid)
    "published-options": {},
    "no-input-pyramid": {"progressive_input": "none"},
    "no-fir": {"fir": False, "progressive_input": "none"},
    "two-stages-attention-at-the-top": {
        "stage_num": 2,
        "stage_interval": [[[0, 0.3]], [[0.3, 1]]],
        "de_nfs": [16, 8],
        "attn_resolutions": [8, 2],
        "num_res_blocks": 2,
    },
}
RESOLUTION, CHANNELS = 8, 3
FIR = torch.tensor([1.0, 3.0, 3.0, 1.0])


def model_options(overrides: dict) -> dict:
    return {**original_multistage_ncsnpp.DEFAULTS["model"], **TINY, **overrides}


def layout(m: dict) -> tuple[list, list]:
    """The original's ``en_modules`` (after the time MLP) and ``de_modules`` in order, as (kind, in, out, extra)."""
    nf, levels = m["en_nf"], len(m["ch_mult"])
    encoder, widths, width, pyramid = [("conv", CHANNELS, nf, None)], [nf], nf, CHANNELS
    for level, mult in enumerate(m["ch_mult"]):
        for _ in range(m["num_res_blocks"]):
            encoder.append(("resnet", width, nf * mult, None))
            width = nf * mult
            if RESOLUTION >> level in m["attn_resolutions"]:
                encoder.append(("attention", width, width, None))
            widths.append(width)
        if level != levels - 1:
            encoder.append(("resnet", width, width, "down"))
            if m["progressive_input"] == "residual":
                encoder.append(("pyramid", pyramid, width, None))
                pyramid = width
            widths.append(width)
    encoder += [("resnet", width, width, None), ("attention", width, width, None), ("resnet", width, width, None)]
    decoders = []
    for dc in m["de_nfs"]:
        decoder, pending, cur = [], list(widths), width
        for level in reversed(range(levels)):
            for _ in range(m["num_res_blocks"] + 1):
                decoder.append(("resnet", cur + pending.pop(), dc * m["ch_mult"][level], "skip"))
                cur = dc * m["ch_mult"][level]
            if RESOLUTION >> level in m["attn_resolutions"]:
                decoder.append(("attention", cur, cur, None))
            if level:
                decoder.append(("resnet", cur, cur, "up"))
        decoders.append(decoder + [("norm", cur, cur, None), ("conv", cur, CHANNELS, None)])
    return encoder, decoders


def module_shapes(kind: str, cin: int, cout: int, extra, emb: int) -> dict:
    """Names and shapes of one original module (ResnetBlockBigGANpp, AttnBlockpp, Conv2d with FIR down, ...)."""
    if kind == "conv":
        return {"weight": (cout, cin, 3, 3), "bias": (cout,)}
    if kind == "norm":
        return {"weight": (cin,), "bias": (cin,)}
    if kind == "pyramid":
        return {"Conv2d_0.weight": (cout, cin, 3, 3), "Conv2d_0.bias": (cout,)}
    if kind == "attention":
        shapes = {"GroupNorm_0.weight": (cin,), "GroupNorm_0.bias": (cin,)}
        for i in range(4):
            shapes.update({f"NIN_{i}.W": (cin, cin), f"NIN_{i}.b": (cin,)})
        return shapes
    shapes = {
        "GroupNorm_0.weight": (cin,),
        "GroupNorm_0.bias": (cin,),
        "Conv_0.weight": (cout, cin, 3, 3),
        "Conv_0.bias": (cout,),
        "Dense_0.weight": (cout, emb),
        "Dense_0.bias": (cout,),
        "GroupNorm_1.weight": (cout,),
        "GroupNorm_1.bias": (cout,),
        "Conv_1.weight": (cout, cout, 3, 3),
        "Conv_1.bias": (cout,),
    }
    if cin != cout or extra in ("up", "down"):
        shapes.update({"Conv_2.weight": (cout, cin, 1, 1), "Conv_2.bias": (cout,)})
    return shapes


def original_shapes(m: dict) -> dict:
    """Names and shapes of ``NCSNpp_multimodel(config)``'s state dict."""
    nf, emb = m["en_nf"], 4 * m["en_nf"]
    shapes = {"sigmas": (1000,), "en_modules.0.weight": (emb, nf), "en_modules.0.bias": (emb,)}
    shapes.update({"en_modules.1.weight": (emb, emb), "en_modules.1.bias": (emb,)})
    encoder, decoders = layout(m)
    for i, module in enumerate(encoder, start=2):
        shapes.update({f"en_modules.{i}.{k}": v for k, v in module_shapes(*module, emb).items()})
    for s, decoder in enumerate(decoders):
        for i, module in enumerate(decoder):
            shapes.update({f"de_modules.{s}.{i}.{k}": v for k, v in module_shapes(*module, emb).items()})
    return shapes


def random_state(m: dict) -> dict:
    torch.manual_seed(0)
    return {k: torch.randn(shape) * 0.2 for k, shape in original_shapes(m).items()}


# --------------------------------------------------------------------------------------------------------------
# the original's forward pass, restated from its definition
def group_norm(x, state, key):
    return F.group_norm(x, min(x.shape[1] // 4, 16), state[f"{key}.weight"], state[f"{key}.bias"], eps=1e-6)


def fir(x, direction, fused_conv=None):
    """StyleGAN2's upfirdn2d with the [1, 3, 3, 1] filter (score_sde's up_or_down_sampling), per channel."""
    c = x.shape[1]
    k = torch.outer(FIR, FIR) / 64
    if direction == "up":  # upsample_2d: zeros between pixels, pad (2, 1), filter times 4
        z = torch.zeros(*x.shape[:2], 2 * x.shape[2], 2 * x.shape[3])
        z[..., ::2, ::2] = x
        return F.conv2d(F.pad(z, (2, 1, 2, 1)), (4 * k).expand(c, 1, 4, 4), groups=c)
    if fused_conv is None:  # downsample_2d: pad (1, 1), filter with stride 2
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), k.expand(c, 1, 4, 4), groups=c, stride=2)
    weight, bias = fused_conv  # conv_downsample_2d: pad (2, 2), filter, then the 3x3 convolution with stride 2
    x = F.conv2d(F.pad(x, (2, 2, 2, 2)), k.expand(c, 1, 4, 4), groups=c)
    return F.conv2d(x, weight, stride=2) + bias[:, None, None]


def naive(x, direction):
    if direction == "up":
        return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    return F.avg_pool2d(x, 2)


def resnet(x, temb, state, name, direction, m):
    h = F.silu(group_norm(x, state, f"{name}.GroupNorm_0"))
    if direction in ("up", "down"):
        resample = fir if m["fir"] else naive
        h, x = resample(h, direction), resample(x, direction)
    h = F.conv2d(h, state[f"{name}.Conv_0.weight"], state[f"{name}.Conv_0.bias"], padding=1)
    h = h + F.linear(F.silu(temb), state[f"{name}.Dense_0.weight"], state[f"{name}.Dense_0.bias"])[:, :, None, None]
    h = F.silu(group_norm(h, state, f"{name}.GroupNorm_1"))
    h = F.conv2d(h, state[f"{name}.Conv_1.weight"], state[f"{name}.Conv_1.bias"], padding=1)
    if f"{name}.Conv_2.weight" in state:
        x = F.conv2d(x, state[f"{name}.Conv_2.weight"], state[f"{name}.Conv_2.bias"])
    return (x + h) / math.sqrt(2)


def attention(x, state, name):
    def nin(h, i):  # NIN: y = x W + b over channels
        return torch.einsum("nchw,cd->ndhw", h, state[f"{name}.NIN_{i}.W"]) + state[f"{name}.NIN_{i}.b"][:, None, None]

    n, c, height, width = x.shape
    h = group_norm(x, state, f"{name}.GroupNorm_0")
    q, k, v = nin(h, 0), nin(h, 1), nin(h, 2)
    w = torch.einsum("nchw,ncij->nhwij", q, k).reshape(n, height, width, -1) * c**-0.5
    w = w.softmax(dim=-1).reshape(n, height, width, height, width)
    return (x + nin(torch.einsum("nhwij,ncij->nchw", w, v), 3)) / math.sqrt(2)


def ncsnpp_reference(state, m, x, labels):
    stage = [s for s, ((low, high),) in enumerate(m["stage_interval"]) if 1000 * low < labels[0] <= 1000 * high][0]
    half = m["en_nf"] // 2
    e = labels[:, None] * torch.exp(torch.arange(half) * -math.log(10000) / (half - 1))[None]
    temb = F.linear(torch.cat([e.sin(), e.cos()], dim=1), state["en_modules.0.weight"], state["en_modules.0.bias"])
    temb = F.linear(F.silu(temb), state["en_modules.1.weight"], state["en_modules.1.bias"])
    index = iter(range(2, len(state)))  # en_modules, in the order the forward pass uses them

    def name() -> str:
        return f"en_modules.{next(index)}"

    conv_in = name()
    hs, pyramid = [F.conv2d(x, state[f"{conv_in}.weight"], state[f"{conv_in}.bias"], padding=1)], x
    for level in range(len(m["ch_mult"])):
        for _ in range(m["num_res_blocks"]):
            h = resnet(hs[-1], temb, state, name(), None, m)
            hs.append(attention(h, state, name()) if RESOLUTION >> level in m["attn_resolutions"] else h)
        if level != len(m["ch_mult"]) - 1:
            h = resnet(hs[-1], temb, state, name(), "down", m)
            if m["progressive_input"] == "residual":  # the input pyramid: FIR-resampling conv, summed, / sqrt(2)
                key = name()
                conv = (state[f"{key}.Conv2d_0.weight"], state[f"{key}.Conv2d_0.bias"])
                h = pyramid = (fir(pyramid, "down", conv) + h) / math.sqrt(2)
            hs.append(h)
    h = resnet(hs[-1], temb, state, name(), None, m)  # the middle blocks, in the encoder
    h = resnet(attention(h, state, name()), temb, state, name(), None, m)
    _, decoders = layout(m)
    for i, (kind, _, _, extra) in enumerate(decoders[stage]):
        name = f"de_modules.{stage}.{i}"
        if kind == "resnet":
            h = resnet(torch.cat([h, hs.pop()], dim=1) if extra == "skip" else h, temb, state, name, extra, m)
        elif kind == "attention":
            h = attention(h, state, name)
        elif kind == "norm":
            h = F.silu(group_norm(h, state, name))
        else:
            h = F.conv2d(h, state[f"{name}.weight"], state[f"{name}.bias"], padding=1)
    return h


# --------------------------------------------------------------------------------------------------------------
def write_source(tmp_path, overrides=None, edit=None, config_edit=None, prefix=""):
    m = model_options(overrides or {})
    state = random_state(m)
    if edit:
        edit(state)
    checkpoint, config = str(tmp_path / "ncsnpp.safetensors"), str(tmp_path / "ncsnpp.json")
    save_file({prefix + k: v for k, v in state.items()}, checkpoint)
    sections = {"model": {**TINY, **(overrides or {})}, "data": {"image_size": RESOLUTION}, "training": {}}
    if config_edit:
        config_edit(sections)
    with open(config, "w") as f:
        json.dump(sections, f)
    return checkpoint, config, state, m


def convert(tmp_path, checkpoint, config, *extra):
    argv = ["--checkpoint", checkpoint, "--original_config", config, "--output_path", str(tmp_path / "out"), *extra]
    return original_multistage_ncsnpp.main(original_multistage_ncsnpp.parse_args(argv))


def stage_labels(m: dict) -> list[float]:
    """A label (999 t) inside each stage of the original's ``stage_interval``."""
    return [999 * (low + high) / 2 for ((low, high),) in m["stage_interval"]]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The published options at a tiny size, from a DDP-prefixed state dict: (pipeline, original state, options)."""
    tmp_path = tmp_path_factory.mktemp("ncsnpp")
    checkpoint, config, state, m = write_source(tmp_path, prefix="module.")
    return convert(tmp_path, checkpoint, config, "--verify"), state, m, tmp_path / "out"


@pytest.mark.parametrize("name", CONFIGS)
def test_converted_model_computes_the_original_network(tmp_path, name):
    # the conversion's steps without the folder round trip (`converted` runs the whole command)
    _, config, state, m = write_source(tmp_path, CONFIGS[name])
    p = original_multistage_ncsnpp.read_config(config)
    model = MultiStageDDPMppUNet2DModel(**original_multistage_ncsnpp.model_config(p, state)).eval()
    load_converted(model, original_multistage_ncsnpp.ncsnpp_to_ddpmpp(state, p, RESOLUTION), "test")
    parameters = sum(torch.Size(s).numel() for k, s in original_shapes(m).items() if k != "sigmas")
    assert sum(t.numel() for t in model.state_dict().values()) == parameters  # nothing dropped or invented
    x = torch.randn(2, CHANNELS, RESOLUTION, RESOLUTION, generator=torch.manual_seed(1))
    for stage, label in enumerate(stage_labels(m)):
        labels = torch.full((2,), label)
        with torch.no_grad():
            expected = ncsnpp_reference(state, m, x, labels)
            assert model.partition.stage_for_timestep(labels).tolist() == [stage, stage]
            assert torch.allclose(model(x, labels).sample, expected, atol=1e-5), stage


def test_pipeline_samples_with_the_authors_dpm_solver(converted):
    pipe, _, _, folder = converted
    config = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "ContinuousVPDPMSolverSinglestepScheduler"
    assert (config.solver_order, config.algorithm_type, config.beta_min, config.beta_max) == (
        3,
        "dpmsolver",
        0.1,
        20.0,
    )
    assert (config.t_start, config.t_end) == (1.0, 1e-4)
    assert pipe.partition.units == "timestep" and pipe.partition.boundaries == (442.0, 630.8)
    reloaded = MultiStagePipeline.from_pretrained(str(folder))
    assert type(reloaded.scheduler) is type(pipe.scheduler) and reloaded.scheduler.config == config
    images = []
    for pipeline in (pipe, reloaded):
        pipeline.set_progress_bar_config(disable=True)
        run = pipeline(batch_size=2, num_inference_steps=4, generator=torch.manual_seed(0), output_type="np")
        images.append(run.images)
    assert images[0].shape == (2, RESOLUTION, RESOLUTION, 3) and (images[0] == images[1]).all()


def test_routing_matches_the_original_stage_interval_at_the_sampled_times(converted):
    pipe, _, m, _ = converted
    for steps in (4, 20, 50):
        pipe.scheduler.set_timesteps(steps)
        labels = pipe.scheduler.timesteps  # 999 t: what score_sde hands the network
        ours = pipe.partition.stage_for_timestep(labels).tolist()
        # the original: the stage whose (1000 low, 1000 high] holds the label, compared in the label's float32
        theirs = [
            [s for s, ((low, high),) in enumerate(m["stage_interval"]) if low * 1000 < label <= high * 1000][0]
            for label in labels
        ]
        assert ours == theirs and set(ours) == {0, 1, 2}, steps


def test_nin_attention_is_transposed_into_linear_layers(converted):
    _, state, _, _ = converted
    model = converted[0].unet
    # en_modules: 0-1 time MLP, 2 conv, 3 block (8x8), 4 down, 5 pyramid, 6 block (4x4), 7 its attention, ...
    attention = model.down_blocks[2].attention
    assert torch.equal(attention.to_q.weight, state["en_modules.7.NIN_0.W"].t())
    assert torch.equal(attention.to_out[0].bias, state["en_modules.7.NIN_3.b"])
    assert torch.equal(model.input_pyramid[0].Conv2d_0.weight, state["en_modules.5.Conv2d_0.weight"])


@pytest.mark.parametrize(
    "config_edit, message",
    [
        (lambda c: c["model"].update(progressive="output_skip"), "progressive"),
        (lambda c: c["model"].update(resblock_type="ddpm"), "resblock_type"),
        (lambda c: c["data"].update(centered=False), "centered"),
        (lambda c: c["training"].update(sde="subvpsde"), "sde"),
        (lambda c: c["model"].update(fir=False), "progressive_input"),
        (lambda c: c.update(sampling={"dpm_solver_method": "multistep"}), "dpm_solver_method"),
        (lambda c: c["model"].update(stage_interval=[[[0, 0.4]], [[0.4, 0.5], [0.7, 1]], [[0.5, 0.7]]]), "stage_"),
        (lambda c: c["model"].update(de_nfs=[24, 16]), "de_nfs"),
    ],
    ids=["output-pyramid", "ddpm-blocks", "uncentered", "sub-vp", "pyramid-without-fir", "multistep", "split", "n"],
)
def test_options_without_an_equivalent_are_refused(tmp_path, config_edit, message):
    checkpoint, config, _, _ = write_source(tmp_path, config_edit=config_edit)
    with pytest.raises(ValueError, match=message):
        convert(tmp_path, checkpoint, config)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("de_modules.2.10.bias"), "lacks 'de_modules.2.10.bias'"),
        (lambda s: s.update({"de_modules.3.0.bias": torch.zeros(3)}), "keys the original architecture does not"),
        (lambda s: s.update({"en_modules.3.Conv_0.weight": torch.zeros(16, 16, 1, 1)}), "wrong shape"),
        # a torch RuntimeError of the transposition before
        (lambda s: s.update({"en_modules.7.NIN_0.W": torch.zeros(2, 2, 2)}), r"en_modules.7.NIN_0.W'.*\(2, 2, 2\)"),
    ],
    ids=["missing", "unexpected", "shape", "nin-shape"],
)
def test_bad_checkpoints_are_refused_and_leave_nothing(tmp_path, edit, message):
    checkpoint, config, _, _ = write_source(tmp_path, edit=edit)
    with pytest.raises(ValueError, match=message):
        convert(tmp_path, checkpoint, config)
    assert not (tmp_path / "out").exists()


def test_edm_checkpoint_points_to_its_script(tmp_path):
    _, config, _, _ = write_source(tmp_path)
    checkpoint = str(tmp_path / "edm.safetensors")
    save_file({"model.map_layer0.weight": torch.zeros(4, 4)}, checkpoint)
    with pytest.raises(ValueError, match="original_multistage_edm"):
        convert(tmp_path, checkpoint, config)


@pytest.mark.skipif(
    not os.environ.get("MULTISTAGE_DIFFUSION_DPM_REPO"),
    reason="set MULTISTAGE_DIFFUSION_DPM_REPO to a dpm-solver/score_sde_pytorch folder to run the original",
)
@pytest.mark.parametrize("name", CONFIGS)
def test_matches_the_original_network_and_sampler(tmp_path, name, capsys):
    checkpoint, config, _, _ = write_source(tmp_path, CONFIGS[name])
    convert(tmp_path, checkpoint, config, "--verify", "--original_repo", os.environ["MULTISTAGE_DIFFUSION_DPM_REPO"])
    verified = [line for line in capsys.readouterr().out.splitlines() if line.startswith("verify:")]
    assert len(verified) == len(stage_labels(model_options(CONFIGS[name]))) + 1  # every stage, and the sampler


@pytest.mark.parametrize("option, value", [("ch_mult", 2), ("attn_resolutions", 16), ("num_res_blocks", "many")])
def test_an_option_of_the_wrong_type_is_named(tmp_path, option, value):
    # a TypeError from inside the conversion before
    checkpoint, config, _, _ = write_source(tmp_path, config_edit=lambda c: c["model"].update({option: value}))
    with pytest.raises(ValueError, match=rf"`model.{option}`={value!r} must be a (list|number) like its default"):
        convert(tmp_path, checkpoint, config)
    assert not (tmp_path / "out").exists()


def test_a_config_with_none_of_the_sections_is_named_not_read_as_all_defaults(tmp_path):
    """An EDM run's training_options.json given as the config had none of its sections, so every option took the
    published CIFAR-10 value, and the error was about the checkpoint ("lacks 'en_modules.5...'")."""
    checkpoint, config, _, _ = write_source(tmp_path)
    with open(config, "w") as f:
        json.dump({"network_kwargs": {"class_name": "training.networks.EDMPrecond"}, "batch_size": 512}, f)
    with pytest.raises(ValueError, match=r"`--original_config` .* none of the sections .*'model'.*network_kwargs"):
        convert(tmp_path, checkpoint, config)
    assert not (tmp_path / "out").exists()
