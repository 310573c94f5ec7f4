"""The multi-stage training task: what its model card says about how the decoders were trained matches the run."""

import pytest

from diffusers_stages.training import MultiStageTask, build_parser


def _task(*argv: str) -> MultiStageTask:
    args = build_parser("train_multistage.py").parse_args(
        ["--block_out_channels", "8,16", "--layers_per_block", "1", "--norm_num_groups", "4", *argv]
    )
    vars(args).update(decoder_block_out_channels=None, fused_decoders=False)  # the script's own options
    return MultiStageTask(args)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        ([], "every decoder in every batch"),
        (["--stage_sampling", "per_batch"], "one stage per batch with `--stage_sampling per_batch`"),
        (["--stage_shares", "1,1,0"], "batch shares 1:1:0 (clean stage first)"),
        (["--stage_sampling", "per_rank"], "one stage per process with `--stage_sampling per_rank`"),
    ],
)
def test_the_card_says_how_the_run_drew_its_stages(argv, says, monkeypatch):
    # the card said "trained jointly (every decoder in every batch)" whatever the run did: with one stage per batch,
    # or a stage whose share is 0 (its decoder never trained), that claim was false
    monkeypatch.setenv("WORLD_SIZE", "3")  # `per_rank`: one process per stage
    description = _task(*argv).description()
    assert says in description
    if argv:
        assert "every decoder in every batch" not in description
