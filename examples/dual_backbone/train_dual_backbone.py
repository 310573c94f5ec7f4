#!/usr/bin/env python
"""Train a dual-backbone model (DuoDiff, arXiv 2410.09633) with Accelerate.

A shallow and a deep U-Net, each trained on every timestep (in one run by default, or one per run with
`--backbones shallow|deep`); at sampling time the shallow one runs the first, noisiest steps and the deep one the
rest. See README.md beside this file for the commands.
"""

import argparse

from diffusers_stages.training import DualBackboneTask, build_parser, build_task, int_list, parse_and_check, train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser(__doc__)
    group = parser.add_argument_group("dual backbone (the deep U-Net takes the model arguments above)")
    group.add_argument("--backbones", choices=("both", "shallow", "deep"), default="both", help="Which to train.")
    group.add_argument("--shallow_block_out_channels", type=int_list, default=None, help="Default: the deep widths.")
    group.add_argument("--shallow_layers_per_block", type=int, default=1)
    group.add_argument(
        "--switch_step_fraction", type=float, default=None,
        help="Share of the sampling steps (the noisy end) run by the shallow network; 0.4 when no switch is given.",
    )  # fmt: skip
    group.add_argument("--switch_timestep", type=float, default=None, help="Or: the shallow network runs t >= this.")
    return parse_and_check(parser, DualBackboneTask, argv)


def main(args: argparse.Namespace) -> str:
    return train(args, build_task(DualBackboneTask, args))


if __name__ == "__main__":
    main(parse_args())
