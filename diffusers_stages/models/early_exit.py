"""Early-exit baseline (AdaDiff-style: Tang et al., "Deediff"/"AdaDiff", 2023-2024) for dual-backbone studies.

A [`UViT2DModel`] (Bao et al., CVPR 2023) with an exit head after every block but the last (the last block's exit is
the U-ViT's own output head) and, beside each exit, an uncertainty estimation module (UEM): a per-token estimate of
that exit's error. At sampling time each sample stops at the first block whose mean uncertainty (over its tokens) is
under ``exit_threshold``, as in the authors' sampler: two samples of one batch may exit at different depths, and each
gets what it would get alone. Recording the exit depth over a sampling run shows the "phase transition" DuoDiff builds
on: early exits during the first, noisy steps, then the full depth.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from .staged import refuse_grouped_offload
from .uvit import UViT2DModel, UViTOutputHead


class EarlyExitUViT2DModel(UViT2DModel):
    r"""
    A U-ViT denoiser with an exit head and an uncertainty estimate after every block.

    Parameters:
        sample_size, in_channels, out_channels, patch_size, hidden_size, num_layers, num_attention_heads,
            mlp_ratio, qkv_bias, mlp_time_embed, num_class_embeds, final_conv: as [`UViT2DModel`] (defaults here:
            width 128, 7 blocks, 4 heads).
        exit_threshold (`float`, *optional*): each sample exits at the first block whose mean uncertainty is below
            it; `None` always runs every block. Can be changed per call (``forward(..., exit_threshold=)``) or on the
            model (``model.exit_threshold = 0.1``: checked, and kept in its config, so `save_pretrained` saves it).

    After each call, ``last_exit_layers`` holds the exit depth of every sample (1-based, ``(batch,)``) and
    ``last_exit_layer`` the deepest of them (the blocks that call ran).

    Without a threshold (and with ``return_all_exits``) the model compiles with ``torch.compile(fullgraph=True)``;
    with one, each exit test reads the uncertainties on the host and shrinks the batch: a graph break per block.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_stages.models.early_exit import EarlyExitUViT2DModel
    >>> model = EarlyExitUViT2DModel(sample_size=8, hidden_size=16, num_layers=3, num_attention_heads=2)
    >>> out = model(torch.randn(2, 3, 8, 8), 500, exit_threshold=1.0)  # uncertainties lie in (0, 1): exit at once
    >>> out.sample.shape, model.last_exit_layer, model.last_exit_layers.tolist()
    (torch.Size([2, 3, 8, 8]), 1, [1, 1])
    >>> model(torch.randn(2, 3, 8, 8), 500).sample.shape, model.last_exit_layer  # no threshold: every block
    (torch.Size([2, 3, 8, 8]), 3)

    ```
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        out_channels: int | None = None,
        patch_size: int = 2,
        hidden_size: int = 128,
        num_layers: int = 7,
        num_attention_heads: int = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        mlp_time_embed: bool = False,
        num_class_embeds: int | None = None,
        final_conv: bool = True,
        exit_threshold: float | None = None,
    ):
        super().__init__(
            sample_size=sample_size, in_channels=in_channels, out_channels=out_channels, patch_size=patch_size,
            hidden_size=hidden_size, num_layers=num_layers, num_attention_heads=num_attention_heads,
            mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, mlp_time_embed=mlp_time_embed, num_class_embeds=num_class_embeds,
            final_conv=final_conv,
        )  # fmt: skip
        # one exit head per block but the last (whose exit is the U-ViT's output head), one UEM per block
        out_channels = out_channels or in_channels
        self.exit_heads = nn.ModuleList(
            [UViTOutputHead(hidden_size, patch_size, out_channels, final_conv) for _ in range(num_layers - 1)]
        )
        self.uncertainty_heads = nn.ModuleList([nn.Linear(hidden_size, 1) for _ in range(num_layers)])
        self._init_weights()
        self.exit_threshold = exit_threshold  # checked by the setter
        self.last_exit_layers: torch.Tensor | None = None
        self.last_exit_layer: int | None = None

    def enable_group_offload(self, *args, **kwargs) -> None:
        """diffusers' `enable_group_offload` (same arguments), refusing block-level groups of several blocks: a
        sample leaving at one exit head would run it in a group loaded only by the head before it (see
        `refuse_grouped_offload`)."""
        refuse_grouped_offload(self, "exit_heads", args, kwargs)
        super().enable_group_offload(*args, **kwargs)

    @property
    def exit_threshold(self) -> float | None:
        """The threshold of the sampling path (`None`: every block); the config's value, so that a threshold set on
        the model is saved with it."""
        return self.config.exit_threshold

    @exit_threshold.setter
    def exit_threshold(self, value: float | None) -> None:
        value = _checked_threshold(value)
        # no longer a default: diffusers' `from_config` (and so `EMAModel.save_pretrained`) drops the keys the config
        # lists in `_use_default_values`, and would build the model without this threshold
        defaults = [key for key in self.config.get("_use_default_values", []) if key != "exit_threshold"]
        self.register_to_config(
            exit_threshold=None if value is None else float(value),  # a JSON number (numpy's too)
            _use_default_values=defaults,
        )

    def _prediction(self, layer: int, hidden: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Prediction ``(B, C, H, W)`` of exit ``layer``."""
        head = self.output_head if layer == len(self.blocks) - 1 else self.exit_heads[layer]
        return head(hidden, height, width)

    def _uncertainty(self, layer: int, hidden: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Per-token uncertainty ``(B, N)`` in (0, 1) of exit ``layer`` (patch tokens only)."""
        tokens = hidden[:, -(height // self.config.patch_size) * (width // self.config.patch_size) :]
        return torch.sigmoid(self.uncertainty_heads[layer](tokens)).squeeze(-1)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
        exit_threshold: float | None = None,
        return_all_exits: bool = False,
    ) -> UNet2DOutput | tuple:
        r"""
        Args:
            sample, timestep, class_labels, return_dict: as in `UNet2DModel`.
            exit_threshold (`float`, *optional*): overrides ``self.exit_threshold`` for this call.
            return_all_exits (`bool`): run every block and return ``(predictions, uncertainties)``, one per exit
                (for training with [`early_exit_loss`]).
        """
        # 0. check the inputs (a `ValueError` naming the argument): the exit test reads values on the host anyway;
        # not under torch.compile, where a host read breaks the graph
        timesteps = self._check_inputs(sample, timestep, class_labels, values=not torch.compiler.is_compiling())
        batch, _, height, width = sample.shape
        hidden, skips = self.embed(sample, timesteps, class_labels), []
        num_layers = len(self.blocks)

        # 1. training: every block, every exit
        if return_all_exits:
            predictions, uncertainties = [], []
            for layer in range(num_layers):
                hidden = self.block(layer, hidden, skips)
                predictions.append(self._prediction(layer, hidden, height, width))
                uncertainties.append(self._uncertainty(layer, hidden, height, width))
            self.last_exit_layers = torch.full((batch,), num_layers, device=sample.device)
            self.last_exit_layer = num_layers
            return predictions, uncertainties

        # 2. sampling: after each block, the samples whose mean uncertainty is under the threshold leave the batch
        threshold = _checked_threshold(self.exit_threshold if exit_threshold is None else exit_threshold)
        active = torch.arange(batch, device=sample.device)  # indices of the samples still running
        exit_layers = torch.full((batch,), num_layers, device=sample.device)
        image = None
        for layer in range(num_layers):
            hidden = self.block(layer, hidden, skips)
            if layer == num_layers - 1 and image is None:  # no sample left early: no indexing, no host read
                image = self._prediction(layer, hidden, height, width)
                break
            if layer == num_layers - 1:
                done = torch.ones(len(active), dtype=torch.bool, device=sample.device)
            elif threshold is not None:
                done = self._uncertainty(layer, hidden, height, width).detach().mean(dim=1) < threshold
            else:
                continue
            if not bool(done.any()):
                continue
            prediction = self._prediction(layer, hidden[done], height, width)
            if image is None:
                image = prediction.new_empty((batch, *prediction.shape[1:]))
            image[active[done]] = prediction
            exit_layers[active[done]] = layer + 1
            # the remaining samples go on alone (their skips too)
            keep = ~done
            active, hidden, skips = active[keep], hidden[keep], [skip[keep] for skip in skips]
            if not len(active):
                break
        self.last_exit_layers = exit_layers
        self.last_exit_layer = num_layers if threshold is None else int(exit_layers.max())
        if not return_dict:
            return (image,)
        return UNet2DOutput(sample=image)


def early_exit_loss(
    model: EarlyExitUViT2DModel,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    target: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""
    An AdaDiff-style training loss: the denoising MSE of every exit (equal weights) plus, for each uncertainty
    estimate, the MSE to ``tanh`` of its exit's actual per-token error (stopped gradient), averaged over the exits.
    AdaDiff also weights each exit's MSE by one minus its estimated uncertainty (the "uncertainty-aware layer-wise
    loss"); DuoDiff's code for it weights by one minus the uncertainty *target* instead, and trains one uncertainty
    per image (its tokens' mean) toward the mean of ``tanh`` of the pixel errors. Neither weighting is applied here,
    and the estimates are per token. ``reduction="none"`` gives each sample's loss (shape ``(batch,)``, as the
    training loop's tasks return it), ``"mean"`` their mean.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_stages.models.early_exit import EarlyExitUViT2DModel, early_exit_loss
    >>> model = EarlyExitUViT2DModel(sample_size=8, hidden_size=16, num_layers=3, num_attention_heads=2)
    >>> early_exit_loss(model, torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.randn(2, 3, 8, 8)).ndim
    0

    ```
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"`reduction` must be 'mean' or 'none', got {reduction!r}.")
    predictions, uncertainties = model(noisy, timesteps, class_labels=class_labels, return_all_exits=True)
    if not torch.is_tensor(target) or target.shape != predictions[0].shape:  # it would broadcast, silently
        got = tuple(target.shape) if torch.is_tensor(target) else type(target).__name__
        raise ValueError(f"`target` must have the predictions' shape {tuple(predictions[0].shape)}, got {got}.")
    p = getattr(model, "module", model).config.patch_size  # a DDP-wrapped model (training) as well
    loss = noisy.new_zeros(len(noisy), dtype=torch.float32)
    for prediction, uncertainty in zip(predictions, uncertainties):
        loss = loss + (prediction.float() - target.float()).square().flatten(1).mean(1)
        token_error = F.avg_pool2d((prediction - target).abs().mean(1, keepdim=True), p).flatten(1)  # (B, N)
        loss = loss + (uncertainty.float() - torch.tanh(token_error.detach()).float()).square().mean(1)
    loss = loss / len(predictions)
    return loss.mean() if reduction == "mean" else loss


def _checked_threshold(threshold: float | None) -> float | None:
    """``exit_threshold`` if it is `None` or a finite number (a `ValueError` naming it otherwise: a nan would never
    let a sample exit, silently)."""
    if threshold is not None and (
        isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not math.isfinite(threshold)
    ):
        raise ValueError(f"`exit_threshold` must be a finite number or None, got {threshold!r}.")
    return threshold
