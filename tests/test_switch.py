import math
import re

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image

from diffusers_stages import DualBackbonePipeline, MultiStagePipeline
from diffusers_stages.switch import denoising_error, main, recommend_switch


class Analytic(torch.nn.Module):
    """An epsilon predictor for all-zero data, x_t = sqrt(1 - abar_t) eps: ``exact`` divides by sqrt(1 - abar_t)
    (plus a constant offset), the crude one returns x_t itself, whose error (1 - sqrt(1 - abar_t))^2 vanishes only
    at the noisy end."""

    def __init__(self, scheduler, exact: bool, offset: float = 0.0):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.alphas_cumprod, self.exact, self.offset = scheduler.alphas_cumprod, exact, offset

    def forward(self, sample, timestep, class_labels=None):
        if not self.exact:
            return sample
        return sample / (1 - self.alphas_cumprod[timestep]).sqrt().reshape(-1, 1, 1, 1) + self.offset


def test_recommended_switch_matches_the_analytic_crossing():
    scheduler = DDPMScheduler()
    deep = Analytic(scheduler, exact=True, offset=0.1)  # error 0.01 everywhere
    shallow = Analytic(scheduler, exact=False)
    images = torch.zeros(64, 1, 8, 8)
    found = recommend_switch(shallow, deep, scheduler, images, tolerance=0.0, num_levels=101)
    assert torch.allclose(found.deep_error, torch.full_like(found.deep_error, 0.01), rtol=1e-4)
    # the shallow model's error (1 - sqrt(1 - abar_t))^2 E[eps^2] crosses 0.01 where abar_t = 0.19: the switch
    # lands there, up to the grid step and the Monte Carlo error of E[eps^2]
    crossing = int((scheduler.alphas_cumprod > 0.19).sum())
    assert abs(found.switch - crossing) <= 20 and found.switch in found.levels.tolist()
    expected = found.switch
    assert found.pipeline_kwargs() == {"switch_timestep": expected}
    assert 0 < found.shallow_share() < 1
    looser = recommend_switch(shallow, deep, scheduler, images, tolerance=3.0, num_levels=101)
    assert looser.switch < found.switch  # a looser tolerance hands more of the schedule to the shallow model
    never = recommend_switch(Analytic(scheduler, exact=True, offset=1.0), deep, scheduler, images, num_levels=5)
    assert never.switch is None
    with pytest.raises(ValueError, match="No switch"):
        never.pipeline_kwargs()
    with pytest.raises(ValueError, match="tolerance"):
        recommend_switch(shallow, deep, scheduler, images, tolerance=-1)


def test_command_prints_the_switch_and_saves_the_plot(tiny_unet_kwargs, tmp_path, capsys):
    shape = {**tiny_unet_kwargs, "in_channels": 1, "out_channels": 1}
    torch.manual_seed(0)
    deep, shallow = (
        UNet2DModel(**shape),
        UNet2DModel(**{**shape, "block_out_channels": (4, 8), "attention_head_dim": None}),
    )
    DualBackbonePipeline(shallow=shallow, deep=deep, scheduler=DDPMScheduler(), switch_timestep=500).save_pretrained(
        tmp_path / "pipe"
    )
    plot = tmp_path / "switch.png"
    found = main(
        [
            "--pipeline",
            str(tmp_path / "pipe"),
            "--data",
            "digits",
            "--num_images",
            "8",
            "--num_levels",
            "4",
            "--tolerance",
            "0.5",
            "--plot",
            str(plot),
        ]
    )
    printed = capsys.readouterr().out
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert "shallow/deep FLOPs per call" in printed and f"plot: {plot}" in printed
    assert ("recommended switch" in printed) == (found.switch is not None and found.shallow_share() < 1)
    assert len(found.levels) == 4 and math.isfinite(float(found.deep_error.sum()))


@pytest.mark.parametrize(
    "argv, match",
    [
        # the command names its options (was the Python argument's name: `num_levels`)
        (["--num_levels", "0"], "`--num_levels` must be an integer >= 2, got 0"),
        (["--num_levels", "1"], "`--num_levels` must be an integer >= 2, got 1"),
        (["--num_images", "0"], "`--num_images` must be an integer >= 1, got 0"),
        (["--tolerance", "nan"], "`--tolerance` must be a non-negative number, got nan"),
        (["--tolerance", "-1"], "`--tolerance` must be a non-negative number, got -1.0"),
        (["--num_inference_steps", "0"], "`--num_inference_steps` must be a positive integer, got 0"),
        # the plot is a PNG: it was written into switch.pdf
        (["--plot", "switch.pdf"], "`--plot` 'switch.pdf' names a .pdf file, but the plot is a PNG"),
        (["--shallow", "other"], "`--pipeline` holds the models: `--shallow`"),  # would be ignored
        (["--scheduler", "other"], "`--pipeline` holds the models: `--scheduler`"),
        # were torch's "Overflow when unpacking long long", once the models and data were loaded
        (["--seed", str(2**64)], re.escape(f"`--seed` must be in [0, 2**32), got {2**64}")),
        (["--seed", "-1"], re.escape("`--seed` must be in [0, 2**32), got -1")),  # as the other commands' seeds
    ],
)
def test_command_refuses_bad_settings_before_loading_anything(argv, match):
    with pytest.raises(ValueError, match=match):
        main(["--pipeline", "/no/such/folder", *argv])  # the settings are refused before the folder is read


def test_recommend_switch_refuses_bad_settings():
    scheduler, images = DDPMScheduler(), torch.zeros(4, 1, 8, 8)
    model = Analytic(scheduler, exact=False)
    for kwargs, match in (
        ({"num_levels": 0}, "`num_levels` must be an integer >= 2, got 0"),
        ({"num_levels": True}, "`num_levels` must be an integer >= 2, got True"),
        ({"num_levels": 2.5}, "`num_levels` must be an integer >= 2, got 2.5"),
        ({"tolerance": True}, "`tolerance` must be a non-negative number, got True"),
    ):
        with pytest.raises(ValueError, match=match):
            recommend_switch(model, model, scheduler, images, **kwargs)


def test_command_refuses_a_pipeline_that_is_not_dual_backbone(tiny_multistage, tmp_path):
    MultiStagePipeline(unet=tiny_multistage, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "staged")
    with pytest.raises(ValueError, match="`--pipeline` .* holds a MultiStagePipeline, not a DualBackbonePipeline"):
        main(["--pipeline", str(tmp_path / "staged"), "--num_levels", "3"])
    with pytest.raises(ValueError, match="`--pipeline` .* is not a saved pipeline folder"):
        main(["--pipeline", str(tmp_path / "missing")])


@pytest.mark.parametrize(
    "images, kwargs, match",
    [
        ([[0.0]], {}, "`images` must be a non-empty floating-point \\(N, C, H, W\\) tensor in \\[-1, 1\\], got list"),
        (torch.zeros(4, 1, 8, 8, dtype=torch.long), {}, "floating-point .* got a torch.int64 tensor"),
        (torch.full((4, 1, 8, 8), math.nan), {}, "`images` hold NaN or infinite values"),
        (torch.zeros(4, 3, 8, 8), {}, "`images` have 3 channels but the deep model takes 1"),
        (torch.zeros(4, 1, 8, 8), {"batch_size": 0}, "`batch_size` must be a positive integer, got 0"),
    ],
)
def test_recommend_switch_refuses_images_and_batch_sizes_it_cannot_measure(tiny_unet_kwargs, images, kwargs, match):
    unet = UNet2DModel(**{**tiny_unet_kwargs, "in_channels": 1, "out_channels": 1})
    with pytest.raises(ValueError, match=match):
        recommend_switch(unet, unet, DDPMScheduler(), images, num_levels=3, **kwargs)


def test_command_measures_a_class_conditional_pair(tiny_unet_kwargs, tmp_path, capsys):
    shape = {**tiny_unet_kwargs, "in_channels": 1, "out_channels": 1, "num_class_embeds": 11}  # digits + null label
    torch.manual_seed(0)
    pipe = DualBackbonePipeline(shallow=UNet2DModel(**shape), deep=UNet2DModel(**shape), scheduler=DDPMScheduler())
    pipe.save_pretrained(tmp_path / "pipe")
    common = ["--pipeline", str(tmp_path / "pipe"), "--num_images", "4", "--num_levels", "3"]
    found = main([*common, "--plot", str(tmp_path / "digits.png")])  # the digits' own classes
    assert math.isfinite(float(found.deep_error.sum()))
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8), 60 * i, dtype=np.uint8), mode="L").save(folder / f"{i}.png")
    found = main([*common, "--data", str(folder), "--plot", str(tmp_path / "folder.png")])  # the unconditional label
    assert math.isfinite(float(found.deep_error.sum())) and "class labels: " in capsys.readouterr().out


def test_data_that_gives_no_images_is_refused_naming_the_data_option(tiny_unet_kwargs, tmp_path):
    # the errors named `train_data_dir` and `dataset`, options the switch command does not have
    shape = {**tiny_unet_kwargs, "in_channels": 1, "out_channels": 1}
    pipe = DualBackbonePipeline(shallow=UNet2DModel(**shape), deep=UNet2DModel(**shape), scheduler=DDPMScheduler())
    pipe.save_pretrained(tmp_path / "pipe")
    (tmp_path / "empty").mkdir()
    common = ["--pipeline", str(tmp_path / "pipe"), "--num_levels", "3", "--plot", str(tmp_path / "s.png")]
    with pytest.raises(ValueError, match="No images found in `--data` ") as error:
        main([*common, "--data", str(tmp_path / "empty")])
    assert "train_data_dir" not in str(error.value)
    with pytest.raises(ValueError, match="`--data` 'no-such-dataset' is neither a folder nor a dataset") as error:
        main([*common, "--data", "no-such-dataset"])
    assert "`dataset`" not in str(error.value)


def test_more_levels_than_training_timesteps_are_refused_naming_the_option_before_the_data_is_read(
    tiny_unet_kwargs, tmp_path, monkeypatch
):
    # was "`num_levels`=2000 exceeds ...", the Python argument, once the data was loaded
    import diffusers_stages.switch as switch

    shape = {**tiny_unet_kwargs, "in_channels": 1, "out_channels": 1}
    pipe = DualBackbonePipeline(shallow=UNet2DModel(**shape), deep=UNet2DModel(**shape), scheduler=DDPMScheduler())
    pipe.save_pretrained(tmp_path / "pipe")
    monkeypatch.setattr(switch, "_load_data", lambda *args: pytest.fail("the data was read"))
    with pytest.raises(ValueError, match="`--num_levels`=2000 exceeds the 1000 training timesteps"):
        main(["--pipeline", str(tmp_path / "pipe"), "--num_levels", "2000", "--plot", str(tmp_path / "s.png")])


def _pipeline_for(found, scheduler, tiny_unet_kwargs):
    shape = {**tiny_unet_kwargs, "in_channels": 1, "out_channels": 1}
    return DualBackbonePipeline(
        shallow=UNet2DModel(**shape), deep=UNet2DModel(**shape), scheduler=scheduler, **found.pipeline_kwargs()
    )


@pytest.mark.parametrize("edm", [False, True])
def test_the_pipeline_hands_the_shallow_model_exactly_the_recommended_levels(edm, tiny_unet_kwargs):
    # sigma stages are (b_{s-1}, b_s]: switch_sigma = the lowest good level handed that level to the deep model, so
    # a switch at the noisiest measured level ran the shallow model on none of them
    from diffusers import EDMEulerScheduler

    from diffusers_stages.switch import SwitchRecommendation, noise_levels

    scheduler = EDMEulerScheduler() if edm else DDPMScheduler()
    levels = noise_levels(scheduler, 5)
    errors = torch.ones(5, dtype=torch.float64)
    for index in (1, 2, 4):
        found = SwitchRecommendation(levels, errors, errors, 0.0, float(levels[index]), "sigma" if edm else "timestep")
        partition = _pipeline_for(found, scheduler, tiny_unet_kwargs).partition
        shallow = partition.stage_for_noise_level(levels.double()) == 1
        assert shallow.tolist() == (levels >= found.switch).tolist()
        if edm:  # and as the sampling loop routes them: by the c_noise the scheduler hands the model
            c_noise = scheduler.precondition_noise(levels)
            assert (partition.stage_for_timestep(c_noise) == 1).tolist() == shallow.tolist()
        assert shallow.double().mean() == found.shallow_share()


@pytest.mark.parametrize("edm", [False, True])
def test_a_shallow_model_good_everywhere_is_told_to_run_alone(edm):
    # the switch at the clean end gave {'switch_timestep': 0.0}, which DualBackbonePipeline refuses as a boundary
    from diffusers import EDMEulerScheduler

    from diffusers_stages.switch import SwitchRecommendation, noise_levels

    levels = noise_levels(EDMEulerScheduler() if edm else DDPMScheduler(), 5)
    errors = torch.ones(5, dtype=torch.float64)
    found = SwitchRecommendation(levels, errors, errors, 0.0, float(levels[0]), "sigma" if edm else "timestep")
    assert found.shallow_share() == 1.0
    with pytest.raises(ValueError, match="every measured level.*shallow model alone"):
        found.pipeline_kwargs()


def test_command_says_to_run_the_shallow_model_alone_when_it_is_good_everywhere(tiny_unet_kwargs, tmp_path, capsys):
    shape = {**tiny_unet_kwargs, "in_channels": 1, "out_channels": 1}
    torch.manual_seed(0)
    pipe = DualBackbonePipeline(
        shallow=UNet2DModel(**shape), deep=UNet2DModel(**shape), scheduler=DDPMScheduler(), switch_timestep=500
    )
    pipe.save_pretrained(tmp_path / "pipe")
    argv = ["--pipeline", str(tmp_path / "pipe"), "--num_images", "4", "--num_levels", "3", "--tolerance", "1e9"]
    found = main([*argv, "--plot", str(tmp_path / "switch.png")])
    printed = capsys.readouterr().out
    assert found.shallow_share() == 1.0 and "sample with it alone" in printed and "recommended switch" not in printed


def test_the_error_is_measured_on_the_training_noise_whatever_the_pipelines_scheduler(tiny_unet_kwargs):
    # diffusion_loss noised with the given scheduler's add_noise: Euler-type ones give x0 + sigma eps (unscaled),
    # multistep solvers index their inference sigmas, so the same model measured different errors per scheduler
    import diffusers

    from diffusers_stages.switch import denoising_error, noise_levels

    torch.manual_seed(0)
    model = UNet2DModel(**{**tiny_unet_kwargs, "in_channels": 1, "out_channels": 1})
    images = torch.rand(4, 1, *(2 * [tiny_unet_kwargs["sample_size"]])) * 2 - 1
    levels = noise_levels(DDPMScheduler(), 3)
    expected = denoising_error(model, DDPMScheduler(beta_schedule="squaredcos_cap_v2"), images, levels)
    for name in ("DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler"):
        scheduler = getattr(diffusers, name)(beta_schedule="squaredcos_cap_v2")
        assert torch.allclose(denoising_error(model, scheduler, images, levels), expected), name


def test_a_scheduler_without_a_training_noise_schedule_is_refused_by_name(tiny_unet_kwargs):
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = UNet2DModel(**{**tiny_unet_kwargs, "in_channels": 1, "out_channels": 1})
    images = torch.rand(2, 1, *(2 * [tiny_unet_kwargs["sample_size"]])) * 2 - 1
    with pytest.raises(ValueError, match="`scheduler` FlowMatchEulerDiscreteScheduler"):  # was an AttributeError
        recommend_switch(model, model, FlowMatchEulerDiscreteScheduler(), images, num_levels=2)


def test_a_scheduler_that_conditions_on_c_noise_is_refused_by_name(tiny_unet_kwargs):
    # continuous-timestep Euler (CosXL-style) hands its model ln(sigma)/4: the error was measured on integer
    # training timesteps, and the recommended `switch_timestep` was then refused by DualBackbonePipeline's units check
    from diffusers import EulerDiscreteScheduler

    model = UNet2DModel(**{**tiny_unet_kwargs, "in_channels": 1, "out_channels": 1})
    images = torch.rand(2, 1, *(2 * [tiny_unet_kwargs["sample_size"]])) * 2 - 1
    scheduler = EulerDiscreteScheduler(timestep_type="continuous", prediction_type="v_prediction")
    with pytest.raises(ValueError, match="`scheduler` EulerDiscreteScheduler .*timestep_type='continuous'"):
        recommend_switch(model, model, scheduler, images, num_levels=2)


@pytest.mark.parametrize("source", ["pipeline", "folders"])
def test_a_latent_pair_is_measured_on_its_vaes_latents(source, tiny_unet_kwargs, tmp_path, monkeypatch):
    # the images were resized to the latent resolution and their channels repeated to the latent channels: the errors
    # were measured on pixels posing as latents, not on the VAE latents the models were trained on
    import diffusers_stages.switch as switch_module
    from diffusers_stages.conventions import vae_to_model_latents
    from tests.conftest import tiny_vae

    shape = {**tiny_unet_kwargs, "in_channels": 4, "out_channels": 4}  # 8 px latents of 16 px images
    torch.manual_seed(0)
    vae = tiny_vae()
    pipe = DualBackbonePipeline(
        shallow=UNet2DModel(**shape), deep=UNet2DModel(**shape), scheduler=DDPMScheduler(), vae=vae
    )
    pipe.save_pretrained(tmp_path / "pipe")
    seen = []
    measure = switch_module.recommend_switch
    monkeypatch.setattr(switch_module, "recommend_switch", lambda *a, **k: seen.append(a[3]) or measure(*a, **k))
    if source == "pipeline":
        models = ["--pipeline", str(tmp_path / "pipe")]
    else:
        models = [f"--{name}={tmp_path / 'pipe' / name}" for name in ("shallow", "deep", "scheduler", "vae")]
    argv = [*models, "--num_images", "4", "--num_levels", "2", "--seed", "3", "--plot", str(tmp_path / "s.png")]
    main(argv)
    pixels = switch_module._load_data("digits", 16, 3, 4)
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
    expected = vae_to_model_latents(vae, posterior.sample(torch.Generator().manual_seed(3)))
    assert seen[0].shape == (4, 4, 8, 8) and torch.allclose(seen[0], expected, atol=1e-6)


def test_a_vae_whose_latents_the_models_do_not_take_is_refused_naming_it(tiny_unet_kwargs, tmp_path):
    # pixel models (3 channels) given `--vae` (4-channel latents) failed naming `images`, which the user never gave
    from tests.conftest import tiny_vae

    shape = {**tiny_unet_kwargs, "in_channels": 3, "out_channels": 3}
    pipe = DualBackbonePipeline(
        shallow=UNet2DModel(**shape), deep=UNet2DModel(**shape), scheduler=DDPMScheduler(), vae=tiny_vae()
    )
    pipe.save_pretrained(tmp_path / "pipe")
    folders = [f"--{name}={tmp_path / 'pipe' / name}" for name in ("shallow", "deep", "scheduler", "vae")]
    run = ["--num_images", "4", "--num_levels", "2", "--plot", str(tmp_path / "s.png")]
    with pytest.raises(ValueError, match=r"`--vae` .*vae' gives 4-channel latents, but the models take 3 channels"):
        main([*folders, *run])
    with pytest.raises(ValueError, match=r"the pipeline's `vae` gives 4-channel latents, but the models take 3"):
        main(["--pipeline", str(tmp_path / "pipe"), *run])
    assert not (tmp_path / "s.png").exists()


def test_a_vae_whose_latent_statistics_do_not_fit_its_latents_is_refused_naming_it(tiny_unet_kwargs, tmp_path):
    # `latents_mean`/`latents_std` of another length than the latent channels failed in the encoding (a
    # broadcasting RuntimeError), after the data were read
    from tests.conftest import tiny_vae

    shape = {**tiny_unet_kwargs, "in_channels": 4, "out_channels": 4}
    vae = tiny_vae()
    vae.register_to_config(latents_mean=[0.1, 0.2], latents_std=[1.0, 2.0])
    pipe = DualBackbonePipeline(
        shallow=UNet2DModel(**shape), deep=UNet2DModel(**shape), scheduler=DDPMScheduler(), vae=vae
    )
    pipe.save_pretrained(tmp_path / "pipe")
    run = ["--num_images", "4", "--num_levels", "2", "--plot", str(tmp_path / "s.png")]
    with pytest.raises(ValueError, match=r"the pipeline's `vae`: `latents_mean` must give one number per latent"):
        main(["--pipeline", str(tmp_path / "pipe"), *run])
    assert not (tmp_path / "s.png").exists()


def test_latent_models_without_a_vae_are_refused_saying_to_give_it(tiny_unet_kwargs, tmp_path):
    # latent models (4 channels) given without `--vae`, or a pipeline of them saved without its VAE, were refused as
    # "`num_channels` must be 1 or 3, got 4", an argument the command does not have
    shape = {**tiny_unet_kwargs, "in_channels": 4, "out_channels": 4}
    pipe = DualBackbonePipeline(shallow=UNet2DModel(**shape), deep=UNet2DModel(**shape), scheduler=DDPMScheduler())
    pipe.save_pretrained(tmp_path / "pipe")
    folders = [f"--{name}={tmp_path / 'pipe' / name}" for name in ("shallow", "deep", "scheduler")]
    run = ["--num_images", "4", "--num_levels", "2", "--plot", str(tmp_path / "s.png")]
    with pytest.raises(ValueError, match=r"The models take 4-channel samples, not images \(1 or 3 channels\): .*give "
                       r"`--vae` \(the AutoencoderKL"):  # fmt: skip
        main([*folders, *run])
    with pytest.raises(ValueError, match=r"The models take 4-channel samples, .*`--pipeline` .*pipe' holds no `vae`"):
        main(["--pipeline", str(tmp_path / "pipe"), *run])
    assert not (tmp_path / "s.png").exists()


def test_a_vae_that_is_no_autoencoder_kl_is_refused_naming_it(tiny_unet_kwargs, tmp_path):
    # a model folder given as `--vae` was refused as a VAE giving "None-channel latents" (its config has no
    # `latent_channels`), not as what it is
    shape = {**tiny_unet_kwargs, "in_channels": 4, "out_channels": 4}
    pipe = DualBackbonePipeline(shallow=UNet2DModel(**shape), deep=UNet2DModel(**shape), scheduler=DDPMScheduler())
    pipe.save_pretrained(tmp_path / "pipe")
    folders = [f"--{name}={tmp_path / 'pipe' / name}" for name in ("shallow", "deep", "scheduler")]
    run = ["--vae", str(tmp_path / "pipe" / "deep"), "--num_images", "4", "--num_levels", "2"]
    with pytest.raises(
        ValueError, match=r"`--vae` .*deep' is a UNet2DModel: the switch is measured on an AutoencoderKL"
    ):
        main([*folders, *run, "--plot", str(tmp_path / "s.png")])
    assert not (tmp_path / "s.png").exists()


def test_an_interrupted_plot_leaves_an_earlier_plot_as_it_was(tmp_path, monkeypatch):
    import matplotlib.figure

    from diffusers_stages.switch import SwitchRecommendation, plot_switch

    found = SwitchRecommendation(torch.tensor([0, 500, 999]), torch.ones(3), torch.ones(3), 0.05, 500.0, "timestep")
    plot = tmp_path / "switch.png"
    plot.write_text("earlier plot")

    def interrupted(figure, path, **kwargs):
        with open(path, "w") as f:
            f.write("half")  # as a full disk or Ctrl-C mid-write leaves it
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", interrupted)
    with pytest.raises(KeyboardInterrupt):
        plot_switch(found, plot)
    assert plot.read_text() == "earlier plot" and [p.name for p in tmp_path.iterdir()] == ["switch.png"]
    with pytest.raises(ValueError, match="`path` .*switch.svg' names a .svg file, but the plot is a PNG"):
        plot_switch(found, tmp_path / "switch.svg")  # was PNG bytes under an SVG's name


def test_command_measures_models_whose_sample_size_is_a_pair(tiny_unet_kwargs, tmp_path):
    # diffusers takes sample_size=(8, 8) (saved as a list): the command failed on it (a TypeError, or `resolution`)
    shape = {**tiny_unet_kwargs, "in_channels": 1, "out_channels": 1, "sample_size": (8, 8)}
    torch.manual_seed(0)
    pipe = DualBackbonePipeline(shallow=UNet2DModel(**shape), deep=UNet2DModel(**shape), scheduler=DDPMScheduler())
    pipe.save_pretrained(tmp_path / "pipe")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((8, 8), 255, dtype=np.uint8)).save(tmp_path / "b.png")
    common = ["--pipeline", str(tmp_path / "pipe"), "--num_images", "4", "--num_levels", "3", "--plot"]
    for data in ("digits", str(tmp_path)):
        assert len(main([*common, str(tmp_path / "switch.png"), "--data", data]).levels) == 3
    for model in (pipe.shallow, pipe.deep):
        model.register_to_config(sample_size=[8, 16])
    pipe.save_pretrained(tmp_path / "wide")
    with pytest.raises(
        ValueError, match="measured on square images, but the deep model's `sample_size` is \\[8, 16\\]"
    ):
        main(["--pipeline", str(tmp_path / "wide"), "--plot", str(tmp_path / "switch.png")])
    for model in (pipe.shallow, pipe.deep):  # diffusers' UNet2DModel takes sample_size=None: was a TypeError
        model.register_to_config(sample_size=None)
    pipe.save_pretrained(tmp_path / "unsized")
    with pytest.raises(ValueError, match="the deep model's `sample_size` is None.*sample_size"):
        main(["--pipeline", str(tmp_path / "unsized"), "--plot", str(tmp_path / "switch.png")])


def test_the_errors_depend_on_the_seed_alone_for_models_left_in_training_mode(tiny_unet_kwargs):
    # a model just trained is in training mode: its dropout drew from the global random state at every call
    shape = {**tiny_unet_kwargs, "in_channels": 1, "out_channels": 1, "dropout": 0.5}
    torch.manual_seed(0)
    shallow, deep = UNet2DModel(**shape).train(), UNet2DModel(**shape).train()
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    first, again = (recommend_switch(shallow, deep, DDPMScheduler(), images, num_levels=3) for _ in range(2))
    assert torch.equal(first.deep_error, again.deep_error) and torch.equal(first.shallow_error, again.shallow_error)
    assert shallow.training and deep.training  # left as they were


def test_more_levels_than_training_timesteps_are_refused():
    # 25 levels over 10 timesteps measured most timesteps twice (and counted them twice in the shallow share)
    model = Analytic(DDPMScheduler(10), exact=False)
    with pytest.raises(ValueError, match="`num_levels`=25 exceeds the 10 training timesteps"):
        recommend_switch(model, model, DDPMScheduler(10), torch.zeros(2, 1, 8, 8), num_levels=25)
    assert len(recommend_switch(model, model, DDPMScheduler(10), torch.zeros(2, 1, 8, 8), num_levels=10).levels) == 10


def test_the_errors_do_not_depend_on_the_batch_size(tiny_unet_kwargs):
    # the noise was drawn batch by batch from one generator per level, and torch's CPU normal sampler draws
    # differently for tensors of other sizes: on 3x6x6 images another batch_size gave other noise and other errors
    shape = {**tiny_unet_kwargs, "sample_size": 6}
    torch.manual_seed(0)
    model = UNet2DModel(**{**shape, "down_block_types": ("DownBlock2D",) * 2, "up_block_types": ("UpBlock2D",) * 2})
    images = torch.rand(5, 3, 6, 6) * 2 - 1
    levels = torch.tensor([10, 500])
    whole = denoising_error(model, DDPMScheduler(), images, levels, batch_size=64)
    batched = denoising_error(model, DDPMScheduler(), images, levels, batch_size=2)
    torch.testing.assert_close(batched, whole)


def test_a_model_index_that_is_not_a_json_object_is_refused_naming_it(tmp_path):
    # a JSON list in model_index.json was an AttributeError ('list' object has no attribute 'get')
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="`--pipeline` .*model_index.json.* not a JSON object.*list"):
        main(["--pipeline", str(tmp_path / "pipe"), "--plot", str(tmp_path / "switch.png")])


@pytest.mark.parametrize("sample_size", [8.0, 0, -2, True, [8, 0], [8, 8, 8]])
def test_a_sample_size_no_images_can_have_is_refused_naming_it(sample_size, tiny_unet_kwargs, tmp_path):
    # a hostile saved config: a float, 0, a negative or a bool was a TypeError or torch's RuntimeError from the
    # resize, three sides were measured as 8x8 images
    shape = {**tiny_unet_kwargs, "in_channels": 1, "out_channels": 1}
    pipe = DualBackbonePipeline(shallow=UNet2DModel(**shape), deep=UNet2DModel(**shape), scheduler=DDPMScheduler())
    for model in (pipe.shallow, pipe.deep):
        model.register_to_config(sample_size=sample_size)
    pipe.save_pretrained(tmp_path / "pipe")
    with pytest.raises(ValueError, match=f"the deep model's `sample_size` is {re.escape(repr(sample_size))}"):
        main(["--pipeline", str(tmp_path / "pipe"), "--plot", str(tmp_path / "switch.png")])


@pytest.mark.parametrize(
    "shallow_kwargs, key",
    [({"in_channels": 3, "out_channels": 3}, "in_channels"), ({"num_class_embeds": 11}, "num_class_embeds")],
)
def test_command_refuses_shallow_and_deep_folders_no_pipeline_could_pair(
    shallow_kwargs, key, tiny_unet_kwargs, tmp_path
):
    # `--shallow`/`--deep` were measured unchecked: torch's RuntimeError on the channels, diffusers' "class_labels
    # should be provided", or a pair DualBackbonePipeline refuses measured silently (a 16 px shallow model at 8 px)
    shape = {**tiny_unet_kwargs, "in_channels": 1, "out_channels": 1}
    UNet2DModel(**shape).save_pretrained(tmp_path / "deep")
    UNet2DModel(**{**shape, **shallow_kwargs}).save_pretrained(tmp_path / "shallow")
    DDPMScheduler().save_pretrained(tmp_path / "scheduler")
    folders = [f"--{name}={tmp_path / name}" for name in ("shallow", "deep", "scheduler")]
    with pytest.raises(ValueError, match=f"`shallow` and `deep` must agree on `{key}`"):
        main([*folders, "--num_images", "4", "--num_levels", "3", "--plot", str(tmp_path / "switch.png")])


@pytest.mark.parametrize("sigmas", [(0.0, 80.0), (-1.0, 80.0), (80.0, 0.002), (1.0, 1.0), (0.002, math.inf)])
def test_an_edm_scheduler_without_a_range_of_noise_levels_is_refused_naming_it(sigmas):
    # a hostile saved scheduler: sigma_min <= 0 was "math domain error", swapped or equal ends measured levels from
    # high to low (the switch walked the wrong end) or one level repeated
    from diffusers import EDMEulerScheduler

    from diffusers_stages.switch import noise_levels

    sigma_min, sigma_max = sigmas
    scheduler = EDMEulerScheduler(sigma_min=sigma_min, sigma_max=sigma_max)
    with pytest.raises(ValueError, match=f"`sigma_min` {sigma_min!r} and `sigma_max` {sigma_max!r}"):
        noise_levels(scheduler, 5)


@pytest.mark.parametrize("broken", ["shallow", "deep"])
def test_a_model_whose_error_is_not_finite_is_refused_naming_it(broken, tiny_unet_kwargs):
    # NaN weights (a hostile or diverged checkpoint) gave NaN errors, read as "the shallow model is worse even at the
    # noisiest level" (or, for a broken shallow model, a switch above its NaN levels)
    shape = {**tiny_unet_kwargs, "in_channels": 1, "out_channels": 1}
    models = {"shallow": UNet2DModel(**shape), "deep": UNet2DModel(**shape)}
    with torch.no_grad():
        models[broken].conv_out.bias.fill_(math.nan)
    with pytest.raises(ValueError, match=f"`{broken}` gives a non-finite denoising error"):
        recommend_switch(models["shallow"], models["deep"], DDPMScheduler(), torch.zeros(4, 1, 8, 8), num_levels=3)


def test_recommend_switch_refuses_models_no_pipeline_could_pair(tiny_unet_kwargs):
    # the Python API measured them unchecked too: torch's RuntimeError on the channels
    shape = {**tiny_unet_kwargs, "in_channels": 1, "out_channels": 1}
    shallow = UNet2DModel(**{**shape, "in_channels": 3, "out_channels": 3})
    with pytest.raises(ValueError, match="`shallow` and `deep` must agree on `in_channels`"):
        recommend_switch(shallow, UNet2DModel(**shape), DDPMScheduler(), torch.zeros(4, 1, 8, 8), num_levels=3)


def test_command_refuses_a_pipeline_that_is_a_file_naming_the_option(tmp_path):
    # diffusers' `load_config` reads a file path as the config itself, so a model_index.json passed as `--pipeline`
    # passed the check and failed in huggingface_hub ("Repo id must be in the form ..."), naming no option
    (tmp_path / "model_index.json").write_text('{"_class_name": "DualBackbonePipeline"}')
    with pytest.raises(ValueError, match="`--pipeline` .*model_index.json' is a file, not a saved pipeline folder"):
        main(["--pipeline", str(tmp_path / "model_index.json"), "--plot", str(tmp_path / "switch.png")])


@pytest.mark.parametrize("edm", [False, True])
def test_command_reports_the_split_of_steps_the_pipeline_then_samples(
    edm, tiny_unet_kwargs, tmp_path, capsys, monkeypatch
):
    # the command reported the shallow model's share of the measured levels, and a speed-up "for evenly spread
    # steps": with EDM's Karras grid the sampler runs the shallow model on more steps than that share (at 25 log-spaced
    # levels, a switch at sigma 2.34 holds 36% of the levels and 50% of EDMEulerScheduler's 50 steps)
    from diffusers import EDMEulerScheduler

    import diffusers_stages.switch as switch

    shape = {**tiny_unet_kwargs, "in_channels": 1, "out_channels": 1}
    deep, shallow = UNet2DModel(**shape), UNet2DModel(**{**shape, "block_out_channels": (4, 8)})
    scheduler = EDMEulerScheduler() if edm else DDPMScheduler()
    DualBackbonePipeline(shallow=shallow, deep=deep, scheduler=scheduler).save_pretrained(tmp_path / "pipe")

    def error(model, scheduler, images, levels, **kwargs):  # the shallow model is good on the noisiest 9 of 25 levels
        good = torch.arange(len(levels)) >= len(levels) - 9
        is_shallow = model.config.block_out_channels[0] == 4
        return torch.where(good | (not is_shallow), 1.0, 2.0).double()

    monkeypatch.setattr(switch, "denoising_error", error)
    argv = ["--pipeline", str(tmp_path / "pipe"), "--num_images", "4", "--num_inference_steps", "50"]
    found = main([*argv, "--plot", str(tmp_path / "switch.png")])
    printed = capsys.readouterr().out
    pipe = DualBackbonePipeline.from_pretrained(tmp_path / "pipe", **found.pipeline_kwargs())
    calls = [stage for _, stage in pipe.expert_schedule(50)]
    assert (
        f"and on {sum(calls)} of the {len(calls)} model calls of 50 steps of {type(pipe.scheduler).__name__}"
        in printed
    )
    assert found.shallow_share() == 9 / 25
    if edm:
        assert sum(calls) / len(calls) >= 0.5  # not the 36% of the levels


def test_command_refuses_a_step_count_its_scheduler_cannot_sample_before_measuring(
    tiny_unet_kwargs, tmp_path, monkeypatch
):
    import diffusers_stages.switch as switch

    shape = {**tiny_unet_kwargs, "in_channels": 1, "out_channels": 1}
    scheduler = DDPMScheduler(num_train_timesteps=10)
    DualBackbonePipeline(shallow=UNet2DModel(**shape), deep=UNet2DModel(**shape), scheduler=scheduler).save_pretrained(
        tmp_path / "pipe"
    )
    monkeypatch.setattr(switch, "denoising_error", lambda *args, **kwargs: pytest.fail("measured"))
    with pytest.raises(ValueError, match="`num_inference_steps`: 50 cannot be larger"):
        main(["--pipeline", str(tmp_path / "pipe"), "--num_levels", "3", "--plot", str(tmp_path / "switch.png")])


@pytest.mark.parametrize("backbone", ["shallow", "deep"])
def test_a_one_backbone_run_given_as_pipeline_says_how_to_pass_it(tiny_unet_kwargs, tmp_path, backbone):
    """`train_dual_backbone.py --backbones shallow` saves `<run>/shallow/` and `<run>/scheduler/` (no
    model_index.json); given as `--pipeline`, the error said only that model_index.json is missing."""
    run = tmp_path / "run"
    UNet2DModel(**tiny_unet_kwargs).save_pretrained(run / backbone)
    DDPMScheduler().save_pretrained(run / "scheduler")
    with pytest.raises(ValueError, match="is not a saved pipeline folder") as error:
        main(["--pipeline", str(run)])
    assert f"a one-backbone run ({backbone}/): give `--{backbone} {run / backbone}`" in str(error.value)
    assert f"`--scheduler {run / 'scheduler'}`" in str(error.value)


@pytest.mark.parametrize("option", ["--pipeline", "--shallow", "--deep", "--scheduler", "--vae"])
def test_an_empty_folder_option_is_refused_naming_it(option, tiny_unet_kwargs, tmp_path, monkeypatch):
    # an empty path was taken as not given: `--vae ''` was ignored in silence, `--pipeline ''` (or `--shallow ''`)
    # asked to give the option that was given; run from a model folder, `''` read that folder
    shape = {**tiny_unet_kwargs, "in_channels": 1, "out_channels": 1}
    UNet2DModel(**shape).save_pretrained(tmp_path)  # the current folder: a model folder
    DDPMScheduler().save_pretrained(tmp_path)
    monkeypatch.chdir(tmp_path)
    folders = {"--shallow": str(tmp_path), "--deep": str(tmp_path), "--scheduler": str(tmp_path)}
    argv = [option, ""] if option == "--pipeline" else [*sum({**folders, option: ""}.items(), ())]
    with pytest.raises(ValueError, match=f"`{option}` must name a folder, got ''"):
        main([*argv, "--num_images", "4", "--num_levels", "3", "--num_inference_steps", "2", "--plot", "s.png"])


@pytest.mark.parametrize("given", ["./my-dual", "{root}/my-dual", "runs/2026/my-dual"])
def test_a_missing_local_pipeline_folder_is_named_as_such_not_as_an_offline_hub_error(given, tmp_path, monkeypatch):
    # was: "`--pipeline` './my-dual' is not a saved pipeline folder (model_index.json): We couldn't connect to
    # 'https://huggingface.co' to load this model ... Checkout your internet connection", for a mistyped path
    monkeypatch.chdir(tmp_path)
    given = given.format(root=tmp_path)
    with pytest.raises(ValueError, match="is not a saved pipeline folder") as error:
        main(["--pipeline", given, "--plot", str(tmp_path / "switch.png")])
    message = str(error.value)
    assert (
        f"`--pipeline` {given!r} is not a saved pipeline folder: no such folder" in message
        and "huggingface.co" not in message
    )
