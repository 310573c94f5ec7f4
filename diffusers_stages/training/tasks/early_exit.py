"""The early-exit baseline (AdaDiff, Tang et al. 2023; DuoDiff's comparison): one U-ViT with an exit head and an
uncertainty estimate after every block, trained on every timestep with every exit's loss."""

from __future__ import annotations

import torch

from ...models.early_exit import EarlyExitUViT2DModel, early_exit_loss
from ...models.expert_routing import ExpertRoutingModel
from ...partition import TimestepPartition
from ...pipelines import ExpertRoutingPipeline
from .base import Draw, TrainingTask
from .dual_backbone import check_backbone_arguments, check_no_unet_arguments


class EarlyExitTask(TrainingTask):
    """AdaDiff-style early exit: an `EarlyExitUViT2DModel` of `--deep_depth` blocks (the U-ViT arguments of the
    dual-backbone script), saved as a one-expert `ExpertRoutingPipeline`; set the model's ``exit_threshold`` to
    sample with early exits.

    Example:

    ```py
    >>> import torch
    >>> from diffusers import DDIMScheduler, DDPMScheduler
    >>> from diffusers_stages.training import EarlyExitTask, build_parser
    >>> args = build_parser("train_dual_backbone.py").parse_args([])
    >>> vars(args).update(backbone="early_exit", deep_depth=3, uvit_hidden_size=16, uvit_patch_size=2,
    ...     uvit_num_attention_heads=2)  # options of train_dual_backbone.py's own
    >>> task = EarlyExitTask(args)
    >>> model = task.build_networks(in_channels=3, sample_size=8, num_class_embeds=None)["model"]
    >>> clean, noise = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    >>> task.loss(model, DDPMScheduler(), clean, torch.tensor([10, 900]), noise).shape  # every exit's, per sample
    torch.Size([2])
    >>> type(task.pipeline({"model": model}, DDIMScheduler())).__name__
    'ExpertRoutingPipeline'

    ```
    """

    method = "early exit (AdaDiff-style U-ViT)"
    tags = ("early-exit", "adadiff")

    def build_partition(self, args):
        check_backbone_arguments(args)
        check_no_unet_arguments(args)
        options = ("stage_boundaries", "stage_shares", "switch_step_fraction", "switch_timestep",
                   "pretrained_model_name_or_path")  # fmt: skip
        given = [name for name in options if getattr(args, name, None) is not None]
        if getattr(args, "backbones", "both") != "both":
            given.append("backbones")
        if given:
            raise ValueError(
                f"`--backbone early_exit` trains one network on every timestep and exits by uncertainty, not by a "
                f"switch or stages: drop {', '.join('--' + name for name in given)}."
            )
        if args.boundary_units != "timestep" or args.prediction_type != "epsilon":
            raise ValueError(
                "`--backbone early_exit` trains noise prediction on a DDPM schedule (AdaDiff's setting): "
                f"got `--boundary_units` {args.boundary_units!r}, `--prediction_type` {args.prediction_type!r}."
            )
        if args.snr_gamma is not None:
            raise ValueError(
                f"`--backbone early_exit` trains with AdaDiff's loss (every exit's error and its uncertainty), which "
                f"has no Min-SNR weighting: drop `--snr_gamma` (got {args.snr_gamma})."
            )
        if args.deep_depth < 1 or args.deep_depth % 2 == 0:
            raise ValueError(f"`--deep_depth` must be an odd positive number of U-ViT blocks, got {args.deep_depth}.")
        return TimestepPartition([], args.num_train_timesteps, args.boundary_units)  # one stage: the whole schedule

    @property
    def downsampling(self):
        return self.args.uvit_patch_size

    def build_networks(self, in_channels, sample_size, num_class_embeds):
        a = self.args
        model = EarlyExitUViT2DModel(
            sample_size=sample_size, in_channels=in_channels, patch_size=a.uvit_patch_size,
            hidden_size=a.uvit_hidden_size, num_layers=a.deep_depth, num_attention_heads=a.uvit_num_attention_heads,
            num_class_embeds=num_class_embeds,
        )  # fmt: skip
        return {"model": model}

    def draw(self, batch_size, generator):
        timesteps, _ = self._stratified(batch_size, generator)
        return Draw(torch.arange(batch_size), timesteps, torch.zeros(batch_size, dtype=torch.long))

    def loss(self, network, noise_scheduler, clean, timesteps, noise, class_labels=None):
        # AdaDiff: every exit's denoising MSE plus its uncertainty estimate's error, on x_t of Ho et al. eq. 4
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        return early_exit_loss(network, noisy, timesteps, noise, class_labels, reduction="none")

    def pipeline(self, networks, scheduler, vae=None):
        experts = ExpertRoutingModel(
            [networks["model"]], stage_boundaries=(), num_train_timesteps=self.args.num_train_timesteps,
            prediction_type=self.args.prediction_type,
        )  # fmt: skip
        return ExpertRoutingPipeline(experts=experts, scheduler=scheduler, vae=vae, id2label=self.id2label)

    def description(self):
        a = self.args
        return (
            f"An early-exit baseline (AdaDiff-style): a U-ViT of {a.deep_depth} blocks, width {a.uvit_hidden_size}, "
            "with an exit head and an uncertainty estimate after every block, all trained on every timestep. Set "
            "`pipe.experts.expert(0).exit_threshold` to let each sample stop at the first block whose uncertainty is "
            "below it (None: every block)."
        )
