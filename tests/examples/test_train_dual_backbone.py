"""`examples/dual_backbone/train_dual_backbone.py`: both backbones in one run, or one backbone (EDM) per run."""

import os

import pytest
import torch
from diffusers import UNet2DModel

from diffusers_stages import DualBackbonePipeline, UViT2DModel


@pytest.fixture(scope="module")
def script(examples):
    return examples.load_script("dual_backbone")


def test_both_backbones_train_reload_and_sample(examples, script, image_folder, tmp_path):
    out = str(tmp_path / "run")
    examples.train(script, [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", out, "--layers_per_block", "2",
         "--shallow_block_out_channels", "8,8", "--switch_step_fraction", "0.5", "--use_ema", "--max_train_steps", "2",
         "--prediction_type", "v_prediction"])  # fmt: skip
    pipe = DualBackbonePipeline.from_pretrained(out)
    assert pipe.deep.config.layers_per_block == 2 and pipe.shallow.config.layers_per_block == 1
    assert pipe.shallow.config.block_out_channels == [8, 8] and pipe.config.switch_step_fraction == 0.5
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    pipe.set_progress_bar_config(disable=True)
    assert [e for _, e in pipe.expert_schedule(num_inference_steps=4)] == [1, 1, 0, 0]
    assert pipe(batch_size=2, num_inference_steps=4, output_type="np").images.shape == (2, 8, 8, 3)


def test_one_backbone_per_run_edm(examples, script, image_folder, tmp_path):
    runs = {}
    for name in ("shallow", "deep"):
        runs[name] = str(tmp_path / name)
        push = ["--push_to_hub", "--hub_model_id", "me/shallow", "--hub_local_dir", str(tmp_path / "hub")] * (
            name == "shallow"
        )
        examples.train(script, [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", runs[name], "--backbones", name,
             "--boundary_units", "sigma", "--max_train_steps", "1", *push])  # fmt: skip
    nets = {name: UNet2DModel.from_pretrained(os.path.join(path, name)) for name, path in runs.items()}
    # the pushed run's card: its code loads the backbone (was `StagedDiffusionPipeline.from_pretrained`, which refuses
    # a folder without a pipeline)
    pushed = tmp_path / "hub" / "me" / "shallow"
    with open(pushed / "README.md", encoding="utf-8") as f:
        code = f.read().split("```python\n")[1].split("```")[0]
    card = {}
    code = code.replace('"me/shallow"', repr(str(pushed))).replace(
        '"<repository of the deep run>"', repr(runs["deep"])
    )
    code = code.replace("pipe(", "pipe.set_progress_bar_config(disable=True) or pipe(num_inference_steps=3, ")
    exec(code, card)  # the repository, as a download would give it, and the deep run's folder
    for name, net in nets.items():
        assert all(torch.equal(a, b) for a, b in zip(card[name].state_dict().values(), net.state_dict().values()))
    assert card["image"].size == (8, 8)


def test_a_one_backbone_runs_card_loads_that_backbone_and_samples_with_the_other_runs(
    examples, script, image_folder, tmp_path
):
    # the card of a `--backbones shallow|deep` push said `StagedDiffusionPipeline.from_pretrained(repo)`, which fails
    # on a repository with no pipeline in it (one network and the scheduler), and described a shallow and a deep model
    hub = str(tmp_path / "hub")
    for name in ("shallow", "deep"):
        examples.train(script, [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", str(tmp_path / name),
             "--backbones", name, "--switch_timestep", "600", "--max_train_steps", "1", "--push_to_hub",
             "--hub_model_id", f"me/{name}", "--hub_local_dir", hub])  # fmt: skip
    with open(os.path.join(hub, "me", "shallow", "README.md"), encoding="utf-8") as f:
        card = f.read()
    assert "StagedDiffusionPipeline" not in card and "The shallow network of a dual-backbone model" in card
    code = card.split("```python\n")[1].split("```")[0]
    assert 'UNet2DModel.from_pretrained("<repository of the deep run>", subfolder="deep")' in code
    code = code.replace("<repository of the deep run>", "me/deep").replace('"me/', f'"{hub}/me/')
    code = code.replace("pipe(", "pipe.set_progress_bar_config(disable=True) or pipe(num_inference_steps=2, ")
    scope = {}
    exec(code, scope)  # the card's own code: the two runs' backbones, the scheduler and the switch given
    assert scope["pipe"].config.switch_timestep == 600 and scope["image"].size == (8, 8)


def test_uvit_backbones_train_reload_and_sample(examples, script, image_folder, tmp_path, capsys):
    out = str(tmp_path / "uvit")
    examples.train(script, [*examples.TINY_RUN, "--train_data_dir", image_folder, "--output_dir", out, "--backbone", "uvit",
         "--shallow_depth", "3", "--deep_depth", "5", "--uvit_hidden_size", "16", "--uvit_num_attention_heads", "2",
         "--uvit_patch_size", "2", "--switch_step_fraction", "0.5", "--max_train_steps", "2",
         "--gradient_checkpointing"])  # fmt: skip
    pipe = DualBackbonePipeline.from_pretrained(out)
    assert isinstance(pipe.shallow, UViT2DModel) and isinstance(pipe.deep, UViT2DModel)
    assert (len(pipe.shallow.blocks), len(pipe.deep.blocks)) == (3, 5)
    assert pipe.shallow.config.hidden_size == pipe.deep.config.hidden_size == 16
    pipe.set_progress_bar_config(disable=True)
    assert [e for _, e in pipe.expert_schedule(num_inference_steps=4)] == [1, 1, 0, 0]
    first = pipe(batch_size=2, num_inference_steps=4, generator=torch.manual_seed(0), output_type="np").images
    again = DualBackbonePipeline.from_pretrained(out)
    again.set_progress_bar_config(disable=True)
    second = again(batch_size=2, num_inference_steps=4, generator=torch.manual_seed(0), output_type="np").images
    assert first.shape == (2, 8, 8, 3) and (first == second).all()
    # an even depth is refused before any training starts
    with pytest.raises(SystemExit):
        script.parse_args([*examples.TINY_RUN, "--train_data_dir", image_folder, "--output_dir", out, "--backbone", "uvit",
                           "--deep_depth", "12"])  # fmt: skip
    assert "`deep_depth`" in capsys.readouterr().err


def test_bad_switch(examples, script, image_folder, tmp_path, capsys):
    with pytest.raises(SystemExit):
        script.parse_args([*examples.TINY, "--train_data_dir", image_folder, "--output_dir", str(tmp_path),
                                "--switch_step_fraction", "0.5", "--switch_timestep", "300"])  # fmt: skip
    assert "not both" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--switch_timestep", "1500"], "`--switch_timestep` must lie inside the training schedule (0, 1000)"),
        (["--switch_timestep", "0"], "`--switch_timestep` must lie inside the training schedule (0, 1000)"),
        (["--switch_timestep", "nan"], "`--switch_timestep` must lie inside the training schedule (0, 1000)"),
        (["--switch_timestep", "500", "--boundary_units", "sigma"], "give `--switch_step_fraction` instead"),
        # were a crash in the first training step (0 layers), a ZeroDivisionError in the checks (patch size 0), or
        # the model's error after the data was read, naming no option
        (["--shallow_layers_per_block", "0"], "`--shallow_layers_per_block` must be a positive integer, got 0."),
        (["--shallow_block_out_channels", "0,8"], "`--shallow_block_out_channels` must be positive integers, got"),
        (["--backbone", "uvit", "--uvit_patch_size", "0"], "`--uvit_patch_size` must be a positive integer, got 0."),
        (["--backbone", "early_exit", "--uvit_patch_size", "0"], "`--uvit_patch_size` must be a positive integer"),
        # named only U-Net down blocks as the factor, where it is the U-ViT patch size
        (
            ["--backbone", "uvit", "--uvit_patch_size", "3"],
            "`--resolution` 8 must be divisible by the model's total down-sampling factor 3 (U-Net down blocks or U-ViT patch size",
        ),
        # was ignored in silence: AdaDiff's loss has no Min-SNR weighting
        (["--backbone", "early_exit", "--snr_gamma", "5"], "has no Min-SNR weighting: drop `--snr_gamma`"),
        (["--backbone", "uvit", "--uvit_hidden_size", "0"], "`--uvit_hidden_size` must be a positive integer, got 0"),
        (
            ["--backbone", "uvit", "--uvit_num_attention_heads", "-2"],
            "`--uvit_num_attention_heads` must be a positive",
        ),
        # was trained, saved, then a crash at the final sample grid: a step fraction needs two steps to split
        (["--num_inference_steps", "1"], "`--num_inference_steps` 1 cannot sample the sample grids: the switch"),
        # named the model's `hidden_size` and `num_attention_heads`, no option, and pointed at `--model_config`
        (
            ["--backbone", "uvit", "--uvit_hidden_size", "12", "--uvit_num_attention_heads", "8"],
            "`--uvit_hidden_size` 12 must be a multiple of `--uvit_num_attention_heads` 8",
        ),
        (["--backbone", "early_exit", "--uvit_hidden_size", "12"], "`--uvit_hidden_size` 12 must be a multiple of"),
        # were the model's traceback once the data was read
        (["--norm_num_groups", "3"], "describe no network that can be built: num_channels (8) must be divisible by"),
        (["--down_block_types", "DownBlock2D", "Foo"], "describe no network that can be built: Foo does not exist."),
        # were ignored in silence: U-ViTs take no U-Net arguments
        (
            ["--backbone", "uvit", "--block_out_channels", "8,16"],
            "`--block_out_channels` [8, 16] cannot be combined with `--backbone uvit`: its U-ViTs take no U-Net arguments",
        ),
        (
            ["--backbone", "uvit", "--shallow_block_out_channels", "8,16"],
            "`--shallow_block_out_channels` [8, 16] cannot",
        ),
        (
            ["--backbone", "early_exit", "--dropout", "0.1"],
            # its one U-ViT has no shallow model: the message named `--shallow_depth`, which it ignores
            "`--dropout` 0.1 cannot be combined with `--backbone early_exit`: its U-ViT takes no U-Net arguments "
            "(its shape: `--uvit_*`, `--deep_depth`)",
        ),
        (["--backbone", "early_exit", "--model_config", "unet.json"], "`--model_config` unet.json cannot be combined"),
        # were ignored in silence: U-Nets take no U-ViT options, U-ViTs no U-Net layer count, one U-ViT no depth of a
        # shallow one (options with defaults: a value other than the default was typed, so meant)
        (["--uvit_hidden_size", "64"], "`--uvit_hidden_size` 64 is not used by `--backbone unet`"),
        (["--shallow_depth", "5"], "`--shallow_depth` 5 is not used by `--backbone unet`"),
        (
            ["--backbone", "uvit", "--shallow_layers_per_block", "2"],
            "`--shallow_layers_per_block` 2 is not used by `--backbone uvit`",
        ),
        (
            ["--backbone", "early_exit", "--shallow_depth", "5"],
            "`--shallow_depth` 5 is not used by `--backbone early_exit`",
        ),
        *(  # were ignored in silence: both networks train on every timestep of every batch
            (
                ["--stage_sampling", scheme],
                f"`--stage_sampling {scheme}` is not implemented for dual-backbone training",
            )
            for scheme in ("per_batch", "per_rank")
        ),
    ],
)
def test_a_switch_the_pipeline_would_refuse_is_refused_before_training(
    examples, script, image_folder, tmp_path, capsys, extra, message
):
    # refused by the arguments' check, not by the pipeline built after the last training step (U-ViTs: no U-Net shape)
    tiny = examples.TINY_RUN if "--backbone" in extra else examples.TINY
    with pytest.raises(SystemExit):
        script.parse_args([*tiny, "--train_data_dir", image_folder, "--output_dir", str(tmp_path), *extra])
    assert message in capsys.readouterr().err


def test_early_exit_baseline_trains_through_the_loop_and_samples(examples, script, image_folder, tmp_path, capsys):
    from diffusers_stages import ExpertRoutingPipeline
    from diffusers_stages.models import EarlyExitUViT2DModel

    out = str(tmp_path / "early")
    examples.train(script, [*examples.TINY_RUN, "--train_data_dir", image_folder, "--output_dir", out, "--backbone",
         "early_exit", "--deep_depth", "3", "--uvit_hidden_size", "16", "--uvit_num_attention_heads", "2",
         "--uvit_patch_size", "2", "--max_train_steps", "2"])  # fmt: skip
    pipe = ExpertRoutingPipeline.from_pretrained(out)
    model = pipe.experts.expert(0)
    assert isinstance(model, EarlyExitUViT2DModel) and len(model.blocks) == 3
    # trained with AdaDiff's loss: every uncertainty head's bias (initialised to zero) was updated
    assert all(float(head.bias.detach().abs().sum()) > 0 for head in model.uncertainty_heads)
    pipe.set_progress_bar_config(disable=True)
    model.exit_threshold = 1.0  # every sample exits after the first block
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 3) and model.last_exit_layer == 1
    # switch and stage arguments mean nothing here: refused before training
    for extra in (["--switch_step_fraction", "0.5"], ["--deep_depth", "4"], ["--backbones", "deep"]):
        with pytest.raises(SystemExit):
            script.parse_args([*examples.TINY_RUN, "--train_data_dir", image_folder, "--output_dir", out, "--backbone",
                               "early_exit", *extra])  # fmt: skip
        assert extra[0] in capsys.readouterr().err


def test_resuming_a_checkpoint_of_other_backbones_names_them(examples, script, image_folder, tmp_path):
    # a `--backbones both` checkpoint resumed with `--backbones deep` loaded the deep network, then failed in torch's
    # optimizer ("loaded state dict contains a parameter group that doesn't match the size of optimizer's group")
    args = [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", str(tmp_path / "run"),
            "--checkpointing_steps", "1"]  # fmt: skip
    examples.train(script, [*args, "--max_train_steps", "1"])
    with pytest.raises(ValueError, match=r"holds the networks \['deep', 'shallow'\], but this run trains \['deep'\]"):
        examples.train(
            script, [*args, "--max_train_steps", "2", "--backbones", "deep", "--resume_from_checkpoint", "latest"]
        )


def test_one_backbone_runs_in_a_latent_space_keep_their_vae_for_the_cards_code(
    examples, script, image_folder, tmp_path
):
    # a `--backbones shallow|deep --vae_path` run saved its network and scheduler but not the VAE, and its card's code
    # built the pipeline without one: it "sampled" the latents as an 8x8 RGBA image, silently
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  sample_size=16).save_pretrained(tmp_path / "vae")  # fmt: skip
    hub = str(tmp_path / "hub")
    for name in ("shallow", "deep"):
        examples.train(script, [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", str(tmp_path / name),
             "--backbones", name, "--vae_path", str(tmp_path / "vae"), "--resolution", "16", "--max_train_steps", "1",
             "--push_to_hub", "--hub_model_id", f"me/{name}", "--hub_local_dir", hub])  # fmt: skip
        assert os.path.isdir(tmp_path / name / "vae")
    with open(os.path.join(hub, "me", "shallow", "README.md"), encoding="utf-8") as f:
        code = f.read().split("```python\n")[1].split("```")[0]
    code = code.replace("<repository of the deep run>", "me/deep").replace('"me/', f'"{hub}/me/')
    code = code.replace("pipe(", "pipe.set_progress_bar_config(disable=True) or pipe(num_inference_steps=2, ")
    scope = {}
    exec(code, scope)  # the card's own code, on the pushed repositories
    assert scope["pipe"].vae is not None and (scope["image"].size, scope["image"].mode) == ((16, 16), "RGB")


def test_help_says_the_stage_options_are_refused(script, capsys):
    # the shared parser's help described per-stage batch shares and stage sampling, which this script refuses
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split()).split(" options: ", 1)[1]  # past the usage line
    for option in ("--stage_shares", "--stage_sampling"):
        after = help_text.split(option, 1)[1].split(" --", 1)[0]
        assert "Refused by this script" in after, (option, after)
    assert "Share of each batch per stage" not in help_text and "one stage per process" not in help_text


def test_a_one_backbone_run_says_why_it_draws_no_sample_grid(examples, script, image_folder, tmp_path, caplog):
    # one backbone alone does not sample: the run wrote no sample grid, without a word
    out = str(tmp_path / "run")
    with caplog.at_level("INFO"):
        examples.train(script, [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", out, "--backbones",
                                "shallow", "--max_train_steps", "1"])  # fmt: skip
    assert not os.path.exists(os.path.join(out, "sample_grid.png"))
    assert "No sample grid" in caplog.text and "one backbone alone does not sample" in caplog.text
