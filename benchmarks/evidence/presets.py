"""Benchmark sizes: ``quick`` (digits, < 10 min on 2 CPU cores), ``default`` (Fashion-MNIST, < 1 hour on 2 CPU
cores) and ``gpu`` (Fashion-MNIST, larger models and budgets, for one GPU)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Preset:
    """Every size and budget of one benchmark run (written into the results for reproducibility)."""

    name: str
    dataset: str
    # the baseline U-Net (comparison 1's baseline, comparison 2's large model, comparison 3's deep model)
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    norm_num_groups: int
    attention_head_dim: int
    # training: the FLOP budget B is what `budget_steps` steps of the baseline cost
    batch_size: int
    budget_steps: int
    learning_rate: float
    snapshot_fractions: tuple[float, ...]
    # evaluation
    num_eval_samples: int
    num_reference_images: int  # training images the generated sets are compared with
    num_inference_steps: int
    timing_batch: int
    timing_repeats: int
    # comparison 1: stage planning (Zhang et al., Algorithm 1) on a subset of the training images
    plan_alpha: float
    plan_eta: float
    plan_num_samples: int
    plan_max_images: int
    # comparison 2: MEME experts (4, uniform intervals), each with 1/4 of the budget
    expert_width_scale: float
    # comparison 3: DuoDiff's shallow model takes `shallow_budget_fraction` of the budget; the deep model the rest
    shallow_block_out_channels: tuple[int, ...]
    shallow_budget_fraction: float
    switch_fractions: tuple[float, ...]
    # comparison 3: the early-exit baseline (U-ViT with an exit per block), trained on the whole budget
    early_exit_hidden_size: int
    early_exit_layers: int
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    "quick": Preset(
        name="quick",
        dataset="digits",
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
        batch_size=64,
        budget_steps=120,
        learning_rate=2e-3,
        snapshot_fractions=(0.25, 0.5, 0.75, 1.0),
        num_eval_samples=500,
        num_reference_images=1437,
        num_inference_steps=10,
        timing_batch=50,
        timing_repeats=3,
        plan_alpha=0.9,
        plan_eta=0.1,
        plan_num_samples=32,
        plan_max_images=2000,
        expert_width_scale=0.5,
        shallow_block_out_channels=(16, 32),
        shallow_budget_fraction=0.25,
        switch_fractions=(0.25, 0.5, 0.75),
        early_exit_hidden_size=64,
        early_exit_layers=7,
    ),
    # default: a baseline step (32x32, batch 64) took 2.0 s on one CPU thread here, and the methods train about
    # 4.25 budgets in all, so B = 250 steps (600 would take about 1.5 h); measured: 55.7 min end to end on 2 cores
    # that were shared with other work
    "default": Preset(
        name="default",
        dataset="fashion-mnist",
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
        batch_size=64,
        budget_steps=250,
        learning_rate=1e-3,
        snapshot_fractions=(0.25, 0.5, 0.75, 1.0),
        num_eval_samples=1000,
        num_reference_images=10000,
        num_inference_steps=10,
        timing_batch=50,
        timing_repeats=3,
        plan_alpha=0.9,
        plan_eta=0.1,
        plan_num_samples=32,
        plan_max_images=4000,
        expert_width_scale=0.5,
        shallow_block_out_channels=(16, 32, 32),
        shallow_budget_fraction=0.25,
        switch_fractions=(0.25, 0.5, 0.75),
        early_exit_hidden_size=96,
        early_exit_layers=7,
    ),
    "gpu": Preset(
        name="gpu",
        dataset="fashion-mnist",
        block_out_channels=(64, 128, 256),
        layers_per_block=2,
        norm_num_groups=32,
        attention_head_dim=32,
        batch_size=128,
        budget_steps=20000,
        learning_rate=2e-4,
        snapshot_fractions=(0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0),
        num_eval_samples=10000,
        num_reference_images=60000,
        num_inference_steps=50,
        timing_batch=256,
        timing_repeats=10,
        plan_alpha=0.9,
        plan_eta=0.1,
        plan_num_samples=64,
        plan_max_images=60000,
        expert_width_scale=0.5,
        shallow_block_out_channels=(32, 64, 128),
        shallow_budget_fraction=0.25,
        switch_fractions=(0.25, 0.5, 0.75),
        early_exit_hidden_size=256,
        early_exit_layers=13,
    ),
}


def get_preset(name: str, **overrides) -> Preset:
    """A preset by name, with fields overridden (e.g. ``budget_steps=4`` for a smoke test)."""
    if name not in PRESETS:
        raise ValueError(f"`preset` must be one of {sorted(PRESETS)}, got {name!r}.")
    return replace(PRESETS[name], **overrides)
