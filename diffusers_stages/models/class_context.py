"""Class labels as a cross-attention context: the conditioning of class-conditional latent-diffusion U-Nets that
attend to their class (latent-diffusion's ``ClassEmbedder``, used by the multi-stage ImageNet configs
``cin-mul*`` of Zhang et al., CVPR 2024)."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..conventions import num_data_classes
from .checks import INDEX_DTYPES, _preview
from .loading import StrictLoadingMixin


class ClassContextEmbedding(StrictLoadingMixin, ModelMixin, ConfigMixin):
    r"""
    A learned vector per class, given to a cross-attention U-Net as a one-token ``encoder_hidden_states``: class
    ``c`` becomes the context ``(1, cross_attention_dim)`` its attention layers attend to.

    As every class-conditional model of the package, the last of the ``num_class_embeds`` embeddings is the
    unconditional label (classifier-free guidance), so the data has ``num_class_embeds - 1`` classes.

    Parameters:
        num_class_embeds (`int`): number of embeddings: the data's classes plus the unconditional label.
        cross_attention_dim (`int`): width of each embedding, the U-Net's ``cross_attention_dim``.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_stages.models import ClassContextEmbedding
    >>> embed = ClassContextEmbedding(num_class_embeds=11, cross_attention_dim=16)  # 10 classes + unconditional
    >>> embed(torch.tensor([3, 7])).shape  # (batch, one token, cross_attention_dim)
    torch.Size([2, 1, 16])

    ```
    """

    @register_to_config
    def __init__(self, num_class_embeds: int, cross_attention_dim: int):
        super().__init__()
        for name, value, least in (
            ("num_class_embeds", num_class_embeds, 2),
            ("cross_attention_dim", cross_attention_dim, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"`{name}` must be an integer >= {least}, got {value!r}.")
        self.embedding = nn.Embedding(num_class_embeds, cross_attention_dim)  # latent-diffusion's name

    def forward(self, class_labels: torch.Tensor, check_values: bool = True) -> torch.Tensor:
        """``(batch,)`` class indices (the unconditional label included) to a ``(batch, 1, dim)`` context; with
        ``check_values`` (a host read; the pipelines, which check the labels once per run, skip it on each step's
        call) the indices must lie in ``[0, num_class_embeds)``."""
        if not torch.is_tensor(class_labels):
            raise ValueError(f"`class_labels` must be a 1-D integer tensor, got {type(class_labels).__name__}.")
        if class_labels.ndim != 1 or class_labels.is_floating_point():
            raise ValueError(
                f"`class_labels` must be a 1-D integer tensor, got shape {tuple(class_labels.shape)} of "
                f"{class_labels.dtype}."
            )
        if class_labels.dtype not in INDEX_DTYPES:  # what the embedding table takes
            raise ValueError(
                f"`class_labels` must be a 1-D int64 (or int32) tensor, got {class_labels.dtype}: pass "
                "`class_labels.long()`."
            )
        count = self.config.num_class_embeds
        if check_values and bool(((class_labels < 0) | (class_labels >= count)).any()):
            raise ValueError(f"`class_labels` must be class indices in [0, {count}), got {_preview(class_labels)}.")
        return self.embedding(class_labels)[:, None]

    @property
    def num_classes(self) -> int:
        """The data's classes (the embeddings but the unconditional label)."""
        return num_data_classes(self.config.num_class_embeds)
