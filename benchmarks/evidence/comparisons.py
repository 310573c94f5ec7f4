"""The three comparisons of issue 7, each at equal training compute (one FLOP budget B) and then at equal quality.

1. `UNet2DModel` vs `MultiStageUNet2DModel` with planned boundaries and tailored decoders (Zhang et al., CVPR 2024).
2. One large model vs 4 experts of different architectures over uniform intervals (MEME, Lee et al., AAAI 2024).
3. Deep only vs dual backbone at several switch points (DuoDiff) [vs early exit, when the package provides it].

The baseline U-Net is trained once and reused: it is comparison 1's baseline, comparison 2's large model and
comparison 3's deep-only model, and its 1 - f snapshot is DuoDiff's deep model (the shallow one gets the other f).
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from diffusers import DDPMScheduler, UNet2DModel

from diffusers_stages import (
    DualBackbonePipeline,
    ExpertRoutingModel,
    ExpertRoutingPipeline,
    IUNet2DModel,
    MultiStagePipeline,
    MultiStageUNet2DModel,
    TimestepPartition,
)
from diffusers_stages.conventions import DEFAULT_STAGE_BOUNDARIES
from diffusers_stages.models.early_exit import EarlyExitUViT2DModel, early_exit_loss
from diffusers_stages.models.meme import attention_share, build_meme_experts
from diffusers_stages.planning import NoiseSchedule, plan_stages, suggest_decoder_widths
from diffusers_stages.timestep_sampling import soft_assignment_timesteps, stratified_timesteps

from .data import NUM_CLASSES, load_images
from .flops import count_flops, sampling_flops_per_image
from .metric import Evaluator, real_image_floor, train_classifier
from .presets import Preset
from .sampling import balanced_labels, generate, sampling_scheduler, seconds_per_image, single_model_pipeline
from .training import train_with_budget, uniform_timesteps

PAPER_DECODER_DIFFICULTY = (1.0, (1.0 - 0.125) / (1.5 - 0.125), 0.0)  # -> decoder widths x1.5, x1, x0.125


def unet_config(preset: Preset, sample_size: int, block_out_channels, attention: str = "last") -> dict:
    """A class-conditional `UNet2DModel` config of ``preset`` on ``sample_size`` px single-channel images;
    ``attention`` = "last" (lowest resolution), "all" or "none"."""
    n = len(block_out_channels)
    use = {"last": [i == n - 1 for i in range(n)], "all": [True] * n, "none": [False] * n}[attention]
    return dict(
        sample_size=sample_size,
        in_channels=1,
        out_channels=1,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=preset.layers_per_block,
        norm_num_groups=preset.norm_num_groups,
        attention_head_dim=preset.attention_head_dim,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in use),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(use)),
        num_class_embeds=NUM_CLASSES + 1,  # the last one is the pipelines' unconditional label
    )


def meme_expert_models(preset: Preset, sample_size: int) -> list[IUNet2DModel]:
    """MEME's four iU-Net experts from the package's builder (clean end first: the share of each mixer's channels
    given to self-attention rises toward the noise end), each ``expert_width_scale`` times the large model's width
    (`benchmarks/bench_experts.py` times the same models)."""
    p = preset
    widths = tuple(
        max(p.norm_num_groups, round(w * p.expert_width_scale / p.norm_num_groups) * p.norm_num_groups)
        for w in p.block_out_channels
    )
    torch.manual_seed(p.seed)
    return build_meme_experts(
        num_experts=4,
        sample_size=sample_size,
        in_channels=1,
        block_out_channels=widths,
        layers_per_block=p.layers_per_block,
        attention_head_dim=p.attention_head_dim,
        norm_num_groups=p.norm_num_groups,
        num_class_embeds=NUM_CLASSES + 1,
    )


@dataclass
class Result:
    """One row of the results table: a method, its training compute, its quality and its sampling cost."""

    comparison: str
    method: str
    train_flops: float
    budget_fraction: float
    fd: float
    accuracy: float
    params: int
    seconds_per_image: float | None = None
    sampling_gflops_per_image: float | None = None
    notes: str = ""
    seconds_per_image_repeats: list[float] | None = None  # each timed run's (the median is `seconds_per_image`)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Context:
    """What every comparison shares: the preset, the data, the metric, the FLOP budget and the baseline."""

    preset: Preset
    device: torch.device
    cache_dir: str
    log: callable = print
    images: torch.Tensor = field(init=False)
    labels: torch.Tensor = field(init=False)
    evaluator: Evaluator = field(init=False)
    budget: float = field(init=False)
    reference: dict = field(init=False)
    baseline_snapshots: list = field(init=False, default_factory=list)
    fd_seed_spread: float = field(init=False, default=0.0)

    def __post_init__(self):
        p = self.preset
        self.started, print_line = time.perf_counter(), self.log
        self.log = lambda line: print_line(f"{time.perf_counter() - self.started:7.1f}s {line}")
        self.images, self.labels = load_images(p.dataset, "train", seed=p.seed)
        test_images, test_labels = load_images(p.dataset, "test", seed=p.seed)
        classifier = train_classifier(p.dataset, self.cache_dir, seed=p.seed)
        reference = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(p.seed))
        self.evaluator = Evaluator(classifier, self.images[reference[: p.num_reference_images]])
        # the metric's floor: held-out real images at the generated sets' count (extrapolated when fewer are held out)
        self.reference = real_image_floor(self.evaluator, test_images, test_labels, p.num_eval_samples, seed=p.seed)
        self.log(
            f"[metric] held-out real images: FD-classifier {self.reference['fd']:.2f}, "
            f"accuracy {self.reference['accuracy']:.3f}"
        )
        flops, _ = count_flops(lambda: self._baseline_step(self.unet(p.block_out_channels)))
        self.budget = float(p.budget_steps * flops)
        self.log(f"[budget] B = {p.budget_steps} baseline steps = {self.budget / 1e12:.3f} TFLOPs")

    def _baseline_step(self, model):
        x = self.images[: self.preset.batch_size]
        t = torch.zeros(len(x), dtype=torch.long)
        y = self.labels[: len(x)]
        model(x, t, class_labels=y).sample.pow(2).mean().backward()

    # ---------------------------------------------------------------------------------------------------------
    def unet_config(self, block_out_channels, attention: str = "last") -> dict:
        """A class-conditional `UNet2DModel` config at this context's image size (see `unet_config`)."""
        return unet_config(self.preset, self.images.shape[-1], block_out_channels, attention)

    def unet(self, block_out_channels, attention: str = "last") -> UNet2DModel:
        torch.manual_seed(self.preset.seed)
        return UNet2DModel(**self.unet_config(block_out_channels, attention))

    def train(self, model, sample_timesteps, budget: float, fractions=(1.0,), seed_offset: int = 0, **kwargs):
        p = self.preset
        snapshots = train_with_budget(
            model.to(self.device),
            self.images,
            self.labels,
            budget,
            sample_timesteps,
            p.batch_size,
            p.learning_rate,
            p.seed + seed_offset,
            fractions,
            DDPMScheduler(),
            **kwargs,
        )
        last = snapshots[-1]
        self.log(
            f"[train] {type(model).__name__} ({_params(model) / 1e6:.2f}M): {last.steps} steps, "
            f"{last.flops / 1e12:.3f} TFLOPs"
        )
        return snapshots

    def score(self, pipeline, num_inference_steps: int | None = None, seed_offset: int = 0) -> dict:
        p = self.preset
        images, labels = generate(
            pipeline.to(self.device),
            p.num_eval_samples,
            num_inference_steps or p.num_inference_steps,
            seed=p.seed + seed_offset,
        )
        return self.evaluator.score(images, labels)

    def timing(self, pipelines: dict, num_inference_steps: int | None = None) -> dict:
        p = self.preset
        steps = num_inference_steps or p.num_inference_steps
        pipelines = {name: pipe.to(self.device) for name, pipe in pipelines.items()}
        repeats = seconds_per_image(pipelines, steps, p.timing_batch, p.timing_repeats)
        seconds = {name: statistics.median(values) for name, values in repeats.items()}
        self.log(f"[timing] median {seconds}, repeats {repeats}")
        labels = balanced_labels(p.timing_batch).tolist()  # the timed batch (its first run's noise): mean per image
        gflops = {name: sampling_flops_per_image(pipe, steps, labels) / 1e9 for name, pipe in pipelines.items()}
        return {name: (seconds[name], gflops[name], repeats[name]) for name in pipelines}


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _load(model, snapshot):
    model.load_state_dict(snapshot.state_dict)
    return model.eval()


def _timed(results: list[Result], timings: dict) -> list[Result]:
    for result in results:
        if result.method in timings:
            timing = timings[result.method]  # median, GFLOPs, each repeat's seconds
            result.seconds_per_image, result.sampling_gflops_per_image, result.seconds_per_image_repeats = timing
    return results


# -------------------------------------------------------------------------------------------------------------
def train_baseline(ctx: Context) -> list[Result]:
    """The `UNet2DModel` baseline, trained once on the whole budget; scored at every snapshot."""
    p = ctx.preset
    fractions = sorted({*p.snapshot_fractions, 1.0 - p.shallow_budget_fraction})
    ctx.baseline_snapshots = ctx.train(ctx.unet(p.block_out_channels), uniform_timesteps(), ctx.budget, fractions)
    results = []
    for snap in ctx.baseline_snapshots:
        pipe = single_model_pipeline(_load(ctx.unet(p.block_out_channels), snap))
        scores = ctx.score(pipe)
        results.append(
            Result(
                "1",
                "UNet2DModel",
                snap.flops,
                snap.fraction,
                scores["fd"],
                scores["accuracy"],
                _params(pipe.experts),
                notes=f"{snap.steps} steps",
            )
        )
        ctx.log(f"[baseline] {snap.fraction:.3f} B ({snap.steps} steps): {scores}")
    # how much the score moves with the sampling seed alone: differences below this are noise
    again = ctx.score(baseline_pipeline(ctx), seed_offset=1)
    ctx.fd_seed_spread = abs(again["fd"] - results[-1].fd)
    ctx.log(
        f"[baseline] FD-classifier with another sampling seed: {again['fd']:.2f} (spread {ctx.fd_seed_spread:.2f})"
    )
    return results


def baseline_pipeline(ctx: Context, fraction: float = 1.0):
    snap = next(s for s in ctx.baseline_snapshots if abs(s.fraction - fraction) < 1e-9)
    return single_model_pipeline(_load(ctx.unet(ctx.preset.block_out_channels), snap))


def plan_partition(ctx: Context) -> tuple[TimestepPartition, str]:
    """Stage boundaries from the optimal-denoiser plan (Zhang et al., Algorithm 1) on the training images; the
    paper's CIFAR-10 boundaries if the plan fails at these thresholds."""
    p = ctx.preset
    schedule = NoiseSchedule.from_scheduler(DDPMScheduler(), 100)
    subset = ctx.images[
        torch.randperm(len(ctx.images), generator=torch.Generator().manual_seed(p.seed))[: p.plan_max_images]
    ]
    try:
        plan = plan_stages(
            subset,
            schedule,
            3,
            alpha=p.plan_alpha,
            eta=p.plan_eta,
            num_samples=p.plan_num_samples,
            generator=torch.Generator().manual_seed(p.seed),
        )
        return plan.partition, f"optimal-denoiser plan (alpha={p.plan_alpha}, eta={p.plan_eta})"
    except ValueError as error:
        ctx.log(f"[plan] failed ({error}); using the paper's CIFAR-10 boundaries")
        return TimestepPartition(DEFAULT_STAGE_BOUNDARIES), "paper's CIFAR-10 boundaries (plan failed)"


def compare_multistage(ctx: Context, baseline: Result) -> list[Result]:
    """Comparison 1: baseline vs multi-stage multi-decoder U-Net, same budget, stage-stratified batches (the
    baseline's final row gets its sampling time from the same timing group)."""
    p = ctx.preset
    partition, origin = plan_partition(ctx)
    decoders = suggest_decoder_widths(p.block_out_channels, PAPER_DECODER_DIFFICULTY, p.norm_num_groups)
    ctx.log(f"[multistage] boundaries {list(partition.boundaries)} ({origin}); decoders {decoders}")

    def build():
        torch.manual_seed(p.seed)
        return MultiStageUNet2DModel(
            **ctx.unet_config(p.block_out_channels), **partition.to_config(), decoder_block_out_channels=decoders
        )

    snapshots = ctx.train(
        build(), lambda n, g: stratified_timesteps(partition, n, generator=g)[0], ctx.budget, p.snapshot_fractions
    )
    results, name = [], "MultiStageUNet2DModel"
    for snap in snapshots:
        pipe = MultiStagePipeline(unet=_load(build(), snap), scheduler=sampling_scheduler())
        pipe.set_progress_bar_config(disable=True)
        scores = ctx.score(pipe)
        note = f"{snap.steps} steps; boundaries {[round(b) for b in partition.boundaries]} ({origin}); decoders {decoders}"
        results.append(
            Result(
                "1", name, snap.flops, snap.fraction, scores["fd"], scores["accuracy"], _params(pipe.unet), notes=note
            )
        )
        ctx.log(f"[multistage] {snap.fraction:.3f} B ({snap.steps} steps): {scores}")
    _timed([baseline, *results], ctx.timing({"UNet2DModel": baseline_pipeline(ctx), name: pipe}))
    return results


def meme_experts(ctx: Context) -> list[IUNet2DModel]:
    """MEME's four iU-Net experts of the context's preset (see `meme_expert_models`)."""
    return meme_expert_models(ctx.preset, ctx.images.shape[-1])


def compare_experts(ctx: Context, large: Result) -> list[Result]:
    """Comparison 2: one large model vs 4 experts; each expert trained on B/4 with MEME's soft assignment."""
    partition = TimestepPartition.uniform(4)
    experts, used = [], 0.0
    for i, expert in enumerate(meme_experts(ctx)):
        (snap,) = ctx.train(
            expert,
            lambda n, g, i=i: soft_assignment_timesteps(partition, i, n, generator=g),
            ctx.budget / 4,
            seed_offset=i + 1,
        )
        experts.append(_load(expert, snap))
        used += snap.flops
    pipe = ExpertRoutingPipeline(
        experts=ExpertRoutingModel(experts, **partition.to_config()), scheduler=sampling_scheduler()
    )
    pipe.set_progress_bar_config(disable=True)
    scores = ctx.score(pipe)
    ctx.log(f"[meme] 4 experts: {scores}")
    name = "MEME 4 experts"
    results = [
        Result(
            "2", "UNet2DModel", large.train_flops, 1.0, large.fd, large.accuracy, large.params, notes="the large model"
        ),
        Result(
            "2",
            name,
            used,
            used / ctx.budget,
            scores["fd"],
            scores["accuracy"],
            _params(pipe.experts),
            notes=f"widths {tuple(experts[0].config.block_out_channels)}; attention shares "
            f"{[round(attention_share(e), 2) for e in experts]} of mixer channels (clean first); soft assignment p=(0.8,0.4,0.2,0.1)",
        ),
    ]
    return _timed(results, ctx.timing({"UNet2DModel": baseline_pipeline(ctx), name: pipe}))


def compare_dual_backbone(ctx: Context, deep_only: Result) -> list[Result]:
    """Comparison 3: deep only (budget B) vs DuoDiff: deep model at (1 - f) B + shallow model at f B."""
    p = ctx.preset
    f = p.shallow_budget_fraction
    shallow = ctx.unet(p.shallow_block_out_channels)
    (snap,) = ctx.train(shallow, uniform_timesteps(), f * ctx.budget, seed_offset=10)
    shallow = _load(shallow, snap)
    deep_snap = next(s for s in ctx.baseline_snapshots if abs(s.fraction - (1 - f)) < 1e-9)
    deep = _load(ctx.unet(p.block_out_channels), deep_snap)
    total = deep_snap.flops + snap.flops
    results = [
        Result(
            "3",
            "UNet2DModel",
            deep_only.train_flops,
            1.0,
            deep_only.fd,
            deep_only.accuracy,
            deep_only.params,
            notes="deep only",
        )
    ]
    pipelines = {"UNet2DModel": baseline_pipeline(ctx)}
    shallow_pipe = single_model_pipeline(shallow)
    scores = ctx.score(shallow_pipe)
    results.append(
        Result(
            "3",
            "shallow only",
            snap.flops,
            snap.flops / ctx.budget,
            scores["fd"],
            scores["accuracy"],
            _params(shallow),
            notes=f"widths {p.shallow_block_out_channels}",
        )
    )
    pipelines["shallow only"] = shallow_pipe
    for switch in p.switch_fractions:
        pipe = DualBackbonePipeline(
            shallow=shallow, deep=deep, scheduler=sampling_scheduler(), switch_step_fraction=switch
        )
        pipe.set_progress_bar_config(disable=True)
        scores = ctx.score(pipe)
        name = f"DuoDiff switch {switch:g}"
        ctx.log(f"[duodiff] {name}: {scores}")
        results.append(
            Result(
                "3",
                name,
                total,
                total / ctx.budget,
                scores["fd"],
                scores["accuracy"],
                _params(shallow) + _params(deep),
                notes=f"shallow runs the first {switch:.0%} of steps; deep = baseline at {1 - f:g} B",
            )
        )
        pipelines[name] = pipe
    early_results, early_pipelines = early_exit_runs(ctx)
    return _timed(results + early_results, ctx.timing({**pipelines, **early_pipelines}))


def _early_exit_loss(model, noise_scheduler, clean, timesteps, noise, class_labels):
    # AdaDiff: every exit's denoising MSE plus its uncertainty estimate's error, on x_t of Ho et al. eq. 4
    return early_exit_loss(model, noise_scheduler.add_noise(clean, noise, timesteps), timesteps, noise, class_labels)


@torch.no_grad()
def exit_thresholds(ctx: Context, model: EarlyExitUViT2DModel, quantiles=(0.25, 0.5)) -> list[float]:
    """Exit thresholds calibrated on training images: quantiles of the mean uncertainty of every exit over a grid of
    10 noise levels (a threshold below every estimate never exits early; above every one always exits at once)."""
    generator = torch.Generator().manual_seed(ctx.preset.seed)
    clean, labels = ctx.images[:64].to(ctx.device), ctx.labels[:64].to(ctx.device)
    values = []
    for t in torch.linspace(0, 999, 10).long():
        timesteps = torch.full((len(clean),), int(t), device=ctx.device)
        noisy = DDPMScheduler().add_noise(
            clean, torch.randn(clean.shape, generator=generator).to(ctx.device), timesteps
        )
        values += [float(u.mean()) for u in model(noisy, timesteps, class_labels=labels, return_all_exits=True)[1]]
    return torch.quantile(torch.tensor(values), torch.tensor(quantiles)).tolist()


def early_exit_runs(ctx: Context) -> tuple[list[Result], dict]:
    """The early-exit baseline (AdaDiff-style U-ViT with an exit head per block), trained on the whole budget B:
    full depth, and exiting at calibrated uncertainty thresholds."""
    p = ctx.preset
    torch.manual_seed(p.seed)
    model = EarlyExitUViT2DModel(
        sample_size=ctx.images.shape[-1],
        in_channels=1,
        patch_size=2,
        hidden_size=p.early_exit_hidden_size,
        num_layers=p.early_exit_layers,
        num_attention_heads=4,
        num_class_embeds=NUM_CLASSES + 1,
    )
    (snap,) = ctx.train(model, uniform_timesteps(), ctx.budget, seed_offset=20, loss_function=_early_exit_loss)
    model = _load(model, snap)
    results, pipelines = [], {}
    for threshold in [None, *exit_thresholds(ctx, model)]:
        variant = copy.deepcopy(model)
        variant.exit_threshold = threshold
        pipe = single_model_pipeline(variant)
        scores = ctx.score(pipe)
        name = "early exit, full depth" if threshold is None else f"early exit, threshold {threshold:.3f}"
        ctx.log(f"[early exit] {name}: {scores}")
        results.append(
            Result(
                "3",
                name,
                snap.flops,
                snap.flops / ctx.budget,
                scores["fd"],
                scores["accuracy"],
                _params(model),
                notes=f"U-ViT, {p.early_exit_layers} blocks, width {p.early_exit_hidden_size}, {snap.steps} steps",
            )
        )
        pipelines[name] = pipe
    return results, pipelines
