"""A training loop that stops at a FLOP budget, with snapshots at fractions of it (quality vs training compute)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler

from diffusers_stages.training import diffusion_loss

from .flops import count_flops

# (batch_size, generator) -> training timesteps of one batch
TimestepSampler = Callable[[int, torch.Generator], torch.Tensor]
# (model, noise_scheduler, clean, timesteps, noise, class_labels) -> loss per sample, or its mean
LossFunction = Callable[..., torch.Tensor]


def denoising_loss(model, noise_scheduler, clean, timesteps, noise, class_labels) -> torch.Tensor:
    """The package's `diffusion_loss` (epsilon-prediction MSE for a DDPM schedule)."""
    return diffusion_loss(model, noise_scheduler, clean, timesteps, noise=noise, class_labels=class_labels)


def uniform_timesteps(num_train_timesteps: int = 1000) -> TimestepSampler:
    """The usual DDPM draw, ``t ~ U{0, ..., T-1}`` (Ho et al. 2020, Algorithm 1)."""
    return lambda batch_size, generator: torch.randint(0, num_train_timesteps, (batch_size,), generator=generator)


@dataclass
class Snapshot:
    """The weights after ``flops`` training FLOPs (``fraction`` of the budget, ``steps`` optimiser steps)."""

    fraction: float
    flops: int
    steps: int
    state_dict: dict[str, torch.Tensor]


def train_with_budget(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    budget_flops: float,
    sample_timesteps: TimestepSampler,
    batch_size: int,
    learning_rate: float,
    seed: int,
    snapshot_fractions: Sequence[float] = (1.0,),
    noise_scheduler: DDPMScheduler | None = None,
    warmup_fraction: float = 0.05,
    count_every: int = 20,
    loss_function: LossFunction = denoising_loss,
) -> list[Snapshot]:
    """
    Train ``model`` (epsilon-prediction, class-conditional) until its forward+backward FLOPs reach ``budget_flops``;
    return a [`Snapshot`] each time a fraction of the budget is crossed.

    FLOPs are counted exactly on the first step and every ``count_every``-th step (counting slows a step down about
    2x on CPU); the other steps are charged the mean of the counted ones. A step's cost is fixed for a U-Net and
    varies by at most a sample per stage for the stage-stratified multi-stage batches.

    The loss is the package's `diffusion_loss` unless ``loss_function`` says otherwise (the early-exit model's
    loss); ``sample_timesteps`` decides which noise levels the model sees (uniform, stage-stratified, or MEME's soft
    assignment).
    """
    if budget_flops <= 0:
        raise ValueError(f"`budget_flops` must be positive, got {budget_flops}.")
    if not snapshot_fractions or any(not 0 < f <= 1 for f in snapshot_fractions):
        raise ValueError(f"`snapshot_fractions` must be fractions in (0, 1], got {list(snapshot_fractions)}.")
    noise_scheduler = noise_scheduler or DDPMScheduler()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    warmup_steps = [1]  # set from the first step's FLOPs: a share of the steps the budget allows
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup_steps[0]))
    pending, snapshots, used, step, counted = sorted(snapshot_fractions), [], 0, 0, []
    model.train()
    while pending:
        # 1. one batch: data, noise levels and noise, all drawn from the seeded CPU generator
        index = torch.randint(len(images), (batch_size,), generator=generator)
        timesteps = sample_timesteps(batch_size, generator).to(device)
        clean, class_labels = images[index].to(device), labels[index].to(device)
        noise = torch.randn(clean.shape, generator=generator).to(device)

        # 2. loss and gradients, counted (FLOPs of forward and backward)
        def loss_and_backward(batch=(clean, timesteps, noise, class_labels)):
            loss_function(model, noise_scheduler, *batch).mean().backward()

        if step % count_every == 0:
            counted.append(count_flops(loss_and_backward)[0])
            flops = counted[-1]
            if step == 0:
                warmup_steps[0] = max(1, round(warmup_fraction * budget_flops / flops))
                for group in optimizer.param_groups:  # the first step too runs at the warm-up rate
                    group["lr"] = learning_rate / warmup_steps[0]
        else:
            loss_and_backward()
            flops = sum(counted) / len(counted)
        optimizer.step()
        warmup.step()
        optimizer.zero_grad(set_to_none=True)
        used, step = used + flops, step + 1

        # 3. snapshots at the fractions of the budget just crossed
        while pending and used >= pending[0] * budget_flops:
            state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            snapshots.append(Snapshot(pending.pop(0), int(used), step, state))
    model.eval()
    return snapshots
