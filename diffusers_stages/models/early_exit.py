"""Early-exit baseline (AdaDiff-style: Tang et al., "Deediff"/"AdaDiff", 2023-2024) for dual-backbone studies.

A small U-ViT (Bao et al., CVPR 2023: time as a token, long skips between the first and second half of the blocks)
with an exit head after every transformer block and, beside each head, an uncertainty estimation module (UEM): a
per-token estimate of that exit's error. At sampling time the network stops at the first block whose mean
uncertainty is under ``exit_threshold``. Recording the exit depth over a sampling run shows the "phase transition"
DuoDiff builds on: early exits during the first, noisy steps, then the full depth.

The exit decision is made per call for the whole batch (all samples of a sampling batch share the noise level).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from .checks import check_class_labels, check_sample, per_sample_timesteps
from .loading import StrictLoadingMixin


class EarlyExitUViT2DModel(StrictLoadingMixin, ModelMixin, ConfigMixin):
    r"""
    A U-ViT denoiser with an exit head and an uncertainty estimate after every block.

    Parameters:
        sample_size (`int`, defaults to 32): input height and width.
        in_channels (`int`, defaults to 3), out_channels (`int`, *optional*, defaults to ``in_channels``).
        patch_size (`int`, defaults to 2): side of the square patches that become tokens.
        hidden_size (`int`, defaults to 128), num_layers (`int`, defaults to 7, odd: in-blocks, a middle block,
            out-blocks), num_attention_heads (`int`, defaults to 4).
        num_class_embeds (`int`, *optional*): class-conditional when given (a class token, as U-ViT).
        exit_threshold (`float`, *optional*): exit at the first block whose mean uncertainty is below it; `None`
            always runs every block. Can be changed per call (``forward(..., exit_threshold=)``).

    Example:

    ```py
    >>> import torch
    >>> from diffusers_stages.models.early_exit import EarlyExitUViT2DModel
    >>> model = EarlyExitUViT2DModel(sample_size=8, hidden_size=16, num_layers=3, num_attention_heads=2)
    >>> out = model(torch.randn(2, 3, 8, 8), 500, exit_threshold=1.0)  # uncertainties lie in (0, 1): exit at once
    >>> out.sample.shape, model.last_exit_layer
    (torch.Size([2, 3, 8, 8]), 1)
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
        num_class_embeds: int | None = None,
        exit_threshold: float | None = None,
    ):
        super().__init__()
        # 0. check the configuration
        if sample_size % patch_size:
            raise ValueError(f"`sample_size`={sample_size} must be a multiple of `patch_size`={patch_size}.")
        if num_layers < 1 or num_layers % 2 == 0:
            raise ValueError(f"`num_layers` must be odd (in-blocks, middle block, out-blocks), got {num_layers}.")
        if hidden_size % num_attention_heads:
            raise ValueError(f"`hidden_size`={hidden_size} must be a multiple of `num_attention_heads`.")
        out_channels = out_channels or in_channels
        num_tokens = (sample_size // patch_size) ** 2

        # 1. tokens: patches, a time token and an optional class token (U-ViT "all as tokens")
        self.patch_embed = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.time_proj = Timesteps(hidden_size, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(hidden_size, hidden_size)
        self.class_embed = nn.Embedding(num_class_embeds, hidden_size) if num_class_embeds else None
        extra = 1 + (num_class_embeds is not None)
        self.pos_embed = nn.Parameter(torch.zeros(1, extra + num_tokens, hidden_size))

        # 2. transformer blocks; out-blocks take a long skip from their mirror in-block (U-ViT)
        head_dim = hidden_size // num_attention_heads
        self.blocks = nn.ModuleList(
            [
                BasicTransformerBlock(hidden_size, num_attention_heads, head_dim, activation_fn="gelu")
                for _ in range(num_layers)
            ]
        )
        self.skip_proj = nn.ModuleList([nn.Linear(2 * hidden_size, hidden_size) for _ in range(num_layers // 2)])

        # 3. one exit head (norm + linear to patch pixels) and one uncertainty estimate per block (AdaDiff's UEM)
        self.exit_heads = nn.ModuleList(
            [
                nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, patch_size**2 * out_channels))
                for _ in range(num_layers)
            ]
        )
        self.uncertainty_heads = nn.ModuleList([nn.Linear(hidden_size, 1) for _ in range(num_layers)])
        self.exit_threshold = exit_threshold
        self.last_exit_layer: int | None = None

    def _exit(self, layer: int, hidden: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prediction ``(B, C, H, W)`` and per-token uncertainty ``(B, N)`` of exit ``layer``."""
        tokens = hidden[:, -(height // self.config.patch_size) * (width // self.config.patch_size) :]
        patches = self.exit_heads[layer](tokens)
        p, c = self.config.patch_size, self.config.out_channels or self.config.in_channels
        image = patches.transpose(1, 2).reshape(hidden.shape[0], c * p * p, -1)
        image = F.fold(image, output_size=(height, width), kernel_size=p, stride=p)  # unpatchify
        uncertainty = torch.sigmoid(self.uncertainty_heads[layer](tokens)).squeeze(-1)
        return image, uncertainty

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
        # 0. check the inputs (a `ValueError` naming the argument): the exit test reads values on the host anyway
        config = self.config
        check_sample(sample, config.in_channels, size=config.sample_size)
        timesteps = per_sample_timesteps(timestep, sample.shape[0], sample.device, check_values=True)
        conditional = self.class_embed is not None
        check_class_labels(class_labels, sample.shape[0], conditional, config.num_class_embeds, check_values=True)

        # 1. tokens: [time, (class), patches] + position embedding
        batch, _, height, width = sample.shape
        tokens = [self.time_embed(self.time_proj(timesteps).to(sample.dtype))[:, None]]
        if conditional:
            tokens.append(self.class_embed(class_labels.reshape(-1).expand(batch))[:, None])
        tokens.append(self.patch_embed(sample).flatten(2).transpose(1, 2))
        hidden = torch.cat(tokens, dim=1) + self.pos_embed

        # 2. blocks with long skips; after each, the exit test (AdaDiff: mean uncertainty under the threshold)
        threshold = self.exit_threshold if exit_threshold is None else exit_threshold
        half, skips, exits = len(self.blocks) // 2, [], []
        for layer, block in enumerate(self.blocks):
            if layer > half:
                hidden = self.skip_proj[layer - half - 1](torch.cat([hidden, skips.pop()], dim=-1))
            hidden = block(hidden)
            if layer < half:
                skips.append(hidden)
            if return_all_exits:
                exits.append(self._exit(layer, hidden, height, width))
                continue
            last = layer == len(self.blocks) - 1
            if last or threshold is not None:
                image, uncertainty = self._exit(layer, hidden, height, width)
                if last or float(uncertainty.detach().mean()) < threshold:
                    self.last_exit_layer = layer + 1
                    break
        if return_all_exits:
            self.last_exit_layer = len(self.blocks)
            return [e[0] for e in exits], [e[1] for e in exits]
        if not return_dict:
            return (image,)
        return UNet2DOutput(sample=image)


def early_exit_loss(
    model: EarlyExitUViT2DModel,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    target: torch.Tensor,
    class_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""
    AdaDiff's training loss: the denoising MSE of every exit (equal weights) plus, for each uncertainty estimate,
    the MSE to ``tanh`` of its exit's actual per-token error (stopped gradient).

    Example:

    ```py
    >>> import torch
    >>> from diffusers_stages.models.early_exit import EarlyExitUViT2DModel, early_exit_loss
    >>> model = EarlyExitUViT2DModel(sample_size=8, hidden_size=16, num_layers=3, num_attention_heads=2)
    >>> early_exit_loss(model, torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.randn(2, 3, 8, 8)).ndim
    0

    ```
    """
    predictions, uncertainties = model(noisy, timesteps, class_labels=class_labels, return_all_exits=True)
    p = model.config.patch_size
    loss = noisy.new_zeros(())
    for prediction, uncertainty in zip(predictions, uncertainties):
        loss = loss + F.mse_loss(prediction.float(), target.float())
        token_error = F.avg_pool2d((prediction - target).abs().mean(1, keepdim=True), p).flatten(1)  # (B, N)
        loss = loss + F.mse_loss(uncertainty.float(), torch.tanh(token_error.detach()).float())
    return loss / len(predictions)


@torch.no_grad()
def record_exit_profile(
    model: EarlyExitUViT2DModel,
    scheduler,
    num_inference_steps: int = 50,
    exit_threshold: float | None = None,
    batch_size: int = 1,
    generator: torch.Generator | None = None,
) -> list[tuple[float, int]]:
    r"""
    Sample with ``model`` through the package's sampling loop and return ``(timestep, exit layer)`` of every model
    call: AdaDiff's exit-depth profile.

    Example:

    ```py
    >>> import torch
    >>> from diffusers import DDIMScheduler
    >>> from diffusers_stages.models.early_exit import EarlyExitUViT2DModel, record_exit_profile
    >>> model = EarlyExitUViT2DModel(sample_size=8, hidden_size=16, num_layers=3, num_attention_heads=2)
    >>> record_exit_profile(model, DDIMScheduler(), num_inference_steps=2, exit_threshold=1.0)
    [(500.0, 1), (0.0, 1)]

    ```
    """
    from ..pipelines.pipeline_expert_routing import ExpertRoutingPipeline
    from .expert_routing import ExpertRoutingModel

    previous, model.exit_threshold = (
        model.exit_threshold,
        exit_threshold if exit_threshold is not None else model.exit_threshold,
    )
    profile = []
    handle = model.register_forward_hook(lambda m, args, out: profile.append((float(args[1]), m.last_exit_layer)))
    try:
        single = ExpertRoutingModel([model], stage_boundaries=(), prediction_type=scheduler.config.prediction_type)
        pipe = ExpertRoutingPipeline(experts=single, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        pipe(batch_size=batch_size, num_inference_steps=num_inference_steps, generator=generator, output_type="pt")
    finally:
        handle.remove()
        model.exit_threshold = previous
    return profile
