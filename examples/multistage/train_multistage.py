#!/usr/bin/env python
"""Train a multi-stage, multi-decoder U-Net (Zhang et al., CVPR 2024) with Accelerate.

One shared encoder and one decoder per stage of the noise schedule, trained jointly: every batch is stratified
over the stages, so every decoder learns at every step. `--pretrained_model_name_or_path` fine-tunes an existing
(e.g. converted) `MultiStagePipeline` folder instead. See README.md beside this file for the commands.
"""

import argparse

from diffusers_stages.training import MultiStageTask, build_parser, build_task, int_list, parse_and_check, train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser(
        __doc__,
        "the paper's CIFAR-10 split, 442 631 scaled to `--num_train_timesteps` (with `--boundary_units "
        "sigma`: 2.5103 7.6577)",
    )
    group = parser.add_argument_group("multi-stage")
    group.add_argument(
        "--decoder_block_out_channels", type=int_list, nargs="+", default=None,
        help="Block widths of each stage's decoder, clean stage first, e.g. `192,192 128,128 16,16` "
        "(default: the encoder's `--block_out_channels` for every decoder).",
    )  # fmt: skip
    group.add_argument(
        "--fused_decoders", action="store_true",
        help="Decode each batch in one channel-packed pass through all decoders (`enable_fused_decoders`; same "
        "outputs and gradients, except that dropout draws other random numbers). Faster with many stages of few samples each (README, Benchmarks). Refused where no "
        "batch could be fused: `--stage_sampling` other than mixed, `--gradient_checkpointing`, xFormers in decoders "
        "with attention, up blocks other than UpBlock2D/AttnUpBlock2D, decoders of different widths, or a split of "
        "`--train_batch_size` over the stages so uneven that padding every stage to the largest count adds more "
        "than 25%% rows (pass equal `--stage_shares` and a batch size that is a multiple of the stage count).",
    )  # fmt: skip
    group.add_argument(
        "--pretrained_model_name_or_path", type=str, default=None,
        help="Fine-tune this MultiStagePipeline folder (e.g. one written by `diffusers_stages.conversion`) instead of "
        "training a new model: its unet (MultiStageUNet2DModel or MultiStageDDPMppUNet2DModel), stages and noise "
        "schedule are kept, and the result is saved with its scheduler. Refused with it: `--stage_boundaries`, "
        "`--decoder_block_out_channels`, `--model_config` and the shape options (`--block_out_channels`, "
        "`--layers_per_block`, `--down_block_types`, `--up_block_types`, `--attention_head_dim`, `--norm_num_groups`, "
        "`--dropout`: the model's config holds them). Must repeat the source's values (an error names them): "
        "`--boundary_units`, `--num_train_timesteps`, `--ddpm_beta_schedule` (DDPM-style), `--prediction_type`. Without "
        "`--vae_path` the folder's own VAE is used, if it has one. The data must fit the model: channels, "
        "`--resolution` = its sample_size (x the VAE's down-sampling), `--class_conditional` classes + 1 = its "
        "num_class_embeds.",
    )  # fmt: skip
    return parse_and_check(parser, MultiStageTask, argv)


def main(args: argparse.Namespace) -> str:
    return train(args, build_task(MultiStageTask, args))


if __name__ == "__main__":
    main(parse_args())
