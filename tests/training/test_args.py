"""Argument checks shared by the training scripts."""

import json
import re

import diffusers.utils
import pytest
import torch

from diffusers_stages.partition import TimestepPartition
from diffusers_stages.training.args import (
    build_parser,
    check_args,
    partition_from_args,
    read_model_config,
    unet_shape_kwargs,
)


@pytest.mark.parametrize("text", ["", ",", " , "])
def test_stage_boundaries_without_a_boundary_are_refused(text):
    args = build_parser("").parse_args(["--stage_boundaries", text])
    assert args.stage_boundaries == ()
    with pytest.raises(ValueError, match="`--stage_boundaries` \\[\\] gives no boundary.*train_unconditional.py"):
        partition_from_args(args, TimestepPartition([442, 631]))


def test_stage_boundaries_given_or_defaulted():
    default = TimestepPartition([442, 631])
    assert partition_from_args(build_parser("").parse_args([]), default) is default
    given = partition_from_args(build_parser("").parse_args(["--stage_boundaries", "300"]), default)
    assert given == TimestepPartition([300])


@pytest.mark.parametrize("script_name", ["multistage", "experts"])
def test_train_scripts_refuse_an_empty_stage_split_before_training(script_name, tmp_path, capsys):
    from tests.examples.conftest import TINY, load_script

    script, out = load_script(script_name), tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(
            [*TINY, "--train_data_dir", str(tmp_path), "--output_dir", str(out), "--stage_boundaries", ""]
        )
    assert exit_info.value.code == 2 and "`--stage_boundaries` [] gives no boundary" in capsys.readouterr().err
    assert not out.exists()


def test_stage_boundaries_space_separated_and_the_deprecated_comma_form():
    parser = build_parser("")
    assert parser.parse_args(["--stage_boundaries", "442", "631"]).stage_boundaries == (442.0, 631.0)
    with pytest.warns(FutureWarning, match="comma-separated boundaries are deprecated.*`--stage_boundaries 442 631`"):
        assert parser.parse_args(["--stage_boundaries", "442,631"]).stage_boundaries == (442.0, 631.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["--stage_boundaries", "442", "x"])


def _checked(tmp_path, *argv):
    args = build_parser("").parse_args(["--train_data_dir", str(tmp_path), *argv])
    check_args(args, TimestepPartition([442, 631]), 1)
    return args


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mixed_precision", "fp16"], "`--mixed_precision fp16` needs a CUDA GPU.*`--mixed_precision bf16`"),
        (
            ["--enable_xformers_memory_efficient_attention"],
            "`--enable_xformers_memory_efficient_attention` needs a CUDA",
        ),
        (["--save_model_epochs", "0"], "`--save_model_epochs` must be a positive integer, got 0"),
        # optimiser, schedule and loss numbers: torch refused some only after loading, unnamed; others ran silently
        (["--learning_rate", "nan"], "`--learning_rate` must be a positive number, got nan"),
        (["--learning_rate", "-1"], "`--learning_rate` must be a positive number, got -1.0"),
        (["--max_grad_norm", "0"], "`--max_grad_norm` must be a positive number, got 0.0"),
        (["--snr_gamma", "-5"], "`--snr_gamma` must be a positive number, got -5.0"),
        (["--ema_max_decay", "2"], "`--ema_max_decay` must be in \\[0, 1\\], got 2.0"),
        (["--dropout", "-0.1"], "`--dropout` must be in \\[0, 1\\), got -0.1"),
        (["--adam_beta1", "1"], "`--adam_beta1` must be in \\[0, 1\\), got 1.0"),
        (["--lr_warmup_steps", "-1"], "`--lr_warmup_steps` must be a non-negative integer, got -1"),
        (["--seed", "-1"], "`--seed` must be in \\[0, 2\\*\\*32\\), got -1"),
        (["--layers_per_block", "0"], "`--layers_per_block` must be a positive integer, got 0"),
        # the sample grid's chunks (`--eval_batch_size`): zero images per call would sample none, unnamed
        (["--eval_batch_size", "0"], "`--eval_batch_size` must be a positive integer, got 0"),
        (["--eval_batch_size", "-2"], "`--eval_batch_size` must be a positive integer, got -2"),
        # diffusers' train_unconditional.py samples `--eval_batch_size` images: here the grid would hold fewer
        (["--eval_batch_size", "64"], "`--eval_batch_size` 64 is more than the 16 images.*`--num_sample_images 64`"),
        (
            ["--eval_batch_size", "8", "--num_sample_images", "4"],
            "`--eval_batch_size` 8 is more than the 4 images.*at most 4",
        ),
        (["--attention_head_dim", "0"], "`--attention_head_dim` must be a positive integer, got 0"),
        # were accepted: nan/inf shares failed in the first step ("cannot convert float NaN to integer"), a negative
        # worker count in the DataLoader, unnamed
        (
            ["--stage_shares", "nan,1,1"],
            "`--stage_shares` needs 3 non-negative values \\(finite.* got \\[nan, 1.0, 1.0\\]",
        ),
        (
            ["--stage_shares", "inf,1,1"],
            "`--stage_shares` needs 3 non-negative values \\(finite.* got \\[inf, 1.0, 1.0\\]",
        ),
        (["--dataloader_num_workers", "-1"], "`--dataloader_num_workers` must be a non-negative integer, got -1"),
        # was ignored in silence: the run trained in pixel space
        (["--vae_subfolder", "vae"], "`--vae_subfolder` 'vae' is a folder inside `--vae_path`: give `--vae_path` too"),
        # wandb uploads the command line, token included (diffusers' scripts refuse the pair too)
        (["--logger", "wandb", "--hub_token", "hf_x"], "`--hub_token` cannot be used with `--logger wandb`"),
        # was ignored in silence: the run finished with nothing written there
        (["--hub_local_dir", "hub"], "`--hub_local_dir` 'hub' is where `--push_to_hub` writes.*add `--push_to_hub`"),
        # an empty `--hub_model_id` (an unset shell variable) pushed to a repository named after `--output_dir`
        (["--push_to_hub", "--hub_model_id", ""], "`--hub_model_id` '' is not a Hub repository name"),
        # every later push (`--save_model_epochs`, a resumed run) uploaded the former pushes too, nested ever deeper
        (
            ["--push_to_hub", "--hub_model_id", "me/model", "--output_dir", "out", "--hub_local_dir", "out/hub"],
            "`--hub_local_dir` 'out/hub' pushes into 'out/hub/me/model', which overlaps `--output_dir` 'out'",
        ),
        (
            ["--push_to_hub", "--hub_model_id", "me/model", "--output_dir", "hub/me/model", "--hub_local_dir", "hub"],
            "`--hub_local_dir` 'hub' pushes into 'hub/me/model', which overlaps `--output_dir` 'hub/me/model'",
        ),
        # were ignored in silence, as `--hub_local_dir` was: the run trained and pushed nothing
        (["--hub_model_id", "me/model"], "`--hub_model_id` 'me/model' is the repository.*add `--push_to_hub`"),
        (["--hub_private_repo"], "`--hub_private_repo` makes the repository.*add `--push_to_hub`"),
    ],
)
def test_options_refused_before_training(tmp_path, monkeypatch, argv, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=message):
        _checked(tmp_path, *argv)


def test_an_output_dir_that_cannot_hold_the_run_is_refused(tmp_path):
    # were a FileExistsError once the data was read (a file), or a run that wrote its samples and checkpoints into
    # its own training images (with `--class_conditional` the output folder became a class on resuming)
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "a_file").write_text("")
    (tmp_path / "broken").symlink_to(tmp_path / "nowhere")
    for output_dir in (tmp_path / "a_file", tmp_path / "a_file" / "run", tmp_path / "broken"):
        with pytest.raises(ValueError, match=f"`--output_dir` {str(output_dir)!r} must be a folder.*is not a folder"):
            _checked(data, "--output_dir", str(output_dir))
    for output_dir in (data, data / "run", data / "sub" / ".." / "run"):
        with pytest.raises(ValueError, match=f"`--output_dir` {str(output_dir)!r} lies inside `--train_data_dir`"):
            _checked(data, "--output_dir", str(output_dir))
    (tmp_path / "link").symlink_to(data)
    with pytest.raises(ValueError, match="lies inside `--train_data_dir`"):
        _checked(data, "--output_dir", str(tmp_path / "link" / "run"))
    args = build_parser("").parse_args(["--dataset_name", str(data), "--output_dir", str(data / "run")])
    with pytest.raises(ValueError, match="lies inside `--dataset_name`"):  # a local folder `datasets` reads whole
        check_args(args, TimestepPartition([442, 631]), 1)
    assert _checked(data, "--output_dir", str(tmp_path / "run")).output_dir == str(tmp_path / "run")
    assert _checked(data, "--output_dir", str(tmp_path / "data-run")).output_dir  # a name sharing the prefix
    with pytest.raises(ValueError, match="`--output_dir` must name a folder, got ''"):  # was makedirs('') mid-run
        _checked(data, "--output_dir", "")


def test_an_output_dir_that_is_the_fine_tuned_source_is_refused(tmp_path):
    # `--output_dir` the folder of `--pretrained_model_name_or_path` trained into the source pipeline and wrote the
    # fine-tuned one over it (its checkpoints among the source's components): the source was gone without a word
    data, source = tmp_path / "data", tmp_path / "sd"
    data.mkdir()
    source.mkdir()
    (tmp_path / "sd-link").symlink_to(source)
    for output_dir in (source, tmp_path / "sd-link", source / ".." / "sd"):
        args = build_parser("").parse_args(["--train_data_dir", str(data), "--output_dir", str(output_dir)])
        args.pretrained_model_name_or_path = str(source)  # (the fine-tuning scripts' option)
        with pytest.raises(ValueError, match=f"`--output_dir` {str(output_dir)!r} is the folder of "
                           f"`--pretrained_model_name_or_path` {str(source)!r}"):  # fmt: skip
            check_args(args, TimestepPartition([442, 631]), 1)
    for output_dir in (tmp_path / "sd-finetuned", source / "run"):  # a folder of its own (inside the source too)
        args = build_parser("").parse_args(["--train_data_dir", str(data), "--output_dir", str(output_dir)])
        args.pretrained_model_name_or_path = str(source)
        check_args(args, TimestepPartition([442, 631]), 1)


def test_an_unknown_lr_scheduler_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        build_parser("").parse_args(["--lr_scheduler", "foo"])
    assert "argument --lr_scheduler: invalid choice: 'foo'" in capsys.readouterr().err


def test_bf16_is_allowed_on_cpu_and_missing_optional_packages_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _checked(tmp_path, "--mixed_precision", "bf16").mixed_precision == "bf16"
    monkeypatch.setattr(diffusers.utils, "is_wandb_available", lambda: False)
    with pytest.raises(ValueError, match="`--logger wandb` needs the `wandb` package: `pip install wandb`"):
        _checked(tmp_path, "--logger", "wandb")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(diffusers.utils, "is_xformers_available", lambda: False)
    with pytest.raises(ValueError, match="needs the `xformers` package"):
        _checked(tmp_path, "--enable_xformers_memory_efficient_attention")


def test_dataset_name_imagefolder_without_a_folder_is_refused():
    args = build_parser("").parse_args(["--dataset_name", "imagefolder"])
    with pytest.raises(
        ValueError, match="`--dataset_name imagefolder` would read whatever images.*`--train_data_dir`"
    ):
        check_args(args, TimestepPartition([442, 631]), 1)


def test_model_config_is_a_file_or_a_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "block_out_channels": [8, 16]}))
    for argv in (["--model_config", str(tmp_path)], ["--model_config_name_or_path", str(tmp_path / "config.json")]):
        args = build_parser("").parse_args(argv)
        assert unet_shape_kwargs(args) == {"block_out_channels": [8, 16]}
    with pytest.raises(ValueError, match="`--model_config` must be a model config.json or a folder holding one"):
        read_model_config(build_parser("").parse_args(["--model_config", str(tmp_path / "missing")]))
    (tmp_path / "config.json").write_text("[8, 16]")  # JSON, but no config (an AttributeError on `.items()`)
    with pytest.raises(ValueError, match="`--model_config` .*JSON object"):
        unet_shape_kwargs(build_parser("").parse_args(["--model_config", str(tmp_path)]))


# the shape options' former parser defaults (with the block types they implied)
FORMER_DEFAULTS = {
    "block_out_channels": (128, 256, 256, 256), "layers_per_block": 2, "attention_head_dim": 8, "norm_num_groups": 32,
    "dropout": 0.0, "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
}  # fmt: skip


def test_a_model_from_scratch_without_shape_options_has_the_former_default_shape(tmp_path):
    # the shape options are unset in the parser (so that a value given can be refused where a source gives the
    # shape); from scratch they still default to the same model
    from tests.examples.conftest import load_script

    args = build_parser("").parse_args([])
    assert all(getattr(args, name) is None for name in FORMER_DEFAULTS)
    assert unet_shape_kwargs(args) == FORMER_DEFAULTS
    script = load_script("multistage")
    (tmp_path / "data").mkdir()
    args = script.parse_args(["--train_data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "run")])
    with torch.device("meta"):
        unet = script.build_task(script.MultiStageTask, args).build_networks(3, 64, None)["unet"]
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in unet.config.items() if k in FORMER_DEFAULTS} == (
        FORMER_DEFAULTS
    )
    _checked(tmp_path)  # the range checks skip options not given
    with pytest.raises(ValueError, match="`--norm_num_groups` must be a positive integer, got 0"):
        _checked(tmp_path, "--norm_num_groups", "0")  # ...and check those given


@pytest.mark.parametrize(
    "argv, shown",
    [
        (["--block_out_channels", "64,128"], "`--block_out_channels` [64, 128]"),
        (["--layers_per_block", "1"], "`--layers_per_block` 1"),
        (["--attention_head_dim", "8"], "`--attention_head_dim` 8"),  # the former default, given: meant
        (["--norm_num_groups", "4"], "`--norm_num_groups` 4"),
        (["--dropout", "0.1"], "`--dropout` 0.1"),
        (["--down_block_types", "DownBlock2D", "DownBlock2D"], "`--down_block_types` ['DownBlock2D', 'DownBlock2D']"),
    ],
)
def test_shape_options_are_refused_with_a_model_config(tmp_path, argv, shown):
    # were dropped in silence: the config's model trained instead
    (tmp_path / "config.json").write_text(json.dumps({"block_out_channels": [8, 16]}))
    args = build_parser("").parse_args(["--model_config", str(tmp_path), *argv])
    with pytest.raises(ValueError) as error:
        unet_shape_kwargs(args)
    assert str(error.value).startswith(f"{shown} cannot be combined with `--model_config` {str(tmp_path)!r}: the ")
    assert str(error.value).endswith(f"Drop `{argv[0]}`.")


def test_model_config_of_a_saved_model_folder_builds_that_model(tmp_path):
    # a saved folder's config.json holds `auto_map` (for diffusers' AutoModel): a loader entry, not an argument
    from diffusers_stages import MultiStageUNet2DModel

    saved = MultiStageUNet2DModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                  down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                                  stage_boundaries=(500,))  # fmt: skip
    saved.save_pretrained(tmp_path)
    kwargs = unet_shape_kwargs(build_parser("").parse_args(["--model_config", str(tmp_path)]))
    assert "auto_map" not in kwargs
    assert MultiStageUNet2DModel(**kwargs).config.stage_boundaries == [500.0]


def test_ddpm_num_steps_is_a_deprecated_alias_of_num_train_timesteps():
    parser = build_parser("test")
    assert parser.parse_args(["--num_train_timesteps", "500"]).num_train_timesteps == 500
    with pytest.warns(FutureWarning, match="--num_train_timesteps"):
        args = parser.parse_args(["--ddpm_num_steps", "400"])
    assert args.num_train_timesteps == 400 and not hasattr(args, "ddpm_num_steps")


def test_diffusers_text_to_image_names_of_the_logger_and_the_epochs():
    # diffusers' train_text_to_image.py says `--report_to` and `--num_train_epochs` (train_unconditional.py:
    # `--logger`, `--num_epochs`); they were "unrecognized arguments"
    args = build_parser("test").parse_args(["--report_to", "none", "--num_train_epochs", "3"])
    assert args.logger == "none" and args.num_epochs == 3


def _script_help(path: str, capsys) -> str:
    """A training script's `--help` text, as its command line prints it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("help_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_help_keeps_the_description_s_command_as_written(capsys):
    # train_text_to_image.py's docstring shows a command continued with `\`: re-wrapped into one paragraph, its
    # `\` landed mid-line (`sd-1.5 \ --train_data_dir`), a command that fails when copied
    text = _script_help("examples/multistage/train_text_to_image.py", capsys)
    assert "--pretrained_model_name_or_path sd-1.5 \\\n" in text
    assert "\\ --" not in text


@pytest.mark.parametrize(
    ("script", "default"),
    [
        ("examples/multistage/train_multistage.py", "442 631"),
        ("examples/experts/train_experts.py", "uniform intervals"),
        ("examples/dual_backbone/train_dual_backbone.py", "refused here"),
    ],
)
def test_help_states_defaults_as_the_scripts_use_them(script, default, capsys):
    """No `(default: None)` beside an option whose help gives its real default (`--layers_per_block`: 2) or whose
    default is the script's own (`--stage_boundaries`: the paper's split, MEME's intervals)."""
    text = " ".join(_script_help(script, capsys).split())
    assert "(default: None)" not in text
    assert "Default: 2 (when building from scratch" in text and "(default: 1000)" in text  # given defaults still show
    section = text.split("--stage_boundaries STAGE_BOUNDARIES [STAGE_BOUNDARIES ...] ")[1].split(" --")[0]
    assert default in section


def test_help_names_the_local_hub_folder_as_the_run_writes_it(capsys):
    # without `--hub_model_id` the repository (and so the `--hub_local_dir` sub-folder) is named after `--output_dir`
    text = " ".join(_script_help("examples/multistage/train_multistage.py", capsys).split())
    assert "<dir>/<repository> (`--hub_model_id`, else named after `--output_dir`)" in text


@pytest.mark.parametrize(
    ("option", "says"),
    [
        ("--overwrite_output_dir", "deleted once this run has a complete checkpoint of its own"),
        ("--checkpointing_steps CHECKPOINTING_STEPS", "every N optimisation steps"),
        ("--checkpoints_total_limit CHECKPOINTS_TOTAL_LIMIT", "Keep at most this many complete checkpoints"),
        ("--use_ema", "saved in the checkpoints and as the final pipeline's weights"),
        ("--push_to_hub", "without checkpoints, logs and the sample history"),
        ("--hub_model_id HUB_MODEL_ID", "Default: named after `--output_dir`"),
        ("--eval_batch_size EVAL_BATCH_SIZE", "pipeline calls of at most this many"),
        ("--num_sample_images NUM_SAMPLE_IMAGES", "Images in each sample grid"),
    ],
)
def test_help_says_what_the_run_life_cycle_options_do(option, says, capsys):
    # these options had no help text at all: `--help` showed their names only (diffusers' scripts explain each)
    text = " ".join(_script_help("examples/multistage/train_multistage.py", capsys).split())
    assert says in text.split(f"{option} ")[1].split(" --")[0]


@pytest.mark.parametrize(
    ("script", "option", "default"),
    [
        ("examples/dual_backbone/train_dual_backbone.py", "--shallow_layers_per_block SHALLOW_LAYERS_PER_BLOCK", "1"),
        ("examples/experts/train_experts.py", "--assignment {soft,hard}", "soft"),
    ],
)
def test_help_shows_the_default_of_each_script_option(script, option, default, capsys):
    # an option without a help text showed no default at all (argparse shows a default only beside a help text)
    text = " ".join(_script_help(script, capsys).split())
    assert f"(default: {default})" in text.split(f"{option} ")[-1].split(" --")[0]


def test_a_pipeline_folder_given_as_model_config_names_its_model_folders(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="is a pipeline folder: give the folder of one of its models .*unet"):
        read_model_config(build_parser("").parse_args(["--model_config", str(tmp_path)]))
    assert read_model_config(build_parser("").parse_args(["--model_config", str(tmp_path / "unet")]))


def test_a_polynomial_schedule_it_cannot_build_is_refused_before_training(tmp_path):
    # diffusers' polynomial decay divided by zero at the last step where the warm-up took every step, and refused a
    # learning rate not above its fixed `lr_end` (1e-7) by that name, once the data and the model were loaded
    data = tmp_path / "data"
    data.mkdir()
    poly = ("--lr_scheduler", "polynomial", "--output_dir", str(tmp_path / "run"))
    with pytest.raises(
        ValueError, match=r"`--lr_warmup_steps` 3 .*`--max_train_steps` 3.*`--lr_scheduler polynomial`"
    ):
        _checked(data, *poly, "--max_train_steps", "3", "--lr_warmup_steps", "3")
    with pytest.raises(ValueError, match=r"`--learning_rate` 1e-08 .*1e-07.*`--lr_scheduler polynomial`"):
        _checked(data, *poly, "--learning_rate", "1e-8")
    _checked(data, *poly, "--max_train_steps", "4", "--lr_warmup_steps", "3")
    _checked(data, *poly, "--learning_rate", "1e-8", "--scale_lr", "--train_batch_size", "16")  # 1.6e-7 trained
    _checked(data, "--output_dir", str(tmp_path / "run"), "--max_train_steps", "3", "--lr_warmup_steps", "3")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--label_column", "fine_label"], "`--label_column` 'fine_label' is not used without `--class_conditional`"),
        (["--label_column", "y", "--class_conditional"], "`--label_column` 'y' is not used with `--train_data_dir`"),
        (["--image_column", "img"], "`--image_column` 'img' is not used with `--train_data_dir`"),
        (["--dataset_config_name", "plain"], "`--dataset_config_name` 'plain' is not used with `--train_data_dir`"),
    ],
)
def test_dataset_options_a_run_does_not_read_are_refused(tmp_path, argv, message):
    # were ignored in silence: a run given a label column but not `--class_conditional` trained unconditional, and a
    # folder of images has no columns nor configurations
    with pytest.raises(ValueError, match=re.escape(message)):
        _checked(tmp_path, "--output_dir", str(tmp_path.parent / "run"), *argv)
    args = build_parser("").parse_args(["--dataset_name", "d", "--image_column", "img", "--label_column", "y",
                                        "--class_conditional", "--dataset_config_name", "plain",
                                        "--output_dir", str(tmp_path / "run")])  # fmt: skip
    check_args(args, TimestepPartition([442, 631]), 1)


def test_eval_batch_size_defaults_to_the_default_grid_in_one_call_and_takes_any_split(tmp_path):
    # the default (16) is the default grid in one pipeline call, as before the option; a grid smaller than it, and a
    # split smaller than the grid, are fine
    assert _checked(tmp_path).eval_batch_size == 16
    assert _checked(tmp_path, "--num_sample_images", "4").eval_batch_size == 16
    assert _checked(tmp_path, "--num_sample_images", "7", "--eval_batch_size", "3").eval_batch_size == 3


def test_an_output_dir_that_is_or_holds_the_vae_folder_is_refused(tmp_path):
    # `--vae_path PIPE --vae_subfolder vae --output_dir PIPE` (or `--vae_path PIPE/vae`) trained into the folder the
    # VAE was read from: the final save swapped its own unet/, scheduler/ and model_index.json in over the user's
    data, pipe = tmp_path / "data", tmp_path / "pipe"
    (pipe / "vae").mkdir(parents=True)
    data.mkdir()
    for vae in (["--vae_path", str(pipe), "--vae_subfolder", "vae"], ["--vae_path", str(pipe / "vae")],
                ["--vae_path", str(pipe)]):  # fmt: skip
        args = build_parser("").parse_args(["--train_data_dir", str(data), "--output_dir", str(pipe), *vae])
        with pytest.raises(ValueError, match=f"`--output_dir` {re.escape(repr(str(pipe)))} is or holds the VAE"):
            check_args(args, TimestepPartition([442, 631]), 1)
    for output_dir in (tmp_path / "run", pipe / "run"):  # a folder of its own (inside the VAE's pipeline too)
        args = build_parser("").parse_args(
            [
                "--train_data_dir",
                str(data),
                "--output_dir",
                str(output_dir),
                "--vae_path",
                str(pipe),
                "--vae_subfolder",
                "vae",
            ]
        )
        check_args(args, TimestepPartition([442, 631]), 1)


@pytest.mark.parametrize("script_name", ["multistage", "experts", "dual_backbone"])
@pytest.mark.parametrize("classes", [[], ["cat"]])
def test_class_conditional_without_class_sub_folders_is_a_usage_error(script_name, classes, tmp_path, capsys):
    # images directly in `--train_data_dir` (or in one sub-folder) with `--class_conditional` were a ValueError
    # traceback out of the data reading, once the run had started, that named no way to give the labels
    from PIL import Image

    from tests.examples.conftest import TINY, load_script

    data = tmp_path / "data"
    for folder in [data, *(data / name for name in classes)]:
        folder.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(folder / "0.png")
    argv = [*TINY, "--train_data_dir", str(data), "--output_dir", str(tmp_path / "run"), "--class_conditional"]
    with pytest.raises(SystemExit) as exit_info:
        load_script(script_name).parse_args(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"`--train_data_dir` {str(data)!r}" in err
    assert "one sub-folder per class" in err and "`--dataset_name` with `--label_column`" in err


@pytest.mark.parametrize("name", ["", " "])
def test_an_empty_dataset_name_is_refused_before_training(name, tmp_path):
    # passed the checks (not None) and ended, once the run had started, in "could not be loaded (IndexError: list
    # index out of range)" out of `datasets.load_dataset`
    args = build_parser("").parse_args(["--dataset_name", name, "--output_dir", str(tmp_path / "run")])
    with pytest.raises(ValueError, match=f"`--dataset_name` must name a dataset .*got {re.escape(repr(name))}"):
        check_args(args, TimestepPartition([442, 631]), 1)
