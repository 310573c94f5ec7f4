"""Convert a checkpoint of the authors' score_sde multi-stage model (``NCSNpp_multimodel``, registered as
``ncsnpp_multistage`` in LucasYFL/Multistage_Diffusion, ``dpm-solver/score_sde_pytorch``, Zhang et al. CVPR 2024)
into a `MultiStagePipeline` folder holding a `MultiStageDDPMppUNet2DModel` (its NCSN++ options) and a
`ContinuousVPDPMSolverSinglestepScheduler` (the authors' sampler), through the explicit key-rename table below and
strict key checks.

This is the model behind the paper's headline CIFAR-10 result (``configs/vp/cifar10_ncsnpp_multistage_deep_continuous_v2
.py``: continuous-time VP SDE, NCSN++ with BigGAN-type residual blocks, FIR resampling, a residual input pyramid,
8 blocks per level, encoder width 128 and decoders 192/128/16). score_sde checkpoints (``checkpoint_*.pth``) are
pickles holding the optimizer, the (DDP-wrapped) model and its EMA as a bare list of tensors; the authors sample
with the EMA weights. Export them once, in the original code's environment, where you trust the pickle:

    import json, torch, safetensors.torch
    from configs.vp.cifar10_ncsnpp_multistage_deep_continuous_v2 import get_config
    from models import ncsnpp_multistage, utils as mutils
    from models.ema import ExponentialMovingAverage
    config = get_config()
    net = mutils.get_model(config.model.name)(config)
    state = torch.load("checkpoint_12.pth", map_location="cpu")
    net.load_state_dict({k.removeprefix("module."): v for k, v in state["model"].items()})
    ema = ExponentialMovingAverage(net.parameters(), decay=config.model.ema_rate)
    ema.load_state_dict(state["ema"])
    ema.copy_to(net.parameters())
    safetensors.torch.save_file({k: v.contiguous() for k, v in net.state_dict().items()}, "ncsnpp.safetensors")
    json.dump({k: config[k].to_dict() for k in ("model", "data", "training", "sampling")}, open("ncsnpp.json", "w"))

then convert (options the JSON leaves out take the published config's values):

    python -m diffusers_stages.conversion.original_multistage_ncsnpp --checkpoint ncsnpp.safetensors \\
        --original_config ncsnpp.json --output_path staged-ncsnpp --verify \\
        --original_repo Multistage_Diffusion/dpm-solver/score_sde_pytorch

Time units: the network is conditioned on ``999 t`` (score_sde's ``labels = t * 999``) for the SDE time ``t`` in
``(0, 1]``; that label is the pipeline's timestep. The original picks the stage by comparing the first sample's
label with ``1000 x stage_interval``, so the stage boundaries are ``1000 b`` in timestep units (442.0 and 630.8 for
``[[0, 0.4420]], [[0.4420, 0.6308]], [[0.6308, 1]]``: times 0.44244 and 0.63143); the converted model routes every
sample by its own label, agreeing everywhere except a label exactly on a boundary (which the original gives to the
lower stage, this package to the upper one).

Sampler: the authors' DPM-Solver (``sampling.method="dpm_solver"``, singlestep, order 3, logSNR spacing, noise
prediction, no final denoising), from ``t = 1`` to ``t_end``; the scheduler reproduces it (see
`diffusers_stages.schedulers.ContinuousVPDPMSolverSinglestepScheduler`). The paper's numbers use 20 model calls
(``num_inference_steps=20``) and ``t_end = 1e-4`` (the evaluation command in ``sample.sh``; the config file's
``sampling.eps`` is 1e-3, which ``--t_end`` selects).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import math
import os
import sys
import types
from collections.abc import Iterator

import torch

from diffusers_stages.conversion.common import (
    build_for_checkpoint,
    build_parser,
    check_consumed,
    check_option_kinds,
    folder_value,
    input_paths,
    load_converted,
    load_state_dict,
    max_difference,
    move_layer,
    probe_timesteps,
    read_json,
    rearranging,
    report_verification,
    run,
    stage_interval_boundaries,
    staged_output,
    take,
    write_and_verify,
)
from diffusers_stages.models import MultiStageDDPMppUNet2DModel
from diffusers_stages.pipelines import MultiStagePipeline
from diffusers_stages.schedulers import ContinuousVPDPMSolverSinglestepScheduler

LABEL_SCALE = 999  # score_sde: a continuously trained VP model is conditioned on t * 999
STAGE_SCALE = 1000  # ncsnpp_multistage compares that label with stage_interval * 1000
# the published config (configs/vp/cifar10_ncsnpp_multistage_deep_continuous_v2.py over default_cifar10_configs.py)
DEFAULTS = {
    "model": {
        "name": "ncsnpp_multistage",
        "en_nf": 128,
        "de_nfs": [192, 128, 16],
        "stage_num": 3,
        "stage_interval": [[[0, 0.4420]], [[0.4420, 0.6308]], [[0.6308, 1]]],
        "ch_mult": [1, 2, 2, 2],
        "num_res_blocks": 8,
        "attn_resolutions": [16],
        "dropout": 0.1,
        "group": 16,
        "nonlinearity": "swish",
        "normalization": "GroupNorm",
        "resamp_with_conv": True,
        "conditional": True,
        "fir": True,
        "fir_kernel": [1, 3, 3, 1],
        "skip_rescale": True,
        "resblock_type": "biggan",
        "progressive": "none",
        "progressive_input": "residual",
        "progressive_combine": "sum",
        "attention_type": "ddpm",
        "embedding_type": "positional",
        "init_scale": 0.0,
        "scale_by_sigma": False,
        "fourier_scale": 16,
        "conv_size": 3,
        "beta_min": 0.1,
        "beta_max": 20.0,
        "num_scales": 1000,
        "sigma_min": 0.01,
        "sigma_max": 50,
    },
    "data": {"image_size": 32, "num_channels": 3, "centered": True},
    "training": {"sde": "vpsde", "continuous": True},
    "sampling": {
        "method": "dpm_solver",
        "dpm_solver_method": "singlestep",
        "dpm_solver_order": 3,
        "algorithm_type": "dpmsolver",
        "skip_type": "logSNR",
        "noise_removal": False,
        "thresholding": False,
        "eps": 1e-3,
    },
}
REQUIRED = {  # (section, option) -> (value that converts, why other values do not)
    ("model", "name"): ("ncsnpp_multistage", "only the multi-decoder NCSN++ (NCSNpp_multimodel) converts here"),
    ("training", "sde"): ("vpsde", "the pipeline's scheduler samples the VP SDE"),
    ("training", "continuous"): (True, "the network must be conditioned on continuous time (999 t)"),
    ("model", "embedding_type"): ("positional", "NCSNpp_multimodel only builds positional noise embeddings"),
    ("model", "conditional"): (True, "an unconditioned network has no time embedding to convert"),
    ("model", "resblock_type"): ("biggan", "only BigGAN-type residual blocks (resampling inside the block) convert"),
    ("model", "progressive"): ("none", "NCSN++'s output pyramid is not implemented"),
    ("model", "skip_rescale"): (True, "the converted blocks divide every residual sum by sqrt(2)"),
    ("model", "nonlinearity"): ("swish", "the converted blocks use SiLU (swish)"),
    ("model", "scale_by_sigma"): (False, "a VP model predicts the noise unscaled"),
    ("data", "centered"): (True, "the network must take data in [-1, 1] (centered), as the pipeline's images are"),
    ("sampling", "method"): ("dpm_solver", "the pipeline's scheduler is the authors' DPM-Solver"),
    ("sampling", "dpm_solver_method"): ("singlestep", "the pipeline's scheduler is singlestep DPM-Solver"),
    ("sampling", "skip_type"): ("logSNR", "the pipeline's scheduler spaces its steps uniformly in logSNR"),
    ("sampling", "noise_removal"): (False, "the pipeline's scheduler has no final denoising step"),
    ("sampling", "thresholding"): (False, "the pipeline's scheduler does not threshold"),
}
# --------------------------------------------------------------------------------------------------------------
# the key-rename table: original layer -> MultiStageDDPMppUNet2DModel layer
EMBEDDING = ("time_embedding.linear_1", "time_embedding.linear_2")  # en_modules.0 and .1: the time MLP
RESNET = {  # ResnetBlockBigGANpp -> DDPMppBlock.resnet (diffusers' ResnetBlock2D)
    "GroupNorm_0": "norm1",
    "Conv_0": "conv1",
    "Dense_0": "time_emb_proj",
    "GroupNorm_1": "norm2",
    "Conv_1": "conv2",
    "Conv_2": "conv_shortcut",
}
ATTENTION = {"GroupNorm_0": "group_norm", "NIN_0": "to_q", "NIN_1": "to_k", "NIN_2": "to_v", "NIN_3": "to_out.0"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser(__doc__)
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="The original network's weights as .safetensors (NCSNpp_multimodel's state dict, with the EMA weights "
        "copied in; a 'module.' prefix of DDP is accepted).",
    )
    parser.add_argument(
        "--original_config",
        required=True,
        help="JSON with the original config's 'model', 'data', 'training' and 'sampling' sections (each "
        "ConfigDict's to_dict()). Options it leaves out take the published CIFAR-10 config's values.",
    )
    parser.add_argument(
        "--t_end",
        type=float,
        default=1e-4,
        help="Where sampling ends (the SDE time t): 1e-4, the authors' evaluation (sample.sh); their config file's "
        "sampling.eps is 1e-3.",
    )
    parser.add_argument(
        "--original_repo",
        type=folder_value,
        help="For --verify: the `dpm-solver/score_sde_pytorch` folder of a LucasYFL/Multistage_Diffusion checkout, "
        "to run the original network and sampler on the same input. Without it --verify only reloads and checks.",
    )
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------------------
def read_config(path: str) -> dict:
    """The original config's sections, the published config's values filling what the file leaves out; options
    that do not convert are refused with the reason."""
    config = read_json(path, "--original_config")
    if config and not set(config) & set(DEFAULTS):
        raise ValueError(  # another file (an EDM run's options): every option would take the published value
            f"`--original_config` {path} has none of the sections {list(DEFAULTS)} of the original config, only "
            f"{sorted(config)[:8]}: give score_sde's config as JSON (an EDM run's training_options.json, with its "
            "`network_kwargs`, converts with original_multistage_edm)."
        )
    p = {}
    for section, defaults in DEFAULTS.items():
        given = config.get(section, {})
        if not isinstance(given, dict):
            raise ValueError(f"`--original_config` {path}: section {section!r} must be a JSON object.")
        check_option_kinds(given, defaults, f"`--original_config` {path}", prefix=f"{section}.")
        p[section] = {**defaults, **given}
    for (section, option), (supported, why) in REQUIRED.items():
        if p[section][option] != supported:
            raise ValueError(
                f"The original config sets `{section}.{option}`={p[section][option]!r}, which does not convert: {why}."
            )
    m = p["model"]
    if m["progressive_input"] not in ("none", "residual") or (m["progressive_input"] == "residual" and not m["fir"]):
        raise ValueError(
            f"`model.progressive_input`={m['progressive_input']!r} with `model.fir`={m['fir']} does not convert: only "
            "no input pyramid, or the residual one with FIR resampling."
        )
    if m["fir"] and list(m["fir_kernel"]) != [1, 3, 3, 1]:
        raise ValueError(f"`model.fir_kernel`={m['fir_kernel']} does not convert: only [1, 3, 3, 1] is implemented.")
    return p


def stage_boundaries(m: dict) -> tuple[float, ...]:
    """Timestep (label) boundaries of the original ``stage_interval``: contiguous intervals from t = 0 to 1, times
    1000 (the original compares the label with ``1000 x stage_interval``)."""
    inner = stage_interval_boundaries(m["stage_interval"], m["stage_num"], len(m["de_nfs"]), "de_nfs",
                                      lambda end: end == 1, "t = 0 to 1")  # fmt: skip
    return tuple(round(STAGE_SCALE * b, 9) for b in inner)  # 630.8, not 630.8000000000001


def model_config(p: dict, state_dict: dict[str, torch.Tensor]) -> dict:
    """`MultiStageDDPMppUNet2DModel` arguments (its NCSN++ options)."""
    m, data = p["model"], p["data"]
    conv = state_dict.get("en_modules.2.weight")
    if conv is None or conv.ndim != 4 or "en_modules.0.weight" not in state_dict:
        raise ValueError(
            "The checkpoint is not an ncsnpp_multistage network: it lacks the time embedding `en_modules.0.weight` "
            "or the input convolution `en_modules.2.weight`."
        )
    if conv.shape[1] != data["num_channels"]:
        raise ValueError(f"The config's `data.num_channels`={data['num_channels']} disagrees with the checkpoint's.")
    return {
        "sample_size": data["image_size"],
        "in_channels": data["num_channels"],
        "out_channels": data["num_channels"],
        "encoder_channels": m["en_nf"],
        "decoder_channels": tuple(m["de_nfs"]),
        "channel_mult": tuple(m["ch_mult"]),
        "channel_mult_emb": 4,  # NCSN++: embedding width 4 * nf
        "layers_per_block": m["num_res_blocks"],
        "attention_resolutions": tuple(m["attn_resolutions"]),
        "dropout": float(m["dropout"]),
        "norm_num_groups": m["group"],  # min(group, channels // 4) groups, as the converted blocks count them
        "norm_eps": 1e-6,
        "stage_boundaries": stage_boundaries(m),
        "boundary_units": "timestep",
        "num_train_timesteps": STAGE_SCALE,
        "resample_filter": (1, 3, 3, 1) if m["fir"] else (1, 1),
        "encoder_type": "residual" if m["progressive_input"] == "residual" else "standard",
        "decoder_mid_blocks": False,
    }


def module_layout(m: dict, resolution: int) -> tuple[list, list]:
    """``(kind, target)`` of the original's ``en_modules`` (after the time MLP) and of one decoder's ``de_modules``,
    in index order; attention modules name the block they follow."""
    levels, attend = len(m["ch_mult"]), m["attn_resolutions"]
    encoder, decoder, block, up = [("conv", "conv_in")], [], 0, 0
    for level in range(levels):
        for _ in range(m["num_res_blocks"]):
            encoder.append(("resnet", f"down_blocks.{block}"))
            if resolution >> level in attend:
                encoder.append(("attention", f"down_blocks.{block}"))
            block += 1
        if level != levels - 1:
            encoder.append(("resnet", f"down_blocks.{block}"))
            block += 1
            if m["progressive_input"] == "residual":
                encoder.append(("pyramid", f"input_pyramid.{level}"))
    encoder += [("resnet", "mid_blocks.0"), ("attention", "mid_blocks.0"), ("resnet", "mid_blocks.1")]
    for level in reversed(range(levels)):
        decoder += [("resnet", f"up_blocks.{up + i}") for i in range(m["num_res_blocks"] + 1)]
        up += m["num_res_blocks"] + 1
        if resolution >> level in attend:
            decoder.append(("attention", f"up_blocks.{up - 1}"))
        if level != 0:
            decoder.append(("resnet", f"up_blocks.{up}"))
            up += 1
    return encoder, decoder + [("norm", "conv_norm_out"), ("conv", "conv_out")]


def rename_module(kind: str, source: str, target: str, state_dict: dict, out: dict) -> None:
    """One original module's weights under the converted model's names (NIN's ``W`` is a transposed linear)."""
    if kind in ("conv", "norm"):
        return move_layer(state_dict, source, target, out)
    if kind == "pyramid":  # up_or_down_sampling.Conv2d holds its own weight and bias -> FirDownsample2D.Conv2d_0
        return move_layer(state_dict, f"{source}.Conv2d_0", f"{target}.Conv2d_0", out)
    table, prefix = (RESNET, "resnet") if kind == "resnet" else (ATTENTION, "attention")
    for layer, name in table.items():
        if kind == "attention" and layer.startswith("NIN"):
            weight = take(state_dict, f"{source}.{layer}.W")
            with rearranging(f"{source}.{layer}.W", weight):
                out[f"{target}.{prefix}.{name}.weight"] = weight.t().contiguous()
            out[f"{target}.{prefix}.{name}.bias"] = take(state_dict, f"{source}.{layer}.b")
        else:
            move_layer(state_dict, f"{source}.{layer}", f"{target}.{prefix}.{name}", out, optional=layer == "Conv_2")


def ncsnpp_to_ddpmpp(state_dict: dict[str, torch.Tensor], p: dict, resolution: int) -> dict[str, torch.Tensor]:
    """Rename an original ``NCSNpp_multimodel`` state dict to `MultiStageDDPMppUNet2DModel`'s keys."""
    state_dict, out = dict(state_dict), {}
    state_dict.pop("sigmas", None)  # a buffer of SMLD noise levels, unused by a VP model
    encoder, decoder = module_layout(p["model"], resolution)
    # 1. the time MLP, then the encoder (input convolution, down path with its input pyramid, middle blocks)
    for i, target in enumerate(EMBEDDING):
        move_layer(state_dict, f"en_modules.{i}", target, out)
    for i, (kind, target) in enumerate(encoder, start=len(EMBEDDING)):
        rename_module(kind, f"en_modules.{i}", target, state_dict, out)
    # 2. each stage's decoder: up path, output head
    for s in range(p["model"]["stage_num"]):
        for i, (kind, target) in enumerate(decoder):
            rename_module(kind, f"de_modules.{s}.{i}", f"decoders.{s}.{target}", state_dict, out)
    check_consumed(state_dict)
    return out


def network_state_dict(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The network's weights, without DDP's ``module.`` prefix."""
    if any(k.startswith(("model.", "map_layer0.", "enc.")) for k in raw):
        raise ValueError(
            "This is a latent-diffusion or EDM checkpoint: convert it with `diffusers_stages.conversion."
            "original_multistage` or `original_multistage_edm`."
        )
    return {k.removeprefix("module."): v for k, v in raw.items()}


def dpm_solver_scheduler(p: dict, t_end: float) -> ContinuousVPDPMSolverSinglestepScheduler:
    """The authors' sampler on the model's VP SDE: singlestep DPM-Solver of the config's order and algorithm."""
    return ContinuousVPDPMSolverSinglestepScheduler(
        num_train_timesteps=LABEL_SCALE + 1,
        beta_min=float(p["model"]["beta_min"]),
        beta_max=float(p["model"]["beta_max"]),
        solver_order=int(p["sampling"]["dpm_solver_order"]),
        algorithm_type=p["sampling"]["algorithm_type"],
        t_end=t_end,
    )


# --------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def original_modules(repo: str) -> Iterator[types.SimpleNamespace]:
    """Import the original network, SDE and sampler from ``repo``. Its ``op`` package compiles CUDA kernels when
    imported; they are stubbed out for the import, so the original runs its own CPU path (``upfirdn2d_native``).
    The modules imported from ``repo`` (top-level ``models``, ``op``, ``sde_lib``, ...) are unloaded afterwards."""
    from torch.utils import cpp_extension

    repo, before, load = os.path.abspath(repo), set(sys.modules), cpp_extension.load
    sys.path.insert(0, repo)
    cpp_extension.load = lambda *args, **kwargs: None  # no kernel compilation at import time
    try:
        modules = types.SimpleNamespace(
            network=importlib.import_module("models.ncsnpp_multistage"),
            sde_lib=importlib.import_module("sde_lib"),
            sampling=importlib.import_module("sampling"),
        )
    except ImportError as error:
        raise ValueError(f"`--original_repo` {repo} does not provide the score_sde modules: {error}") from error
    finally:
        cpp_extension.load = load
        sys.path.remove(repo)
    try:
        yield modules
    finally:
        for name in set(sys.modules) - before:
            if os.path.abspath(getattr(sys.modules[name], "__file__", None) or "/").startswith(repo + os.sep):
                del sys.modules[name]


def verify_against_original(
    repo: str, p: dict, state_dict: dict, pipeline: MultiStagePipeline, tolerance: float, steps: int = 6
) -> None:
    """Run the original network (imported from ``repo``) and the converted model on the same input at a label in
    each stage, then the authors' DPM-Solver sampler on the original network against the converted pipeline."""
    with original_modules(repo) as original:
        config = types.SimpleNamespace(**{k: types.SimpleNamespace(**v) for k, v in p.items()})
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter counts
            network = original.network.NCSNpp_multimodel(config).eval()
        network.load_state_dict(state_dict, strict=True)
        model, differences = pipeline.unet, {}
        shape = (2, model.config.in_channels, model.config.sample_size, model.config.sample_size)
        x = torch.randn(shape, generator=torch.manual_seed(0))
        with torch.no_grad():
            for stage, label in enumerate(probe_timesteps(model.partition)):
                labels = torch.full((2,), label)
                difference = max_difference(network(x, labels), model(x, labels).sample)
                differences[f"stage {stage} at timestep {label:g} (t = {label / LABEL_SCALE:.4f}): network"] = (
                    difference
                )
        # the sampler: score_sde's get_dpm_solver_sampler as the authors call it, from the same initial noise
        sde = original.sde_lib.VPSDE(p["model"]["beta_min"], p["model"]["beta_max"], p["model"]["num_scales"])
        sampler = original.sampling.get_dpm_solver_sampler(
            sde, shape, lambda x: x, steps=steps, eps=pipeline.scheduler.config.t_end, skip_type="logSNR",
            method="singlestep", order=pipeline.scheduler.config.solver_order, denoise=False,
            algorithm_type=pipeline.scheduler.config.algorithm_type, device="cpu",
        )  # fmt: skip
        noise = torch.randn(shape, generator=torch.manual_seed(1))
        torch.manual_seed(1)  # sde.prior_sampling draws from the global generator
        reference, _ = sampler([network], ())
        pipeline.set_progress_bar_config(disable=True)
        ours = pipeline(batch_size=2, num_inference_steps=steps, latents=noise, output_type="latent").images
        scale = max(reference.abs().max().item(), 1.0)
        differences[f"sampler: {steps} DPM-Solver steps (relative to max |x| = {scale:.3g})"] = (
            max_difference(reference, ours) / scale
        )
    report_verification(differences, tolerance)


@torch.no_grad()
def main(args: argparse.Namespace) -> MultiStagePipeline:
    if not (math.isfinite(args.t_end) and 0 < args.t_end < 1):
        raise ValueError(f"`--t_end` must lie in (0, 1), got {args.t_end}.")
    with staged_output(args.output_path, args.overwrite, input_paths(args)) as tmp:
        # 1. read the architecture and the weights; fail early on anything that does not convert exactly
        p = read_config(args.original_config)
        original = network_state_dict(load_state_dict(args.checkpoint))
        config = model_config(p, original)
        source = f"The checkpoint {args.checkpoint}"
        model = build_for_checkpoint(lambda: MultiStageDDPMppUNet2DModel(**config), original, source)
        # 2. rename, then check against the target model: strict keys and shapes
        converted = ncsnpp_to_ddpmpp(original, p, config["sample_size"])
        load_converted(model, converted, f"The checkpoint {args.checkpoint}")
        # 3. write the pipeline (the authors' DPM-Solver), reload it, and compare if asked
        pipeline = write_and_verify(
            args, model, dpm_solver_scheduler(p, args.t_end), tmp,
            verify_original=lambda pipe: verify_against_original(args.original_repo, p, original, pipe, args.tolerance),
        )  # fmt: skip
    print(
        f"wrote {args.output_path}: MultiStagePipeline, stages {pipeline.partition.intervals()} from {args.checkpoint}"
    )
    return pipeline


if __name__ == "__main__":
    run(main, parse_args, sys.argv[1:])
