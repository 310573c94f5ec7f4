#!/usr/bin/env python
"""Train a dual-backbone model (DuoDiff, arXiv 2410.09633) with Accelerate.

A shallow and a deep denoiser (U-Nets, or with `--backbone uvit` the paper's U-ViTs), each trained on every timestep (in one run by default, or one per run with
`--backbones shallow|deep`); at sampling time the shallow one runs the first, noisiest steps and the deep one the
rest. `--pretrained_model_name_or_path` fine-tunes an existing `DualBackbonePipeline` folder instead. See README.md
beside this file for the commands.
"""

import argparse

from diffusers_stages.training import (
    DualBackboneTask,
    EarlyExitTask,
    build_parser,
    build_task,
    int_list,
    parse_and_check,
    train,
)
from diffusers_stages.training.args import refuse_changed_options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser(__doc__, "none (refused here: both backbones train on every timestep)", staged=False)
    group = parser.add_argument_group("dual backbone (a deep U-Net takes the model arguments above)")
    group.add_argument("--backbones", choices=("both", "shallow", "deep"), default="both", help="Which to train.")
    group.add_argument("--shallow_block_out_channels", type=int_list, default=None, help="Default: the deep widths.")
    group.add_argument(
        "--shallow_layers_per_block", type=int, default=1, help="Layers per block of the shallow U-Net."
    )
    group.add_argument(
        "--backbone", choices=("unet", "uvit", "early_exit"), default="unet",
        help="`uvit`: DuoDiff's backbones, two U-ViTs (Bao et al. 2023) of one width and depths "
        "`--shallow_depth`/`--deep_depth`; the U-Net arguments above are then refused. `early_exit`: DuoDiff's "
        "baseline instead, one AdaDiff-style U-ViT of `--deep_depth` blocks with an exit after every block.",
    )  # fmt: skip
    group.add_argument("--shallow_depth", type=int, default=3, help="U-ViT blocks of the shallow model (odd).")
    group.add_argument("--deep_depth", type=int, default=13, help="U-ViT blocks of the deep model (odd).")
    group.add_argument("--uvit_hidden_size", type=int, default=512, help="U-ViT width (both backbones).")
    group.add_argument("--uvit_patch_size", type=int, default=2, help="U-ViT patch side (both backbones).")
    group.add_argument("--uvit_num_attention_heads", type=int, default=8, help="U-ViT attention heads.")
    group.add_argument(
        "--switch_step_fraction", type=float, default=None,
        help="Share of the sampling steps (the noisy end) run by the shallow network; 0.4 when no switch is given.",
    )  # fmt: skip
    group.add_argument("--switch_timestep", type=float, default=None, help="Or: the shallow network runs t >= this.")
    group.add_argument(
        "--pretrained_model_name_or_path", type=str, default=None,
        help="Fine-tune the backbones of this DualBackbonePipeline folder (e.g. an earlier run's output) instead of "
        "training new ones: both, or one with `--backbones shallow|deep` (saved as any one-backbone run). Its "
        "backbones (UNet2DModel or UViT2DModel), switch and noise schedule are kept, and the result is saved with its "
        "scheduler. Refused with it: `--switch_step_fraction`, `--switch_timestep` (pass a switch to "
        "`DualBackbonePipeline.from_pretrained` to change it), `--model_config`, `--shallow_block_out_channels`, "
        "`--backbone early_exit` and the U-Net shape options; the U-ViT options and `--shallow_layers_per_block` are "
        "refused too when given another value than their default. Must repeat the source's values (an error names them): `--boundary_units`, `--num_train_timesteps`, "
        "`--ddpm_beta_schedule` (DDPM-style), `--prediction_type`. Without `--vae_path` the folder's own VAE is used, "
        "if it has one. The data must fit the backbones: channels, `--resolution` = their sample_size (x the VAE's "
        "down-sampling), `--class_conditional` classes + 1 = their num_class_embeds.",
    )  # fmt: skip
    args, _ = parser.parse_known_args(argv)  # the task class depends on `--backbone`
    try:
        refuse_unread_backbone_options(parser, args)
    except ValueError as error:
        parser.error(str(error))
    return parse_and_check(parser, task_class(args), argv)


UVIT_OPTIONS = ("uvit_hidden_size", "uvit_patch_size", "uvit_num_attention_heads", "shallow_depth", "deep_depth")


def refuse_unread_backbone_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse the backbone options with defaults that the backbones asked for do not read, given another value than
    their default (so meant): the U-ViT options for U-Nets, `--shallow_layers_per_block` for U-ViTs, `--shallow_depth`
    for the one U-ViT of `--backbone early_exit`, and all of them when fine-tuning (the source's backbones are kept).
    The options without defaults are refused by the tasks (`check_no_unet_arguments`, `REFUSED_WITH_PRETRAINED`)."""
    if args.pretrained_model_name_or_path is not None:
        names, source = (*UVIT_OPTIONS, "shallow_layers_per_block"), "`--pretrained_model_name_or_path`"
        reason = "fine-tuning keeps the backbones of the source folder, their shape included"
    elif args.backbone == "unet":
        names, source = UVIT_OPTIONS, "`--backbone unet`"
        reason = "its backbones are U-Nets (their shape: the U-Net options, `--shallow_block_out_channels`, "
        reason += "`--shallow_layers_per_block`); pass `--backbone uvit` for U-ViTs"
    elif args.backbone == "uvit":
        names, source = ("shallow_layers_per_block",), "`--backbone uvit`"
        reason = "its U-ViTs have blocks, not U-Net layers (their depths: `--shallow_depth`, `--deep_depth`)"
    else:
        names, source = ("shallow_layers_per_block", "shallow_depth"), "`--backbone early_exit`"
        reason = "its one U-ViT has no shallow model (its depth: `--deep_depth`)"
    refuse_changed_options(parser, args, names, source, reason)


def task_class(args: argparse.Namespace) -> type:
    """`EarlyExitTask` for `--backbone early_exit`, else `DualBackboneTask`."""
    return EarlyExitTask if args.backbone == "early_exit" else DualBackboneTask


def main(args: argparse.Namespace) -> str:
    return train(args, build_task(task_class(args), args))


if __name__ == "__main__":
    main(parse_args())
