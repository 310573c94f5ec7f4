"""Convert a checkpoint of the public multi-stage code (LucasYFL/Multistage_Diffusion, Zhang et al. CVPR 2024)
into a `MultiStagePipeline` folder, through the explicit key-rename table below and strict key checks.

Latent-diffusion `UNetModel_multistage` checkpoints convert exactly, the published CelebA-HQ configs included:

- tailored decoders (``de_nfs`` other than ``model_channels``): the original decoder concatenates the encoder's skip
  connections at the *encoder's* widths straight into its resnets, and the middle block's output enters the first
  one at the encoder's last width; this is `MultiStageUNet2DModel(decoder_skip_adapters=False)`.
- decoders that differ in where they attend: the original builds decoder ``s >= 1`` with the down-sampling counter
  left at 1 by decoder 0 (`decoder_attention`): with two or more levels, decoder 1 attends only at its deepest
  level and only if ``attention_resolutions`` contains 1, later decoders nowhere; this is ``decoder_up_block_types``.

- class-conditional ImageNet configs (``cin-mul*``): spatial transformers attending to a ``ClassEmbedder``'s one-token
  context become a `MultiStageUNet2DConditionModel` (cross-attention blocks, the decoders' own heads of
  ``num_head_channels`` each, `decoder_attention_head_dim`) and a `ClassContextEmbedding` (the pipeline's
  ``class_embedder``). The package reserves the last class embedding for the unconditional label: a ``ClassEmbedder``
  without one (``n_classes: 1000``, all ImageNet classes) gets a zero embedding 1000 appended, never trained, so
  that all 1000 classes stay usable; sample such a model with ``guidance_scale=1``. (``cin256-v2-mul`` has 1001
  classes, 1000 being the authors' unconditional label, and converts as is.) A ``num_classes`` model (a class
  embedding added to the time embedding) gets its unconditional label the same way (``--unconditional_label``).

Options without a diffusers equivalent are refused with the reason (`UNSUPPORTED_OPTIONS`: ``use_scale_shift_norm``,
residual up/down-sampling, ...). EDM `MultistageUNet` (DDPM++) checkpoints are
recognised and sent to `original_multistage_edm`, their own script.

Weights: the EMA weights by default (LitEma's ``model_ema.*``, which the authors' sampling script uses through
``ema_scope``), the raw training weights with ``--no_ema``. Scheduler: the authors' DDIM sampler, which adds 1 to
every timestep (`DDIMScheduler` with ``steps_offset=1``, "leading" spacing; see `scheduler_from_config`).

    python -m diffusers_stages.conversion.original_multistage --checkpoint last.safetensors \\
        --original_config configs/latent-diffusion/celebahq-ldm-vq-4_multistage.yaml --output_path staged --verify \\
        --original_repo Multistage_Diffusion/latent-diffusion
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys

import torch
import yaml
from diffusers import AutoencoderKL, DDIMScheduler, VQModel

from diffusers_stages.cli import refuse_pipeline_folder
from diffusers_stages.conversion.common import (
    _is_number,
    build_for_checkpoint,
    build_parser,
    check_consumed,
    check_option_kinds,
    folder_value,
    input_paths,
    load_converted,
    load_state_dict,
    load_strict,
    max_difference,
    move_layer,
    probe_timesteps,
    read_json,
    rearranging,
    report_verification,
    run,
    source_folder,
    staged_output,
    take,
    with_appended_class,
    write_and_verify,
)
from diffusers_stages.models import ClassContextEmbedding, MultiStageUNet2DConditionModel, MultiStageUNet2DModel
from diffusers_stages.pipelines import MultiStagePipeline
from diffusers_stages.pipelines.pipeline_staged import _vae_latent_channels

LDM_PREFIX = "model.diffusion_model."  # where a LatentDiffusion Lightning checkpoint keeps its U-Net
EMA_PREFIX = "model_ema."  # LitEma's buffers: "model_ema." + the DiffusionWrapper's parameter name without dots
EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")  # LitEma's own state, not weights
CLASS_EMBEDDER_KEY = "cond_stage_model.embedding.weight"  # ClassEmbedder (trained, not in LitEma: its raw weights)

# --------------------------------------------------------------------------------------------------------------
# the key-rename table: original (openaimodel) layer -> MultiStageUNet2DModel (diffusers UNet2DModel names)
RESBLOCK = {  # ResBlock -> ResnetBlock2D
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
ATTENTION = {"norm": "group_norm", "proj_out": "to_out.0"}  # AttentionBlock -> Attention (qkv is split, below)
TOP_LEVEL = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb": "class_embedding",
    "input_blocks.0.0": "conv_in",
}
DECODER_OUT = {"0": "conv_norm_out", "2": "conv_out"}  # outs.{s}.{i}
# the U-Net options the conversion reads that have no default here (channel_mult's original default is not assumed)
REQUIRED_OPTIONS = ("image_size", "in_channels", "out_channels", "model_channels", "num_res_blocks",
                    "attention_resolutions", "channel_mult")  # fmt: skip
# the kind of value each architecture option has (a list, a number), checked before the conversion reads them
OPTION_KINDS = {"image_size": 0, "in_channels": 0, "out_channels": 0, "model_channels": 0, "num_res_blocks": 0,
                "attention_resolutions": [], "channel_mult": [], "de_nfs": [], "stage_interval": []}  # fmt: skip
# LatentDiffusion's schedule defaults
SCHEDULE_DEFAULTS = {"timesteps": 1000, "linear_start": 0.0015, "linear_end": 0.0195, "cosine_s": 8e-3}
# ldm's `make_beta_schedule` names -> diffusers' `beta_schedule` for the same betas (cosine only at diffusers' fixed
# offset s = 0.008, ldm's default `cosine_s`); "sqrt" and `given_betas` have no diffusers equivalent
BETA_SCHEDULES = {"linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "squaredcos_cap_v2"}
PARAMETERIZATIONS = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}  # LatentDiffusion's -> diffusers'
UNSUPPORTED_OPTIONS = {  # original option -> (value that converts, why other values do not)
    "dims": (2, "only 2D U-Nets have a diffusers UNet2DModel equivalent"),
    "resblock_updown": (False, "UNet2DModel up/down-samples with convolutions, not residual blocks"),
    "conv_resample": (True, "UNet2DModel's down/up-samplers are convolutions"),
    "n_embed": (None, "codebook-id prediction heads have no UNet2DModel equivalent"),
    "use_scale_shift_norm": (
        False,
        (
            "diffusers' UNetMidBlock2D builds its attention without group norm when resnet_time_scale_shift="
            "'scale_shift', the original normalises"
        ),
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser(__doc__)
    parser.add_argument(
        "--checkpoint",
        required=True,
        help=f"The original model's weights as .safetensors: a LatentDiffusion state dict (U-Net under {LDM_PREFIX!r}, "
        f"its EMA under {EMA_PREFIX!r}; its other modules are ignored) or the U-Net's own state dict (converted as "
        "given).",
    )
    parser.add_argument(
        "--no_ema",
        action="store_true",
        help="Convert the raw training weights (model.diffusion_model.*) instead of the EMA ones (model_ema.*). By "
        "default the EMA weights are converted: the authors' configs train with EMA (`use_ema`, true by default) "
        "and their sampling script samples inside `ema_scope`, so published samples come from the EMA weights. "
        "The raw weights are for resuming training; convert them into a second folder with this flag. A checkpoint "
        "without EMA weights is refused unless its config sets `use_ema: false` or this flag is given.",
    )
    parser.add_argument(
        "--original_config",
        required=True,
        help="The original latent-diffusion YAML config (model.params.unet_config.params gives the architecture; "
        "timesteps, linear_start and linear_end give the scheduler).",
    )
    parser.add_argument(
        "--vae",
        help="Optional diffusers VQModel or AutoencoderKL folder (the converted first stage) to include in the pipeline.",
    )
    parser.add_argument(
        "--unconditional_label",
        type=int,
        help="Class-conditional models (a ClassEmbedder, as `cin-mul*`, or `num_classes`): the class index the "
        "original samples unconditionally with (`cin256-v2-mul`: 1000, the last of its 1001 classes). It must be the "
        "last class, the package's unconditional label. Without it every class is a data class and a zero "
        "embedding is appended as the (untrained) unconditional label.",
    )
    parser.add_argument(
        "--original_repo",
        type=folder_value,
        help="For --verify: the `latent-diffusion` folder of a LucasYFL/Multistage_Diffusion checkout, to run the "
        "original model on the same input. Without it --verify only reloads and checks the written folder.",
    )
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------------------
def read_config(path: str) -> tuple[dict, dict]:
    """``(unet_params, diffusion_params)`` from an original latent-diffusion YAML config, checked to hold the U-Net
    options the conversion reads and a known ``parameterization``."""
    if not os.path.isfile(path):
        raise ValueError(f"`--original_config` must be an existing YAML file, got {path!r}.")
    with open(path, encoding="utf-8") as f:
        try:
            config = yaml.safe_load(f)
        except yaml.YAMLError as error:
            raise ValueError(f"`--original_config` {path} is not YAML: {error}") from None
    try:
        params = config["model"]["params"]
        unet = params["unet_config"]
    except (KeyError, TypeError):
        raise ValueError(f"{path} is not a latent-diffusion config: it has no model.params.unet_config.") from None
    if not isinstance(unet, dict):
        raise ValueError(f"{path}: model.params.unet_config must be a mapping, got {unet!r}.")
    if not str(unet.get("target", "")).endswith("UNetModel_multistage"):
        raise ValueError(f"{path} describes a {unet.get('target')}, not ldm's UNetModel_multistage.")
    if not isinstance(unet.get("params"), dict):
        raise ValueError(f"{path}: model.params.unet_config.params must be a mapping, got {unet.get('params')!r}.")
    missing = [option for option in REQUIRED_OPTIONS if option not in unet["params"]]
    if missing:
        raise ValueError(f"{path} lacks the U-Net options {missing} (model.params.unet_config.params).")
    check_option_kinds(unet["params"], OPTION_KINDS, f"`--original_config` {path}", kinds_only=True)
    for option, kind in OPTION_KINDS.items():  # a list's items too (a nested or string one was a TypeError)
        values = unet["params"].get(option)
        if isinstance(kind, list) and values is not None and not all(_is_number(v) for v in values):
            raise ValueError(f"`--original_config` {path}: `{option}`={values!r} must be a list of numbers.")
    check_option_kinds(params, SCHEDULE_DEFAULTS, f"`--original_config` {path}")
    timesteps = params.get("timesteps", SCHEDULE_DEFAULTS["timesteps"])
    if not float(timesteps).is_integer() or timesteps < 1:
        raise ValueError(f"{path}: `timesteps` must be a positive integer, got {timesteps!r}.")
    check_beta_schedule(params, path)
    conditioning = params.get("conditioning_key")
    if conditioning in ("concat", "hybrid") and not unet["params"].get("use_spatial_transformer", False):
        raise ValueError(
            f"{path} sets `conditioning_key`={conditioning!r}: the model takes an image concatenated to its input "
            "(super-resolution, inpainting), which MultiStagePipeline does not give; unconditional, class-conditional "
            "and ClassEmbedder (`cin-mul*`) models convert."
        )
    parameterization = params.get("parameterization", "eps")
    if not isinstance(parameterization, str) or parameterization not in PARAMETERIZATIONS:
        raise ValueError(
            f"{path} sets `parameterization`={params['parameterization']!r}: one of {list(PARAMETERIZATIONS)} converts."
        )
    return dict(unet["params"]), params


def check_beta_schedule(params: dict, path: str) -> None:
    """Refuse a noise schedule the pipeline's `DDIMScheduler` cannot reproduce (it would sample on other betas than
    the model was trained on)."""
    schedule, cosine_s = params.get("beta_schedule", "linear"), params.get("cosine_s", SCHEDULE_DEFAULTS["cosine_s"])
    if params.get("given_betas") is not None:
        raise ValueError(f"{path} sets `given_betas`: only ldm's named schedules {list(BETA_SCHEDULES)} convert.")
    if not isinstance(schedule, str) or schedule not in BETA_SCHEDULES:
        raise ValueError(
            f"{path} sets `beta_schedule`={schedule!r}, which has no diffusers equivalent: one of "
            f"{list(BETA_SCHEDULES)} converts."
        )
    if schedule == "cosine" and cosine_s != SCHEDULE_DEFAULTS["cosine_s"]:
        raise ValueError(
            f"{path} sets `cosine_s`={cosine_s!r}: diffusers' cosine schedule (squaredcos_cap_v2) has ldm's default "
            f"offset {SCHEDULE_DEFAULTS['cosine_s']} only."
        )


def ldm_unet_config(p: dict) -> dict:
    """`MultiStageUNet2DModel` arguments for the original ``UNetModel_multistage`` arguments ``p`` (those of a
    `MultiStageUNet2DConditionModel` for a model with spatial transformers, see `ldm_cross_attention_config`)."""
    for option, (supported, why) in UNSUPPORTED_OPTIONS.items():
        if p.get(option, supported) != supported:
            raise ValueError(f"The original model sets `{option}`={p[option]!r}, which does not convert: {why}.")
    if p.get("use_spatial_transformer", False):
        return ldm_cross_attention_config(p)
    heads, head_channels = p.get("num_heads", -1), p.get("num_head_channels", -1)
    if head_channels == -1 and (heads != 1 or p.get("num_heads_upsample", -1) not in (-1, 1)):
        raise ValueError(
            f"`num_heads`={heads} with `num_head_channels`=-1 gives a fixed head count at every width; UNet2DModel "
            "fixes the head *width* (`attention_head_dim`), so only one head or a fixed `num_head_channels` converts."
        )
    return {**ldm_layout(p, "Attn"), "attention_head_dim": None if head_channels == -1 else head_channels}


def ldm_cross_attention_config(p: dict) -> dict:
    """`MultiStageUNet2DConditionModel` arguments for an original model with spatial transformers (``cin-mul*``).
    The original's transformer at a block of width ``ch`` has ``ch // num_head_channels`` heads (or ``num_heads``
    heads of ``ch // num_heads`` channels), which is diffusers' ``Transformer2DModel`` with that many heads
    (`attention_head_dim` counts heads in `UNet2DConditionModel`); tailored decoders get their own counts."""
    context_dim, depth = p.get("context_dim"), p.get("transformer_depth", 1)
    if isinstance(context_dim, bool) or not isinstance(context_dim, int) or context_dim < 1:
        raise ValueError(f"`context_dim` must be one positive integer for spatial transformers, got {context_dim!r}.")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"`transformer_depth` must be one positive integer, got {depth!r}.")
    if p.get("num_classes") is not None:
        raise ValueError(
            f"The original model sets `num_classes`={p['num_classes']!r} together with spatial transformers: a class "
            "embedding added to the time embedding as well as the ClassEmbedder's context, which no published config "
            "does and MultiStagePipeline does not sample (it gives the class through `class_embedder` only)."
        )
    heads, head_channels = p.get("num_heads", -1), p.get("num_head_channels", -1)
    if head_channels == -1 and heads < 1:
        raise ValueError("The original model sets neither `num_heads` nor `num_head_channels`.")

    def head_counts(width: int) -> tuple[int, ...]:  # encoder order, as `attention_head_dim`
        return tuple(width * m // head_channels if head_channels != -1 else heads for m in p["channel_mult"])

    return {
        **ldm_layout(p, "CrossAttn"),
        "mid_block_type": "UNetMidBlock2DCrossAttn",  # ResBlock, SpatialTransformer, ResBlock
        "cross_attention_dim": context_dim,
        "transformer_layers_per_block": depth,
        "attention_head_dim": head_counts(p["model_channels"]),
        "use_linear_projection": False,  # the original's proj_in / proj_out are 1x1 convolutions
        "decoder_attention_head_dim": tuple(head_counts(nf) for nf in p.get("de_nfs", [p["model_channels"]])),
    }


def ldm_layout(p: dict, attention: str) -> dict:
    """The arguments both staged U-Nets take from the original's: sizes, levels, blocks (attention blocks named
    ``{attention}DownBlock2D`` / ``{attention}UpBlock2D``), stages and the tailored decoders."""
    width, levels = p["model_channels"], len(p["channel_mult"])
    attends = [2**level in p["attention_resolutions"] for level in range(levels)]
    up_types = [tuple(f"{attention}UpBlock2D" if a else "UpBlock2D" for a in stage) for stage in decoder_attention(p)]
    stage_interval = list(p.get("stage_interval", [])) or [1000]
    return {
        "sample_size": p["image_size"],
        "in_channels": p["in_channels"],
        "out_channels": p["out_channels"],
        "flip_sin_to_cos": True,  # ldm's timestep_embedding is [cos, sin], frequencies exp(-ln(1e4) i / half)
        "freq_shift": 0,
        "block_out_channels": tuple(width * m for m in p["channel_mult"]),
        "down_block_types": tuple(f"{attention}DownBlock2D" if a else "DownBlock2D" for a in attends),
        "up_block_types": up_types[0],
        "layers_per_block": p["num_res_blocks"],
        # ResBlocks: ldm's `normalization` is GroupNorm(32, eps 1e-5); transformers GroupNorm(32, eps 1e-6), as diffusers
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "num_class_embeds": p.get("num_classes"),
        "dropout": p.get("dropout", 0.0),
        "stage_boundaries": tuple(float(b) for b in stage_interval[:-1]),  # the original's upper stage bounds
        "decoder_block_out_channels": tuple(
            tuple(nf * m for m in p["channel_mult"]) for nf in p.get("de_nfs", [width])
        ),
        "decoder_skip_adapters": False,  # skips enter each decoder at the encoder's widths
        "decoder_up_block_types": tuple(up_types),
    }


def decoder_attention(p: dict) -> list[list[bool]]:
    """Whether each decoder attends at each up-level (deepest first), replaying the original's ``ds`` counter,
    which decoder 0 counts down to 1 and later decoders keep halving (to 0): decoder 1 attends at its deepest level
    only if ``attention_resolutions`` contains 1, decoders 2 and later attend nowhere (for two or more levels)."""
    levels, ds, layout = len(p["channel_mult"]), 2 ** (len(p["channel_mult"]) - 1), []
    for _ in p.get("de_nfs", [p["model_channels"]]):
        layout.append([])
        for up in range(levels):
            layout[-1].append(ds in p["attention_resolutions"])
            ds = ds // 2 if up < levels - 1 else ds
    return layout


def rename_resblock(prefix_from: str, prefix_to: str, state_dict: dict, out: dict) -> None:
    for key in [k for k in state_dict if k.startswith(prefix_from + ".")]:
        layer, param = key[len(prefix_from) + 1 :].rsplit(".", 1)
        if layer not in RESBLOCK:
            raise ValueError(f"Unexpected key {key!r}: not a layer of the original ResBlock.")
        out[f"{prefix_to}.{RESBLOCK[layer]}.{param}"] = take(state_dict, key)


def rename_attention(
    prefix_from: str, prefix_to: str, heads: int, legacy_order: bool, state_dict: dict, out: dict
) -> None:
    """AttentionBlock -> Attention: the fused 1x1 ``qkv`` convolution becomes ``to_q``, ``to_k``, ``to_v``."""
    for layer, target in ATTENTION.items():
        for param in ("weight", "bias"):
            value = take(state_dict, f"{prefix_from}.{layer}.{param}")
            out[f"{prefix_to}.{target}.{param}"] = (
                value.reshape(value.shape[0], -1) if param == "weight" and value.ndim == 3 else value
            )
    for param in ("weight", "bias"):
        qkv = take(state_dict, f"{prefix_from}.qkv.{param}")
        with rearranging(f"{prefix_from}.qkv.{param}", qkv):
            channels = qkv.shape[0] // 3
            # legacy order: heads first, then (q, k, v) per head; new order: (q, k, v) first, then heads
            rows = (
                qkv.reshape(heads, 3, channels // heads, -1)
                if legacy_order
                else qkv.reshape(3, heads, channels // heads, -1).transpose(0, 1)
            )
            for i, name in enumerate(("to_q", "to_k", "to_v")):
                value = rows[:, i].reshape(channels, -1)
                out[f"{prefix_to}.{name}.{param}"] = value if param == "weight" else value.reshape(channels)


def move_transformer(prefix_from: str, prefix_to: str, state_dict: dict, out: dict) -> None:
    """SpatialTransformer -> Transformer2DModel: the same layer names (norm, proj_in, transformer_blocks.N.{attn1,
    attn2, ff, norm1-3}, proj_out), under the block's new prefix."""
    for key in [k for k in state_dict if k.startswith(prefix_from + ".")]:
        out[prefix_to + key[len(prefix_from) :]] = take(state_dict, key)


def ldm_to_multistage(
    state_dict: dict[str, torch.Tensor], p: dict, model: MultiStageUNet2DModel | MultiStageUNet2DConditionModel
) -> dict:
    """Rename an original ``UNetModel_multistage`` state dict to ``model``'s keys (consumes ``state_dict``)."""
    state_dict, out = dict(state_dict), {}
    config = model.config
    levels, per_level = len(config.block_out_channels), config.layers_per_block + 1
    legacy = not p.get("use_new_attention_order", False)

    def heads(channels: int) -> int:
        return 1 if config.attention_head_dim is None else channels // config.attention_head_dim

    def move_attention(source: str, target: str, channels: int) -> bool:
        """The attention layer at ``source`` (an AttentionBlock or a SpatialTransformer), if there is one."""
        if f"{source}.proj_in.weight" in state_dict:
            move_transformer(source, target, state_dict, out)
        elif f"{source}.qkv.weight" in state_dict:
            rename_attention(source, target, heads(channels), legacy, state_dict, out)
        else:
            return False
        return True

    # 1. embeddings and input convolution
    for source, target in TOP_LEVEL.items():
        move_layer(state_dict, source, target, out, optional=True)
    # 2. encoder: input_blocks[1 + level * (layers + 1) + j] -> down_blocks[level]
    for level in range(levels):
        width = config.block_out_channels[level]
        for j in range(config.layers_per_block):
            index = 1 + level * per_level + j
            rename_resblock(f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{j}", state_dict, out)
            move_attention(f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{j}", width)
        if level < levels - 1:
            source = f"input_blocks.{1 + level * per_level + config.layers_per_block}.0.op"
            move_layer(state_dict, source, f"down_blocks.{level}.downsamplers.0.conv", out)
    # 3. middle block: ResBlock, AttentionBlock, ResBlock -> UNetMidBlock2D
    rename_resblock("middle_block.0", "mid_block.resnets.0", state_dict, out)
    if not move_attention("middle_block.1", "mid_block.attentions.0", config.block_out_channels[-1]):
        raise ValueError("The checkpoint lacks the middle block's attention ('middle_block.1.*').")
    rename_resblock("middle_block.2", "mid_block.resnets.1", state_dict, out)
    # 4. decoders: de_modules[s][up * (layers + 1) + j] -> decoders[s].up_blocks[up]; outs[s] -> output head
    for s in range(model.num_stages):
        for up in range(levels):
            width = config.decoder_block_out_channels[s][levels - 1 - up]
            for j in range(per_level):
                source, target = f"de_modules.{s}.{up * per_level + j}", f"decoders.{s}.up_blocks.{up}"
                rename_resblock(f"{source}.0", f"{target}.resnets.{j}", state_dict, out)
                layer = 2 if move_attention(f"{source}.1", f"{target}.attentions.{j}", width) else 1
                if j == per_level - 1 and up < levels - 1:
                    move_layer(state_dict, f"{source}.{layer}.conv", f"{target}.upsamplers.0.conv", out)
        for index, target in DECODER_OUT.items():
            move_layer(state_dict, f"outs.{s}.{index}", f"decoders.{s}.{target}", out)
    check_consumed(state_dict)
    return out


def unet_state_dict(
    raw: dict[str, torch.Tensor], use_ema: bool = True, trained_with_ema: bool = True
) -> dict[str, torch.Tensor]:
    """The U-Net's weights of a checkpoint, recognising the original code's two layouts: a LatentDiffusion state dict
    gives its LitEma weights (``use_ema``, see `ema_weights`) or its raw ones; a bare U-Net state dict is taken as is.
    ``trained_with_ema`` is the config's ``use_ema``: a checkpoint trained without EMA has only its raw weights,
    which is what the authors' ``ema_scope`` then samples with."""
    if any(k.startswith(("enc.", "decs.", "map_noise", "map_layer0")) or ".enc." in k for k in raw):
        raise ValueError(
            "This is an EDM `MultistageUNet` (DDPM++) checkpoint: convert it with "
            "`python -m diffusers_stages.conversion.original_multistage_edm`."
        )
    if not any(k.startswith(LDM_PREFIX) for k in raw):
        if any(k.startswith(EMA_PREFIX) for k in raw):
            raise ValueError(
                f"The checkpoint has LitEma weights ({EMA_PREFIX}*) but no raw U-Net weights ({LDM_PREFIX}*): the "
                "EMA names have no dots, so the raw names are needed to map them back. Export the whole state_dict."
            )
        print("note: a bare U-Net state dict: converting its weights as given (no Lightning EMA to choose from)")
        return dict(raw)
    unet = {k[len(LDM_PREFIX) :]: v for k, v in raw.items() if k.startswith(LDM_PREFIX)}
    if not use_ema:
        return unet
    ema = {k: v for k, v in raw.items() if k.startswith(EMA_PREFIX) and k not in EMA_BOOKKEEPING}
    if not ema and not trained_with_ema:
        print("note: the config sets `use_ema: false`: converting the raw weights, which its sampling uses")
        return unet
    if not ema:
        raise ValueError(
            f"The checkpoint has no EMA weights ({EMA_PREFIX}*), although its config trains with EMA (`use_ema` is "
            "true by default) and the authors sample with them: pass --no_ema to convert the raw weights instead."
        )
    return ema_weights(unet, ema)


def ema_weights(unet: dict[str, torch.Tensor], ema: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LitEma's weights under the U-Net's dotted names. LitEma stores ``diffusion_model.<name>`` with its dots
    removed, so the name table is built from the raw names; two raw names that lose their dots to the same string
    are refused (the EMA tensor would be ambiguous), as is an EMA set that does not cover the raw weights exactly."""
    table: dict[str, str] = {}
    for name in unet:
        flat = EMA_PREFIX + f"diffusion_model.{name}".replace(".", "")
        if flat in table:
            raise ValueError(f"The raw names {table[flat]!r} and {name!r} both map to the EMA name {flat!r}.")
        table[flat] = name
    unexpected = sorted(set(ema) - set(table))
    missing = sorted(table[k] for k in set(table) - set(ema))
    if unexpected or missing:
        raise ValueError(
            f"The checkpoint's EMA weights do not match its raw weights: {len(missing)} raw weights without an EMA "
            f"(first: {missing[:8]}), {len(unexpected)} EMA weights without a raw one (first: {unexpected[:8]}). "
            "Pass --no_ema to convert the raw weights."
        )
    return {table[k]: v for k, v in ema.items()}


def class_embedder_from(
    raw: dict[str, torch.Tensor], params: dict, unconditional_label: int | None, cross_attention_dim: int
) -> ClassContextEmbedding:
    """The pipeline's `ClassContextEmbedding` from the checkpoint's ``ClassEmbedder`` (``cond_stage_model``), the
    class-to-context embedding of a cross-attention model (``conditioning_key: crossattn``)."""
    stage = params.get("cond_stage_config") or {}
    target = stage.get("target", "") if isinstance(stage, dict) else ""
    if params.get("conditioning_key") != "crossattn" or not target.endswith("ClassEmbedder"):
        raise ValueError(
            f"Spatial transformers convert with a ClassEmbedder context only (`conditioning_key: crossattn`, "
            f"`cond_stage_config.target` ...ClassEmbedder, as `cin-mul*`), got {params.get('conditioning_key')!r} "
            f"and {target!r}."
        )
    if CLASS_EMBEDDER_KEY not in raw:
        raise ValueError(
            f"The checkpoint has no {CLASS_EMBEDDER_KEY!r}: convert the whole LatentDiffusion state dict (the class "
            "embeddings are trained with the U-Net), not the U-Net's alone."
        )
    weight = raw[CLASS_EMBEDDER_KEY]
    classes = stage.get("params", {}).get("n_classes", 1000)
    if tuple(weight.shape) != (classes, cross_attention_dim):
        raise ValueError(
            f"{CLASS_EMBEDDER_KEY} has shape {tuple(weight.shape)}, but the config's ClassEmbedder has {classes} "
            f"classes of the U-Net's context width {cross_attention_dim}."
        )
    if unconditional_label is None:  # every class is a data class: append an (untrained) unconditional embedding
        print(
            f"note: the original's {classes} classes are all data classes: a zero embedding {classes} is appended as "
            "the unconditional label; it was never trained, so sample with guidance_scale=1"
        )
        weight = torch.cat([weight, torch.zeros_like(weight[:1])])
    elif unconditional_label != classes - 1:
        raise ValueError(
            f"`--unconditional_label` must be the last class ({classes - 1}), the package's unconditional label, "
            f"got {unconditional_label}."
        )
    embedder = ClassContextEmbedding(num_class_embeds=weight.shape[0], cross_attention_dim=cross_attention_dim)
    embedder.embedding.weight.data.copy_(weight)
    return embedder


def with_unconditional_class(model: MultiStageUNet2DModel, unconditional_label: int | None) -> MultiStageUNet2DModel:
    """``model`` of a ``num_classes`` original (its ``label_emb`` as ``class_embedding``) with the package's
    unconditional label, its last class embedding, as `class_embedder_from` gives a ClassEmbedder's: the original's
    last class when ``unconditional_label`` (`--unconditional_label`) names it, else a copy with a zero embedding
    appended (never trained) so that every original class stays a data class."""
    classes = model.config.num_class_embeds
    if unconditional_label is not None and unconditional_label != classes - 1:
        raise ValueError(
            f"`--unconditional_label` must be the last class ({classes - 1}), the package's unconditional label, "
            f"got {unconditional_label}."
        )
    if unconditional_label is not None:
        return model
    print(
        f"note: the original's {classes} classes are all data classes: a zero class embedding {classes} is appended "
        "as the unconditional label; it was never trained, so sample with guidance_scale=1"
    )
    return with_appended_class(model)


def scheduler_from_config(params: dict) -> DDIMScheduler:
    """The authors' DDIM sampler (``ldm/models/diffusion/ddim.py``) as a diffusers `DDIMScheduler`.

    - LDM's "linear" schedule is diffusers' "scaled_linear": betas = linspace(sqrt(start), sqrt(end))^2; its
      "sqrt_linear" is diffusers' "linear" and its "cosine" diffusers' "squaredcos_cap_v2" (`BETA_SCHEDULES`).
    - ``make_ddim_timesteps`` ("uniform") takes ``range(0, T, T // steps)`` and adds 1 to every timestep: diffusers'
      "leading" spacing with ``steps_offset=1`` (``1, 21, ..., 981`` for 50 steps). When ``steps`` does not divide
      ``T`` the original's ``range`` yields more steps than asked (31 for 30); diffusers gives exactly ``steps``.
    - the last step's previous alpha is ``alphas_cumprod[0]``, not 1 (``set_alpha_to_one=False``); no clipping.
    The authors' published samples use ``eta=0`` and 20 steps (``sample.sh``: ``-e 0 -c 20``).
    """
    prediction = PARAMETERIZATIONS[params.get("parameterization", "eps")]
    return DDIMScheduler(
        num_train_timesteps=int(params.get("timesteps", SCHEDULE_DEFAULTS["timesteps"])),
        beta_start=params.get("linear_start", SCHEDULE_DEFAULTS["linear_start"]),
        beta_end=params.get("linear_end", SCHEDULE_DEFAULTS["linear_end"]),
        beta_schedule=BETA_SCHEDULES[params.get("beta_schedule", "linear")],
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type=prediction,
    )


def load_vae(path: str, diffusion: dict):
    """The `--vae` folder's model, decoding at the latent scale the original was trained at: LatentDiffusion's
    ``scale_factor`` (1.0 when absent), not the folder's own ``scaling_factor`` (VQModel's default is 0.18215), as
    diffusers' conversion of latent-diffusion checkpoints sets it. A path that is not a folder is refused by name
    (diffusers would take it for a Hub repository id)."""
    source_folder(path, "--vae")
    refuse_pipeline_folder(path, "--vae")  # (an LDMPipeline folder: its `vqvae` is meant)
    scale = diffusion.get("scale_factor", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"`--original_config`: `scale_factor`={scale!r} must be a positive number.")
    # the class its config names (trying both named a VQModel whose weights fail "neither a VQModel nor ...")
    config_path = os.path.join(path, "config.json")
    name = read_json(config_path, "config.json").get("_class_name") if os.path.isfile(config_path) else None
    vae_class = {cls.__name__: cls for cls in (VQModel, AutoencoderKL)}.get(name)
    if vae_class is None:
        found = f"its config.json names {name!r}" if os.path.isfile(config_path) else "it has no config.json"
        raise ValueError(f"`--vae` {path} is neither a VQModel nor an AutoencoderKL folder: {found}.")
    vae = load_strict(vae_class, path)
    if vae.config.scaling_factor != scale:
        print(
            f"`--vae` {path}: scaling_factor {vae.config.scaling_factor} -> {float(scale)} (the original's scale_factor)"
        )
        vae.register_to_config(scaling_factor=float(scale))
    return vae


def check_vae_latents(vae, path: str | None, in_channels: int) -> None:
    """Refuse a ``--vae`` whose latents the U-Net does not denoise (other channels than its ``in_channels``): the
    pipeline would be written, and fail at every sampling call."""
    if vae is None:
        return
    channels = _vae_latent_channels(vae)
    if channels != in_channels:
        raise ValueError(
            f"`--vae` {path} decodes latents of {channels} channels, but the checkpoint's U-Net denoises "
            f"`in_channels`={in_channels}: give the first stage the original model was trained with."
        )


# --------------------------------------------------------------------------------------------------------------
def verify_against_original(
    repo: str,
    p: dict,
    state_dict: dict,
    pipeline: MultiStagePipeline,
    tolerance: float,
    class_embeddings: torch.Tensor | None = None,
) -> None:
    """Run the original `UNetModel_multistage` (imported from ``repo``) and the converted pipeline's U-Net on the same
    input; a cross-attention model attends to the original ``ClassEmbedder``'s ``class_embeddings`` rows (its
    forward: ``embedding(labels[:, None])``) and to the converted pipeline's ``class_embedder``."""
    sys.path.insert(0, os.path.abspath(repo))
    try:
        openaimodel = importlib.import_module("ldm.modules.diffusionmodules.openaimodel")
    except ImportError as error:
        raise ValueError(
            f"`--original_repo` {repo} does not provide ldm.modules.diffusionmodules.openaimodel: {error}"
        ) from error
    finally:
        sys.path.pop(0)
    original = openaimodel.UNetModel_multistage(**p).eval()
    original.load_state_dict(state_dict, strict=True)
    model = pipeline.unet
    config = model.config
    x = torch.randn(2, config.in_channels, config.sample_size, config.sample_size, generator=torch.manual_seed(0))
    labels = torch.zeros(2, dtype=torch.long) if config.num_class_embeds else None
    theirs, ours = {"y": labels} if labels is not None else {}, {"class_labels": labels}
    if class_embeddings is not None:  # two different classes, the last of the original's among them
        classes = torch.tensor([0, class_embeddings.shape[0] - 1])
        theirs["context"] = class_embeddings[classes][:, None]
        ours["encoder_hidden_states"] = pipeline.class_embedder(classes)
    differences = {}
    for stage, t in enumerate(probe_timesteps(model.partition)):
        t = torch.full((2,), int(t))
        differences[f"stage {stage} at timestep {int(t[0])}"] = max_difference(
            original(x, t, **theirs), model(x, t, **ours).sample
        )
    report_verification(differences, tolerance)


@torch.no_grad()
def main(args: argparse.Namespace) -> MultiStagePipeline:
    with staged_output(args.output_path, args.overwrite, input_paths(args)) as tmp:
        # 1. read the architecture and the weights; fail early on anything that does not convert exactly
        p, diffusion = read_config(args.original_config)
        vae = load_vae(args.vae, diffusion) if args.vae else None
        raw = load_state_dict(args.checkpoint)
        original = unet_state_dict(raw, not args.no_ema, diffusion.get("use_ema", True))
        config = ldm_unet_config(p)
        check_vae_latents(vae, args.vae, config["in_channels"])
        cross_attention = bool(p.get("use_spatial_transformer", False))
        model_class = MultiStageUNet2DConditionModel if cross_attention else MultiStageUNet2DModel
        model = build_for_checkpoint(lambda: model_class(**config), original, f"The checkpoint {args.checkpoint}")
        class_embedder, class_embeddings = None, None
        if cross_attention:  # the class labels' cross-attention context (the ClassEmbedder)
            class_embedder = class_embedder_from(
                raw, diffusion, args.unconditional_label, config["cross_attention_dim"]
            )
            class_embeddings = raw[CLASS_EMBEDDER_KEY]
        elif args.unconditional_label is not None and config.get("num_class_embeds") is None:
            raise ValueError(
                "`--unconditional_label` applies to class-conditional models only (`num_classes`, or a ClassEmbedder "
                "as `cin-mul*`)."
            )
        # 2. rename, then check against the target model: strict keys and shapes
        converted = ldm_to_multistage(original, p, model)
        load_converted(model, converted, f"The checkpoint {args.checkpoint}")
        if config.get("num_class_embeds") is not None:  # `num_classes`: the label as for a ClassEmbedder
            model = with_unconditional_class(model, args.unconditional_label)
        # 3. write the pipeline, reload it strictly, and compare with the original if asked
        pipeline = write_and_verify(
            args, model, scheduler_from_config(diffusion), tmp, vae=vae, class_embedder=class_embedder,
            verify_original=lambda pipe: verify_against_original(
                args.original_repo, p, original, pipe, args.tolerance, class_embeddings
            ),
        )  # fmt: skip
    print(
        f"wrote {args.output_path}: MultiStagePipeline, stages {pipeline.partition.intervals()} from {args.checkpoint}"
    )
    return pipeline


if __name__ == "__main__":
    run(main, parse_args, sys.argv[1:])
