"""Export one stage of a `MultiStagePipeline` (or `MultiStageUNet2DModel` folder) as a plain diffusers
`UNet2DModel`: the shared encoder plus that stage's decoder. The exported U-Net gives the multi-stage model's output
for that stage at every timestep, so the expert-routing and dual-backbone pipelines, or plain diffusers, can use it.
A Stable Diffusion / SDXL pipeline folder whose ``unet`` is a `MultiStageUNet2DConditionModel` (or such a model's
folder) exports as a plain `UNet2DConditionModel` the same way.

A pipeline with a ``class_embedder`` (the authors' class-conditional ``cin-mul*`` models) is refused: the class
embedding that gives its U-Net its context would be lost (its ``unet`` folder, given itself, exports the U-Net alone).

Only a decoder with the encoder's widths has a `UNet2DModel` equivalent (a tailored decoder needs skip adapters that
`UNet2DModel` does not have); any other stage is refused with the reason.

    python -m diffusers_stages.conversion.multistage_to_unet --source staged --stage 0 --output_path stage0 --verify
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from diffusers_stages.conversion.common import (
    build_parser,
    cast,
    input_paths,
    load_strict,
    max_difference,
    probe_class_labels,
    probe_tensor,
    probe_timesteps,
    read_json,
    report_verification,
    run,
    source_folder,
    staged_output,
    stored_dtype,
)
from diffusers_stages.models import MultiStageUNet2DConditionModel, MultiStageUNet2DModel
from diffusers_stages.models.loading import FUSED_PROJECTIONS, constructor_options
from diffusers_stages.models.warm_start import FREEU, refuse_loaded_adapters

STAGE_KEYS = ("stage_boundaries", "boundary_units", "decoder_block_out_channels")
EXPORTS = {MultiStageUNet2DModel: UNet2DModel, MultiStageUNet2DConditionModel: UNet2DConditionModel}  # staged -> plain


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser(__doc__)
    parser.add_argument(
        "--source",
        required=True,
        help="A MultiStagePipeline folder (its `unet` is used) or a MultiStageUNet2DModel folder; or a Stable "
        "Diffusion / SDXL pipeline folder whose `unet` is a MultiStageUNet2DConditionModel, or that model's folder.",
    )
    parser.add_argument(
        "--stage",
        type=int,
        required=True,
        help="Stage to export: 0 is the cleanest (near data), the last the noisiest.",
    )
    return parser.parse_args(argv)


def multistage_stage_to_unet(
    model: MultiStageUNet2DModel | MultiStageUNet2DConditionModel, stage: int
) -> UNet2DModel | UNet2DConditionModel:
    """The `UNet2DModel` equal to ``model`` decoded by stage ``stage`` (inverse of `MultiStageUNet2DModel.from_unet`);
    a `UNet2DConditionModel` for a `MultiStageUNet2DConditionModel`.

    Example:

    ```py
    >>> import torch
    >>> from diffusers import UNet2DConditionModel, UNet2DModel
    >>> from diffusers_stages import MultiStageUNet2DModel
    >>> from diffusers_stages.conversion.multistage_to_unet import multistage_stage_to_unet
    >>> staged = MultiStageUNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4,
    ...     layers_per_block=1, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
    ...     stage_boundaries=(500,), decoder_block_out_channels=((8, 16), (4, 8)))
    >>> unet = multistage_stage_to_unet(staged, stage=0)
    >>> x = torch.randn(1, 3, 8, 8)
    >>> torch.equal(unet(x, 100).sample, staged(x, 100, stage_index=0).sample)
    True
    >>> multistage_stage_to_unet(staged, stage=1)
    Traceback (most recent call last):
    ...
    ValueError: Stage 1's decoder has widths (4, 8), not the encoder's (8, 16): ...

    ```
    """
    if type(model) not in EXPORTS:
        raise ValueError(
            f"`model` must be a MultiStageUNet2DModel or MultiStageUNet2DConditionModel, got {type(model).__name__}."
        )
    unet_class = EXPORTS[type(model)]
    refuse_loaded_adapters(
        model,
        "model",
        "bake the LoRA in first with `model.fuse_lora()` and `model.unload_lora()` (or export without it: "
        "`model.unload_lora()`)",
        "export without it (`pipe.unload_ip_adapter()` first) and load it into the U-Net afterwards",
    )
    if not isinstance(stage, int) or not 0 <= stage < model.num_stages:
        raise ValueError(f"`stage` must be an integer in [0, {model.num_stages}), got {stage!r}.")
    encoder = tuple(model.config.block_out_channels)
    widths = (
        tuple(model.config.decoder_block_out_channels[stage]) if model.config.decoder_block_out_channels else encoder
    )
    if widths != encoder:
        raise ValueError(
            f"Stage {stage}'s decoder has widths {widths}, not the encoder's {encoder}: it reads the encoder's skip "
            f"connections through 1x1 adapters, which a {unet_class.__name__} has no place for. Only stages whose "
            "decoder has the encoder's widths can be exported."
        )
    # 1. config: the U-Net arguments of the multi-stage config, without the stage keys
    config = {k: v for k, v in constructor_options(unet_class, model.config).items() if k not in STAGE_KEYS}
    if model.config.get("decoder_up_block_types"):  # decoders may attend at different levels
        config["up_block_types"] = tuple(model.config.decoder_up_block_types[stage])
    unet = unet_class(**config)
    # a plain U-Net's up blocks attend with the encoder's heads: the same weights, other heads would compute otherwise
    own, plain = _up_path_heads(model.decoders[stage]), _up_path_heads(unet)
    if own != plain:
        raise ValueError(
            f"Stage {stage}'s decoder attends with {own} heads per block, not the encoder's {plain}: a "
            f"{unet_class.__name__} gives its up blocks the encoder's heads, so this stage cannot be exported."
        )
    # 2. weights: the shared encoder as is, the stage's decoder without its `decoders.{stage}.` prefix (a fused
    # model's q/k/v copies skipped: the U-Net is fused again below if the model runs fused)
    prefix = f"decoders.{stage}."
    state_dict = {}
    for key, value in model.state_dict().items():
        if any(p in key for p in FUSED_PROJECTIONS):
            continue
        if key.startswith(prefix):
            state_dict[key[len(prefix) :]] = value
        elif not key.startswith("decoders."):
            state_dict[key] = value
    unet.load_state_dict(state_dict, strict=True)
    # 3. what is neither config nor weights: fused projections, FreeU on the stage decoder's up blocks
    processors = model.attn_processors.values() if hasattr(model, "attn_processors") else []
    if any(type(p).__name__.startswith("Fused") for p in processors) and hasattr(unet, "fuse_qkv_projections"):
        unet.fuse_qkv_projections()
    for block, own in zip(unet.up_blocks, model.decoders[stage].up_blocks):
        for name in FREEU:
            if getattr(own, name, None) is not None:
                setattr(block, name, getattr(own, name))
    unet = unet.to(device=model.device)
    return (unet if unet.dtype == model.dtype else unet.to(dtype=model.dtype)).eval()


def _up_path_heads(module: torch.nn.Module) -> list[int]:
    """The head count of every transformer in ``module``'s up blocks, in order."""
    return [
        t.transformer_blocks[0].attn1.heads for t in module.up_blocks.modules() if isinstance(t, Transformer2DModel)
    ]


def source_subfolder(path: str) -> str | None:
    """Where the staged model of ``--source`` is: ``unet`` in a pipeline folder, the folder itself otherwise."""
    return "unet" if os.path.isfile(os.path.join(path, "model_index.json")) else None


def load_multistage(path: str) -> MultiStageUNet2DModel | MultiStageUNet2DConditionModel:
    source_folder(path)
    subfolder = source_subfolder(path)
    if subfolder is not None and not os.path.isdir(os.path.join(path, subfolder)):
        entry = read_json(os.path.join(path, "model_index.json"), "model_index.json").get("_class_name")
        name = entry[-1] if isinstance(entry, list) and entry else entry  # saved as `[file, class]` or by name
        raise ValueError(
            f"`--source` {path} holds a {name!r} without a `unet`: multistage_to_unet exports a stage of a "
            "MultiStagePipeline or of a Stable Diffusion pipeline with a staged unet. An ExpertRoutingPipeline's "
            "experts (`experts/expert_<i>`) and a DualBackbonePipeline's `deep` and `shallow` are plain U-Nets already."
        )
    if subfolder is not None:
        refuse_class_embedder(path)
    config_path = os.path.join(path, subfolder or "", "config.json")
    if os.path.isfile(config_path):
        class_name = read_json(config_path, "config.json").get("_class_name")
        if class_name == "MultiStageDDPMppUNet2DModel":
            raise ValueError(
                f"{path} holds a MultiStageDDPMppUNet2DModel (EDM's DDPM++), whose stages have no UNet2DModel "
                "equivalent: its residual sums are scaled by sqrt(0.5), each decoder has its own middle blocks and "
                "group counts change with the width. Export stages of a MultiStageUNet2DModel only."
            )
        if class_name == MultiStageUNet2DConditionModel.__name__:
            return load_strict(MultiStageUNet2DConditionModel, path, subfolder=subfolder)
    return load_strict(MultiStageUNet2DModel, path, subfolder=subfolder)


def refuse_class_embedder(path: str) -> None:
    """Refuse a pipeline folder ``path`` with a ``class_embedder`` (the authors' `cin-mul*` models): the exported U-Net
    would lose the embedding that turns each class into the context it attends to, with nothing to say so."""
    entry = read_json(os.path.join(path, "model_index.json"), "model_index.json").get("class_embedder")
    if entry in (None, [None, None]):
        return
    name = entry[-1] if isinstance(entry, list) and entry else entry
    raise ValueError(
        f"`--source` {path} has a `class_embedder` ({name}): its U-Net attends to the context that embedder gives "
        "each class label, which an exported UNet2DConditionModel has no place for (it takes `encoder_hidden_states`"
        f", not class labels). To export the U-Net alone, give its folder, `--source {os.path.join(path, 'unet')}`"
        ", and call it with `encoder_hidden_states=pipe.class_embedder(class_labels)` of the pipeline."
    )


def conditioning(config, batch: int) -> dict:
    """Random text conditioning a `UNet2DConditionModel` of ``config`` accepts (SDXL: added text/time embeddings);
    nothing for a `UNet2DModel`."""
    if "cross_attention_dim" not in config:
        return {}
    generator = torch.manual_seed(1)
    kwargs = {"encoder_hidden_states": torch.randn(batch, 4, config.cross_attention_dim, generator=generator)}
    if config.addition_embed_type == "text_time":
        time_ids = 6 * config.addition_time_embed_dim  # any split of the embedding's input width is a valid probe
        text = config.projection_class_embeddings_input_dim - time_ids
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, text, generator=generator),
            "time_ids": torch.randn(batch, 6, generator=generator).abs() * 512,
        }
    return kwargs


def verify(model, unet, stage: int, tolerance: float) -> None:
    """Compare the exported U-Net with the multi-stage model at a timestep inside the stage."""
    config = model.config
    size = (config.sample_size,) * 2 if isinstance(config.sample_size, int) else tuple(config.sample_size)
    x = torch.randn(2, config.in_channels, *size, generator=torch.manual_seed(0))
    t = probe_tensor(model.partition, probe_timesteps(model.partition)[stage])
    labels = probe_class_labels(model, 2)
    kwargs = conditioning(config, 2)
    reference = model(x, t, class_labels=labels, stage_index=stage, **kwargs).sample
    exported = unet(x, t, class_labels=labels, **kwargs).sample
    report_verification({f"stage {stage} at timestep {t.item():g}": max_difference(reference, exported)}, tolerance)


@torch.no_grad()
def main(args: argparse.Namespace) -> UNet2DModel | UNet2DConditionModel:
    with staged_output(args.output_path, args.overwrite, input_paths(args)) as tmp:
        model = load_multistage(args.source)
        exported = multistage_stage_to_unet(model, args.stage)
        # stored as the source stores its weights (a float16 model stays float16); loaded and verified in float32
        dtype = stored_dtype(os.path.join(args.source, source_subfolder(args.source) or "")) or exported.dtype
        cast(exported, dtype).save_pretrained(tmp, safe_serialization=True)
        unet = load_strict(EXPORTS[type(model)], tmp)  # what was written, reloaded strictly
        if args.verify:
            verify(model, unet, args.stage, args.tolerance)
    low, high = model.partition.intervals()[args.stage]
    print(
        f"wrote {args.output_path}: {type(unet).__name__} of stage {args.stage} ([{low:g}, {high:g}) "
        f"{model.partition.units})"
    )
    return unet


if __name__ == "__main__":
    run(main, parse_args, sys.argv[1:])
