#!/usr/bin/env python
"""Train multi-expert denoisers (MEME, Lee et al., AAAI 2024) with Accelerate.

One denoiser per interval of the noise schedule: by default MEME's iU-Nets (`IUNet2DModel`: Inception mixers that
give more channels to self-attention on the noisy intervals, more to convolution near the data), or every expert the
`UNet2DModel` of `--model_config`. Train all experts in one run (`--assignment hard`: every sample goes
to the expert of its interval, stratified so each expert trains at every step, each interval's share of the batch its
share of the schedule; `--assignment soft`: the batch is split equally over the experts and expert n draws from its
own interval with probability p_n; `--stage_shares` sets either split), or one expert per run
(`--expert_index n`) and gather the runs afterwards with `--assemble_experts`. `--pretrained_model_name_or_path`
fine-tunes the experts of an existing `ExpertRoutingPipeline` folder instead (all, or one to put back into it with
`--assemble_experts FOLDER RUN`). See README.md beside this file.
"""

import argparse

from diffusers_stages.training import (
    ExpertTask,
    build_parser,
    build_task,
    float_list,
    int_list,
    parse_and_check,
    train,
)
from diffusers_stages.training.args import (
    ASSEMBLY_OPTIONS,
    check_assembly_args,
    refuse_given_options,
    refuse_unused_options,
)
from diffusers_stages.training.loop import save_assembled_experts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser(__doc__, "`--num_experts` uniform intervals (MEME's 4)")
    group = parser.add_argument_group("experts")
    group.add_argument(
        "--num_experts", type=int, default=None,
        help="Uniform intervals (MEME's 4 by default); with `--stage_boundaries`, their count.",
    )  # fmt: skip
    group.add_argument(
        "--assignment", choices=("soft", "hard"), default="soft",
        help="soft (MEME): the batch is split equally over the experts (or by `--stage_shares`), expert n drawing from "
        "its own interval with probability p_n (`--own_interval_probability`); hard: every sample goes to the expert "
        "of its interval, each interval's share of the batch its share of the schedule (or `--stage_shares`), so with "
        "unequal intervals p_n = 1 is not hard assignment.",
    )  # fmt: skip
    group.add_argument(
        "--own_interval_probability", type=float_list, default=None,
        help="p_n per expert for `--assignment soft`, clean expert first (default MEME's 0.8,0.4,0.2,0.1, as a "
        "secondary source reports them).",
    )  # fmt: skip
    group.add_argument("--expert_index", type=int, default=None, help="Train only this expert (one expert per run).")
    group.add_argument(
        "--expert_block_out_channels", type=int_list, nargs="+", default=None,
        help="Block widths of each expert, clean expert first, e.g. `64,128 64,128 32,64 32,64`: of the MEME "
        "presets' iU-Nets, or, with `--model_config`, of its UNet2DModel (as `diffusers-stages plan --architecture "
        "experts --budget ...` prints them).",
    )  # fmt: skip
    group.add_argument(
        "--expert_attention_shares", type=float_list, default=None,
        help="Per expert, the share of its iU-Net mixers' channels given to self-attention (0: convolution only, "
        "1: attention only), clean expert first, non-decreasing (MEME: convolution-heavy near the data, "
        "attention-heavy toward the noise; default (n + 1/2) / N: 0.125,0.375,0.625,0.875 for 4 experts).",
    )  # fmt: skip
    group.add_argument(
        "--assemble_experts", type=str, nargs="+", default=None,
        help="Instead of training: gather the output folders of `--expert_index` runs into one pipeline in "
        "`--output_dir` (one run per expert), or, after a saved ExpertRoutingPipeline folder given first, put the "
        "experts of the runs in place of that pipeline's own (e.g. `--assemble_experts meme-ffhq64 "
        "meme-expert-1-finetuned`: its other experts, scheduler, VAE and class names are kept). The runs must share "
        "its (and one another's) stage split, prediction type, noise schedule, VAE and class names.",
    )  # fmt: skip
    group.add_argument(
        "--pretrained_model_name_or_path", type=str, default=None,
        help="Fine-tune the experts of this ExpertRoutingPipeline folder (e.g. an earlier run's output, or one "
        "assembled with `--assemble_experts`) instead of training new ones: all of them, or with `--expert_index n` "
        "expert n only (saved as any one-expert run, to assemble with the others). Its experts (IUNet2DModel or "
        "UNet2DModel), stage boundaries and noise schedule are kept, and the result is saved with its scheduler. "
        "Refused with it: `--num_experts`, `--stage_boundaries`, `--expert_block_out_channels`, "
        "`--expert_attention_shares`, `--model_config` and the U-Net shape options. Must repeat the source's values "
        "(an error names them): `--boundary_units`, `--num_train_timesteps`, `--ddpm_beta_schedule` (DDPM-style), "
        "`--prediction_type`. Without `--vae_path` the folder's own VAE is used, if it has one. The data must fit the "
        "experts: channels, `--resolution` = their sample_size (x the VAE's down-sampling), `--class_conditional` "
        "classes + 1 = their num_class_embeds.",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.assemble_experts is not None:  # nothing is trained: only the output and Hub options are checked
        try:
            refuse_given_options(args, ("pretrained_model_name_or_path",), "`--assemble_experts`",
                                 "assembling gathers the experts of finished runs and trains nothing")  # fmt: skip
            check_assembly_args(args)
            refuse_unused_options(parser, args, ASSEMBLY_OPTIONS, "`--assemble_experts`",
                                  "assembling gathers the experts of finished runs and trains nothing (it takes "
                                  "`--output_dir`, `--seed`, the sample grid's and the Hub options)")  # fmt: skip
        except ValueError as error:
            parser.error(str(error))
        return args
    return parse_and_check(parser, ExpertTask, argv)


def main(args: argparse.Namespace) -> str:
    if args.assemble_experts is not None:
        return save_assembled_experts(args)
    return train(args, build_task(ExpertTask, args))


if __name__ == "__main__":
    main(parse_args())
