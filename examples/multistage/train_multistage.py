#!/usr/bin/env python
"""Train a multi-stage, multi-decoder U-Net (Zhang et al., CVPR 2024) with Accelerate.

One shared encoder and one decoder per stage of the noise schedule, trained jointly: every batch is stratified
over the stages, so every decoder learns at every step. See README.md beside this file for the commands.
"""

import argparse

from diffusers_stages.training import MultiStageTask, build_parser, int_list, parse_and_check, train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser(__doc__)
    group = parser.add_argument_group("multi-stage")
    group.add_argument(
        "--decoder_block_out_channels", type=int_list, nargs="+", default=None,
        help="Block widths of each stage's decoder, clean stage first, e.g. `192,192 128,128 16,16` "
        "(default: the encoder's `--block_out_channels` for every decoder).",
    )  # fmt: skip
    return parse_and_check(parser, MultiStageTask, argv)


def main(args: argparse.Namespace) -> str:
    return train(args, MultiStageTask(args))


if __name__ == "__main__":
    main(parse_args())
