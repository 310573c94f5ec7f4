"""`examples/experts/train_experts.py`: all experts in one run (hard/soft), one expert per run and assembly."""

import os

import pytest
import torch

from diffusers_stages import ExpertRoutingPipeline


@pytest.fixture(scope="module")
def script(examples):
    return examples.load_script("experts")


def _sample(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(num_inference_steps=4, generator=torch.manual_seed(0), output_type="np", **kwargs).images


def test_all_experts_hard_assignment_meme_architectures(examples, script, image_folder, tmp_path):
    out = str(tmp_path / "run")
    examples.train(script, [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", out, "--assignment", "hard",
         "--class_conditional", "--max_train_steps", "2"])  # fmt: skip
    pipe = ExpertRoutingPipeline.from_pretrained(out)
    assert pipe.experts.partition.boundaries == (250.0, 500.0, 750.0)
    # MEME presets: the clean expert is convolution only, the noisiest has attention
    assert pipe.experts.experts[0].config.down_block_types == ["DownBlock2D", "DownBlock2D"]
    assert pipe.experts.experts[3].config.down_block_types == ["AttnDownBlock2D", "AttnDownBlock2D"]
    assert _sample(pipe, class_labels=[0, 1]).shape == (2, 8, 8, 3)


def test_one_expert_per_run_then_assemble(examples, script, image_folder, tmp_path):
    runs = []
    for index in range(2):
        runs.append(str(tmp_path / f"expert{index}"))
        examples.train(script, [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", runs[-1], "--num_experts", "2",
             "--expert_index", str(index), "--own_interval_probability", "0.9,0.7", "--max_train_steps", "1",
             "--expert_block_out_channels", "16,16", "8,16"])  # fmt: skip
        assert os.path.isdir(os.path.join(runs[-1], f"expert_{index}"))
    out, hub = str(tmp_path / "assembled"), str(tmp_path / "hub")
    examples.train(script, ["--assemble_experts", *runs, "--output_dir", out, "--num_sample_images", "4", "--num_inference_steps", "3",
         "--push_to_hub", "--hub_model_id", "me/experts", "--hub_local_dir", hub])  # fmt: skip
    pipe = ExpertRoutingPipeline.from_pretrained(os.path.join(hub, "me", "experts"))
    assert [e.config.block_out_channels for e in pipe.experts.experts] == [[16, 16], [8, 16]]
    assert _sample(pipe, batch_size=1).shape == (1, 8, 8, 3)
    with pytest.raises(ValueError, match="one run per expert"):
        examples.train(script, ["--assemble_experts", runs[0], runs[0], "--output_dir", str(tmp_path / "bad")])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--expert_index", "4"], "`--expert_index` must be in [0, 4)"),
        (["--own_interval_probability", "0.9,0.5"], "`--own_interval_probability` needs one value per expert (4)"),
        (["--assignment", "hard", "--own_interval_probability", "0.9,0.5,0.5,0.5"], "is for `--assignment soft`"),
        (["--expert_attention_shares", "1,0.5,0,0"], "must not decrease toward the noise end"),
    ],
)
def test_bad_expert_arguments(examples, script, image_folder, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit):
        script.parse_args([*examples.TINY, "--train_data_dir", image_folder, "--output_dir", str(tmp_path), *extra])
    assert message in capsys.readouterr().err
