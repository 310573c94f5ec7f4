"""Convert a checkpoint of the authors' EDM multi-stage model (``MultistageUNet`` in LucasYFL/Multistage_Diffusion,
``edm/training/networks.py``, Zhang et al. CVPR 2024) into a `MultiStagePipeline` folder holding a
`MultiStageDDPMppUNet2DModel` and diffusers' `EDMDPMSolverMultistepScheduler`, through the explicit key-rename table
below and strict key checks.

The original checkpoints are pickles (``network-snapshot-*.pkl``) that run code when loaded, so this script reads
only safetensors. A snapshot holds ``dict(ema=..., loss_fn=..., augment_pipe=..., dataset_kwargs=...)``: its only
network, ``ema``, is the EMA of the training weights, the one the authors' ``generate.py`` samples with, so the
export below converts the EMA weights. (The raw training weights are only in ``training-state-*.pt``, as
``torch.load(path)["net"]``; export that network the same way to convert them.) Export the network once, in the
original code's environment, where you trust the pickle:

    import json, pickle, safetensors.torch
    net = pickle.load(open("multistage_edm_cifar10.pkl", "rb"))["ema"]
    safetensors.torch.save_file({k: v.contiguous() for k, v in net.state_dict().items()}, "edm.safetensors")
    json.dump(dict(net.init_kwargs, class_name=type(net).__name__), open("edm.json", "w"), default=list)

then convert (a training run's own ``training_options.json`` works as ``--original_config`` too):

    python -m diffusers_stages.conversion.original_multistage_edm --checkpoint edm.safetensors \\
        --original_config edm.json --output_path staged-edm --verify --original_repo Multistage_Diffusion/edm

Only EDM's preconditioning (``EDMPrecond``, which diffusers' EDM schedulers implement) and the DDPM++ options the
authors trained with (``--arch=ddpmpp-multistage``) convert; other options are refused with the reason.
Sampler: the authors sample with EDM's Heun sampler (18 steps, 35 model evaluations on CIFAR-10). diffusers 0.42 has
no EDM Heun scheduler (`HeunDiscreteScheduler` conditions on DDPM timesteps and scales inputs by
``1/sqrt(sigma^2+1)``, not EDM's ``c_in``/``c_noise``, so it cannot drive this model); the pipeline gets the EDM
scheduler closest to it, `EDMDPMSolverMultistepScheduler` (DPM-Solver++(2M), a second-order solver on the same
Karras schedule: sigma 0.002 to 80, rho 7). Sample with ``num_inference_steps=35`` to match the authors' 35 model
evaluations: on a Gaussian-mixture data set with its exact denoiser, its samples differ from EDM-Heun-18's by an RMS of
0.012, against 0.133 for `EDMEulerScheduler` at 35 steps.

The original routes a batch by its first sample's sigma, stage ``s`` when sigma exceeds the stage's lower bound;
the converted model routes every sample by its own sigma, so the two agree on every batch whose samples share a stage
(a sigma exactly on a boundary goes to the lower stage in both).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys

import torch
from diffusers import EDMDPMSolverMultistepScheduler

from diffusers_stages.conventions import num_data_classes
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

# the original class's defaults (MultistageUNet and EDMPrecond), for options a config leaves out
DEFAULTS = {
    "en_model_channels": 128,
    "de_model_channels": [192, 128, 16],
    "stage_num": 3,
    "stage_interval": [[[0, 2.5103]], [[2.5103, 7.6577]], [[7.6577, math.inf]]],
    "channel_mult": [1, 2, 2, 2],
    "channel_mult_emb": 4,
    "num_blocks": 4,
    "attn_resolutions": [16],
    "dropout": 0.10,
    "embedding_type": "positional",
    "channel_mult_noise": 1,
    "encoder_type": "standard",
    "decoder_type": "standard",
    "resample_filter": [1, 1],
    "sigma_data": 0.5,
    "augment_dim": 0,
}
# EDMPrecond's own arguments (with the network's, in its init_kwargs and a run's network_kwargs)
PRECOND_OPTIONS = ("class_name", "img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max",
                   "model_type", "label_dropout")  # fmt: skip
UNSUPPORTED_OPTIONS = {  # original option -> (value that converts, why other values do not)
    "model_type": ("MultistageUNet", "only the multi-stage DDPM++ network has a multi-stage equivalent here"),
    "embedding_type": ("positional", "NCSN++'s random Fourier noise embedding is not implemented"),
    "channel_mult_noise": (1, "DDPM++ embeds the noise level at the base width"),
    "encoder_type": (
        "standard",
        "EDM's skip/residual encoders are not mapped (score_sde's: original_multistage_ncsnpp)",
    ),
    "decoder_type": ("standard", "NCSN++'s skip decoder is not implemented"),
    "resample_filter": ([1, 1], "only EDM's [1, 1] filter (2x2 average pooling, nearest up-sampling) is mapped"),
}
# --------------------------------------------------------------------------------------------------------------
# the key-rename table: original layer -> MultiStageDDPMppUNet2DModel layer
TOP_LEVEL = {
    "map_layer0": "time_embedding.linear_1",
    "map_layer1": "time_embedding.linear_2",
    "map_label": "class_embedding",
    "map_augment": "augment_embedding",
}
UNET_BLOCK = {  # UNetBlock -> DDPMppBlock (ResnetBlock2D + Attention); qkv is split below
    "norm0": "resnet.norm1",
    "conv0": "resnet.conv1",
    "affine": "resnet.time_emb_proj",
    "norm1": "resnet.norm2",
    "conv1": "resnet.conv2",
    "skip": "resnet.conv_shortcut",
    "norm2": "attention.group_norm",
    "proj": "attention.to_out.0",
}
OUTPUT_HEAD = {"aux_norm": "conv_norm_out", "aux_conv": "conv_out"}
AVERAGE_2X2 = torch.full((1, 1, 2, 2), 0.25)  # the resample_filter buffer of [1, 1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser(__doc__)
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="The original network's weights as .safetensors: an EDMPrecond state dict (the network under 'model.') "
        "or the MultistageUNet's own state dict.",
    )
    parser.add_argument(
        "--original_config",
        required=True,
        help="JSON with the original network's arguments: a run's training_options.json (its 'network_kwargs') "
        "or the network's init_kwargs. Options it leaves out take the original class's defaults.",
    )
    parser.add_argument(
        "--original_repo",
        type=folder_value,
        help="For --verify: the `edm` folder of a LucasYFL/Multistage_Diffusion checkout, to run the original "
        "network on the same input. Without it --verify only reloads and checks the written folder.",
    )
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------------------
def read_config(path: str) -> dict:
    """The original network's arguments, the class's defaults filling what the file leaves out."""
    config = read_json(path, "--original_config")
    kwargs = config.get("network_kwargs", config)
    if not isinstance(kwargs, dict):
        raise ValueError(f"`--original_config` {path} must hold a JSON object of the network's arguments.")
    if kwargs and not set(kwargs) & {*DEFAULTS, *UNSUPPORTED_OPTIONS, *PRECOND_OPTIONS}:
        raise ValueError(  # another file (score_sde's config): read as arguments, every option would be a default
            f"`--original_config` {path} has no `network_kwargs` and none of the network's arguments, only "
            f"{sorted(kwargs)[:8]}: give a run's training_options.json or the network's init_kwargs (score_sde's "
            "NCSN++ config converts with original_multistage_ncsnpp)."
        )
    precond = str(kwargs.get("class_name", "EDMPrecond")).rsplit(".", 1)[-1]
    if precond != "EDMPrecond":
        raise ValueError(
            f"The original network uses {precond}, which does not convert: only EDMPrecond's preconditioning "
            "(c_noise = ln(sigma)/4) is what diffusers' EDM schedulers compute."
        )
    check_option_kinds(kwargs, DEFAULTS, f"`--original_config` {path}")
    p = {**DEFAULTS, **kwargs}
    for option, (supported, why) in UNSUPPORTED_OPTIONS.items():
        if p.get(option, supported) != supported:
            raise ValueError(f"The original network sets `{option}`={p[option]!r}, which does not convert: {why}.")
    return p


def stage_boundaries(p: dict) -> tuple[float, ...]:
    """Sigma boundaries of the original ``stage_interval``: one interval per stage, contiguous, from sigma 0 up."""
    inner = stage_interval_boundaries(
        p["stage_interval"],
        p["stage_num"],
        len(p["de_model_channels"]),
        "de_model_channels",
        lambda end: not math.isfinite(end) or end >= 1e3,
        "sigma 0 to infinity",
    )
    return tuple(inner)


def model_config(p: dict, state_dict: dict[str, torch.Tensor]) -> dict:
    """`MultiStageDDPMppUNet2DModel` arguments; resolution, channels and label width read off the weights (they
    come from the data set, not from the network's options)."""
    convs = [k for k in state_dict if k.startswith("enc.") and k.endswith("_conv.weight")]
    if len(convs) != 1 or "map_layer0.weight" not in state_dict:
        raise ValueError(
            "The checkpoint is not an EDM MultistageUNet: it lacks the input convolution `enc.<R>x<R>_conv.weight` "
            "or the noise mapping `map_layer0.weight`."
        )
    conv = state_dict[convs[0]]
    label = state_dict.get("map_label.weight")
    augment = state_dict.get("map_augment.weight")
    config = {
        "sample_size": int(convs[0][len("enc.") :].split("x", 1)[0]),
        "in_channels": conv.shape[1],
        "out_channels": conv.shape[1],  # EDMPrecond: out_channels = img_channels
        "encoder_channels": p["en_model_channels"],
        "decoder_channels": tuple(p["de_model_channels"]),
        "channel_mult": tuple(p["channel_mult"]),
        "channel_mult_emb": p["channel_mult_emb"],
        "layers_per_block": p["num_blocks"],
        "attention_resolutions": tuple(p["attn_resolutions"]),
        "dropout": float(p["dropout"]),
        "num_class_embeds": None if label is None else label.shape[1] + 1,  # + the "no class" label (zeros)
        "augment_dim": 0 if augment is None else augment.shape[1],
        "norm_num_groups": 16,  # the authors' GroupNorm: min(16, channels // 4) groups
        "norm_eps": 1e-6,
        "stage_boundaries": stage_boundaries(p),
        "boundary_units": "sigma",
    }
    for option, ours in (("img_resolution", "sample_size"), ("img_channels", "in_channels")):
        if option in p and p[option] != config[ours]:
            raise ValueError(f"The config's `{option}`={p[option]} disagrees with the checkpoint's {config[ours]}.")
    if p.get("label_dim") is not None and (p["label_dim"] or None) != (label.shape[1] if label is not None else None):
        raise ValueError(f"The config's `label_dim`={p['label_dim']} disagrees with the checkpoint's class mapping.")
    return config


def block_names(p: dict, resolution: int) -> tuple[list[str], list[str]]:
    """The original's encoder and (one) decoder block names, in the order the converted model runs them."""
    encoder, decoder, levels = [], [], len(p["channel_mult"])
    for level in range(levels):
        res = resolution >> level
        encoder += ([f"{res}x{res}_down"] if level else []) + [f"{res}x{res}_block{i}" for i in range(p["num_blocks"])]
    for level in reversed(range(levels)):
        res = resolution >> level
        decoder += [f"{res}x{res}_in0", f"{res}x{res}_in1"] if level == levels - 1 else [f"{res}x{res}_up"]
        decoder += [f"{res}x{res}_block{i}" for i in range(p["num_blocks"] + 1)]
    return encoder, decoder


def rename_block(source: str, target: str, state_dict: dict, out: dict) -> None:
    """One UNetBlock: the table's layers, the fused ``qkv`` split into ``to_q``/``to_k``/``to_v``, and the [1, 1]
    resampling filters (buffers, fixed by the architecture) checked and dropped."""
    for layer in ("conv0", "skip"):
        buffer = state_dict.pop(f"{source}.{layer}.resample_filter", None)
        if buffer is not None and not torch.equal(buffer.float().reshape(-1), AVERAGE_2X2.reshape(-1)):
            raise ValueError(f"{source}.{layer}.resample_filter is not the [1, 1] filter this conversion supports.")
    for key in [k for k in state_dict if k.startswith(source + ".")]:
        layer, param = key[len(source) + 1 :].rsplit(".", 1)
        if layer == "qkv":
            continue
        if layer not in UNET_BLOCK:
            raise ValueError(f"Unexpected key {key!r}: not a layer of the original UNetBlock.")
        value = take(state_dict, key)
        out[f"{target}.{UNET_BLOCK[layer]}.{param}"] = (
            value.flatten(1) if layer == "proj" and value.ndim == 4 else value
        )
    for param in ("weight", "bias"):
        if f"{source}.qkv.{param}" not in state_dict:
            continue
        qkv = take(state_dict, f"{source}.qkv.{param}")
        with rearranging(f"{source}.qkv.{param}", qkv):
            channels = qkv.shape[0] // 3
            rows = qkv.reshape(channels, 3, -1)  # the original reads channel c of q, k, v from rows 3c, 3c+1, 3c+2
            for i, name in enumerate(("to_q", "to_k", "to_v")):
                out[f"{target}.attention.{name}.{param}"] = rows[:, i].reshape(channels, *qkv.shape[1:2]).clone()


def edm_to_ddpmpp(state_dict: dict[str, torch.Tensor], p: dict, resolution: int) -> dict[str, torch.Tensor]:
    """Rename an original ``MultistageUNet`` state dict to `MultiStageDDPMppUNet2DModel`'s keys."""
    state_dict, out = dict(state_dict), {}
    encoder, decoder = block_names(p, resolution)
    # 1. noise, class and augmentation mappings; input convolution
    for source, target in TOP_LEVEL.items():
        move_layer(state_dict, source, target, out, optional=True)
    move_layer(state_dict, f"enc.{resolution}x{resolution}_conv", "conv_in", out)
    # 2. encoder blocks, in order -> down_blocks[i]
    for i, name in enumerate(encoder):
        rename_block(f"enc.{name}", f"down_blocks.{i}", state_dict, out)
    # 3. decoders: in0, in1 -> mid_blocks; the rest, in order -> up_blocks[i]; aux_norm, aux_conv -> output head
    for s in range(p["stage_num"]):
        for i, name in enumerate(decoder):
            target = f"decoders.{s}.mid_blocks.{i}" if i < 2 else f"decoders.{s}.up_blocks.{i - 2}"
            rename_block(f"decs.{s}.{name}", target, state_dict, out)
        for layer, target in OUTPUT_HEAD.items():
            move_layer(state_dict, f"decs.{s}.{resolution}x{resolution}_{layer}", f"decoders.{s}.{target}", out)
    check_consumed(state_dict)
    return out


def network_state_dict(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The network's weights: an EDMPrecond state dict keeps them under ``model.``."""
    if any(k.startswith("model.diffusion_model.") for k in raw):
        raise ValueError(
            "This is a latent-diffusion `UNetModel_multistage` checkpoint: convert it with "
            "`python -m diffusers_stages.conversion.original_multistage`."
        )
    if any(k.startswith("model.") for k in raw):
        return {k[len("model.") :]: v for k, v in raw.items() if k.startswith("model.")}
    return dict(raw)


def edm_scheduler(p: dict) -> EDMDPMSolverMultistepScheduler:
    """The diffusers EDM scheduler closest to the authors' Heun sampler (see the module docstring): second order, on
    ``generate.py``'s Karras schedule (``sigma_min=0.002``, ``sigma_max=80``, ``rho=7``), with EDMPrecond's
    preconditioning (``prediction_type="epsilon"``, the network's ``sigma_data``)."""
    return EDMDPMSolverMultistepScheduler(
        sigma_min=0.002,
        sigma_max=80.0,
        rho=7.0,
        sigma_data=float(p["sigma_data"]),
        prediction_type="epsilon",
        algorithm_type="dpmsolver++",
        solver_order=2,
    )


# --------------------------------------------------------------------------------------------------------------
def verify_against_original(
    repo: str, p: dict, state_dict: dict, pipeline: MultiStagePipeline, tolerance: float
) -> None:
    """Run the original EDMPrecond-wrapped network (imported from ``repo``) and the converted pipeline's model and
    scheduler preconditioning on the same input, at one sigma inside each stage."""
    sys.path.insert(0, os.path.abspath(repo))
    try:
        networks = importlib.import_module("training.networks")
    except ImportError as error:
        raise ValueError(f"`--original_repo` {repo} does not provide training.networks: {error}") from error
    finally:
        sys.path.pop(0)
    model, scheduler = pipeline.unet, pipeline.scheduler
    config = model.config
    label_dim = num_data_classes(config.num_class_embeds)
    interface = ("class_name", "sigma_data", "img_resolution", "img_channels", "label_dim", "use_fp16", "augment_dim")
    options = {k: v for k, v in p.items() if k not in interface}
    original = networks.EDMPrecond(
        img_resolution=config.sample_size,
        img_channels=config.in_channels,
        label_dim=label_dim,
        augment_dim=config.augment_dim,
        sigma_data=p["sigma_data"],
        **options,
    ).eval()
    original.model.load_state_dict(state_dict, strict=True)
    x = torch.randn(2, config.in_channels, config.sample_size, config.sample_size, generator=torch.manual_seed(0))
    labels = torch.tensor([0, label_dim - 1]) if label_dim else None
    one_hot = torch.nn.functional.one_hot(labels, label_dim).float() if label_dim else None
    differences = {}
    with torch.no_grad():
        for stage, probe in enumerate(probe_timesteps(model.partition)):
            sigma = torch.full((2,), math.exp(4 * probe))
            # the network F on the same input, then the denoiser D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)
            # with EDMPrecond's preconditioning against the scheduler's
            scaled, c_noise = scheduler.precondition_inputs(x, sigma[0]), scheduler.precondition_noise(sigma[0])
            output = model(scaled, c_noise, class_labels=labels).sample
            name = f"stage {stage} at sigma {sigma[0]:.4g}"
            differences[f"{name}: network"] = max_difference(
                original.model(scaled, c_noise.reshape(1), one_hot), output
            )
            ours = scheduler.precondition_outputs(x, output, sigma[0])
            differences[f"{name}: denoised image"] = max_difference(original(x, sigma, class_labels=one_hot), ours)
    report_verification(differences, tolerance)


@torch.no_grad()
def main(args: argparse.Namespace) -> MultiStagePipeline:
    with staged_output(args.output_path, args.overwrite, input_paths(args)) as tmp:
        # 1. read the architecture and the weights; fail early on anything that does not convert exactly
        p = read_config(args.original_config)
        original = network_state_dict(load_state_dict(args.checkpoint))
        config = model_config(p, original)
        source = f"The checkpoint {args.checkpoint}"
        model = build_for_checkpoint(lambda: MultiStageDDPMppUNet2DModel(**config), original, source)
        # 2. rename, then check against the target model: strict keys and shapes
        converted = edm_to_ddpmpp(original, p, config["sample_size"])
        load_converted(model, converted, f"The checkpoint {args.checkpoint}")
        # 3. write the pipeline (EDM's preconditioning and Karras schedule), reload it, and compare if asked
        pipeline = write_and_verify(
            args, model, edm_scheduler(p), tmp,
            verify_original=lambda pipe: verify_against_original(args.original_repo, p, original, pipe, args.tolerance),
        )  # fmt: skip
    print(
        f"wrote {args.output_path}: MultiStagePipeline, sigma stages {pipeline.partition.intervals()} from {args.checkpoint}"
    )
    return pipeline


if __name__ == "__main__":
    run(main, parse_args, sys.argv[1:])
