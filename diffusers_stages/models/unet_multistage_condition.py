"""Multi-stage, multi-decoder text-conditional U-Net: the Stable Diffusion (1.x, 2.x, XL) form of
[`MultiStageUNet2DModel`] (Zhang et al., CVPR 2024).

One shared encoder (``conv_in``, time/class/added embeddings, down blocks, middle block) of a
`UNet2DConditionModel` feeds one decoder per stage: that stage's up blocks (cross-attention up blocks included) and
output head, of tailored widths. The model routes each sample by the timestep it receives, so it drops into
diffusers' own pipelines (`StableDiffusionPipeline`, `StableDiffusionXLPipeline`) as their ``unet``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, ClassVar

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders.peft import PeftAdapterMixin
from diffusers.loaders.unet import _LOW_CPU_MEM_USAGE_DEFAULT
from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales
from diffusers.models.activations import get_activation
from diffusers.models.attention import AttentionMixin
from diffusers.models.attention_processor import AttentionProcessor
from diffusers.models.embeddings import TimestepEmbedding
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import get_mid_block
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel, UNet2DConditionOutput
from diffusers.utils.peft_utils import apply_lora_scale
from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
from torch import nn

from ..conventions import DEFAULT_STAGE_BOUNDARIES
from ..routing import dispatch_by_stage
from .checks import check_encoder_hidden_states, compute_dtype
from .decoders import resolve_decoder_widths, skip_channels
from .ip_adapter import (
    blocks_with_attentions,
    check_image_embeds,
    check_ip_adapter_fits,
    check_ip_adapter_state_dicts,
    ip_adapter_layers,
    with_source_layer_names,
)
from .loading import StrictLoadingMixin
from .lora import check_lora_fits, fetch_lora, lora_to_stages, require_peft, with_decoder_scales
from .staged import StagedModelMixin
from .unet_multistage_condition_blocks import (
    CHECKED_ARGUMENTS,
    CHECKED_OPTIONS,
    SUPPORTED_ADDITION_EMBEDS,
    SUPPORTED_DOWN_BLOCKS,
    SUPPORTED_MID_BLOCKS,
    SUPPORTED_UP_BLOCKS,
    CrossAttnStageDecoder,
    check_config,
    check_encoder_attention_mask,
    cross_attn_down_blocks,
    mask_to_bias,
)
from .warm_start import warm_start

# the decoder and the option lists lived here first; they stay importable from this module
__all__ = [
    "SUPPORTED_ADDITION_EMBEDS",
    "SUPPORTED_DOWN_BLOCKS",
    "SUPPORTED_MID_BLOCKS",
    "SUPPORTED_UP_BLOCKS",
    "CrossAttnStageDecoder",
    "MultiStageUNet2DConditionModel",
    "resolve_decoder_widths",
]


class MultiStageUNet2DConditionModel(
    StagedModelMixin, StrictLoadingMixin, ModelMixin, ConfigMixin, AttentionMixin, PeftAdapterMixin
):
    r"""
    A text-conditional 2D U-Net with one shared encoder and one decoder per stage of the noise schedule, a drop-in
    ``unet`` for diffusers' Stable Diffusion pipelines.

    The encoder (``conv_in``; time, class and SDXL added embeddings; down blocks; middle block) runs once on the
    whole batch. Each sample is then decoded by the decoder of its stage only (stage looked up from the timestep it
    receives), so a mixed batch costs ``encoder(B) + sum_s decoder_s(B_s)``, and each decoder sees only its own
    rows of every conditioning tensor. Classifier-free guidance's doubled batch shares one timestep, so it stays in
    one stage.

    The encoder arguments are those of [`~diffusers.UNet2DConditionModel`] (options outside Stable Diffusion
    1.x/2.x and SDXL raise a `ValueError`); the multi-stage arguments are:

    Parameters:
        num_train_timesteps (`int`, defaults to 1000): length of the training schedule.
        stage_boundaries (`tuple[float]`, defaults to `(442, 631)`):
            Inner stage boundaries, strictly increasing, in ``boundary_units`` (see [`TimestepPartition`]).
        boundary_units (`str`, defaults to `"timestep"`): ``"timestep"`` or ``"sigma"`` (EDM-style models).
        decoder_block_out_channels (`tuple[tuple[int]]`, *optional*):
            Block widths of each stage's decoder, from the clean stage to the noisy one; ``None`` gives every
            decoder the encoder's ``block_out_channels``. 1x1 adapters map the encoder's skips to other widths.
        decoder_skip_adapters (`bool`, defaults to `True`):
            ``False``: no adapters; each decoder resnet concatenates its input with the encoder's skip at the
            *encoder's* width, and the middle block's output enters the first resnet at the encoder's last width, as
            in the authors' latent-diffusion ``UNetModel_multistage`` (up blocks ``CrossAttnUpBlock2D`` and
            ``UpBlock2D`` only). The two coincide for decoders of the encoder's widths.
        decoder_up_block_types (`tuple[tuple[str]]`, *optional*):
            Up block types of each stage's decoder, clean stage first, so that decoders may attend at different
            levels; ``None`` gives every decoder ``up_block_types``.
        decoder_attention_head_dim (`tuple[int | tuple[int]]`, *optional*):
            Attention heads of each stage's decoder, clean stage first: one count, or one per block in encoder order
            (diffusers' ``attention_head_dim`` naming: a number of heads). ``None`` gives every decoder the encoder's.
            Heads of a fixed width (the authors' 32 channels) at tailored widths need it.

    Example:

    ```py
    >>> import torch
    >>> from diffusers import UNet2DConditionModel
    >>> from diffusers_stages import MultiStageUNet2DConditionModel
    >>> unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
    ...     layers_per_block=1, norm_num_groups=4, cross_attention_dim=16, attention_head_dim=2,
    ...     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    ...     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    >>> staged = MultiStageUNet2DConditionModel.from_unet(unet, stage_boundaries=(300, 600))  # exact warm start
    >>> x, text = torch.randn(3, 4, 8, 8), torch.randn(3, 5, 16)
    >>> t = torch.tensor([100, 450, 900])  # one sample per stage, each to its own decoder
    >>> torch.allclose(staged(x, t, text).sample, unet(x, t, text).sample, atol=1e-5)
    True
    >>> tailored = MultiStageUNet2DConditionModel(**{k: v for k, v in unet.config.items() if k[0] != "_"},
    ...     stage_boundaries=(500,), decoder_block_out_channels=((16, 32), (4, 8)))  # wide clean, narrow noisy
    >>> tailored(x, 700, text).sample.shape
    torch.Size([3, 4, 8, 8])

    ```
    """

    _supports_gradient_checkpointing = True
    # a decoder is one unit (`device_map`, FSDP wrapping), as are its blocks
    _no_split_modules: ClassVar[list[str]] = [
        "CrossAttnStageDecoder",
        "BasicTransformerBlock",
        "ResnetBlock2D",
        "CrossAttnUpBlock2D",
        "UpBlock2D",
    ]
    _skip_layerwise_casting_patterns: ClassVar[list[str]] = ["norm"]
    _plain_class_conversions: ClassVar[dict[str, str]] = {
        "UNet2DConditionModel": "convert it with `{cls}.from_unet({name}.from_pretrained({args}), stage_boundaries=...)`"
    }
    _repeated_blocks: ClassVar[list[str]] = ["BasicTransformerBlock"]

    # the encoder's embeddings and the attention helpers are UNet2DConditionModel's own (same config keys)
    _set_time_proj = UNet2DConditionModel._set_time_proj
    _set_encoder_hid_proj = UNet2DConditionModel._set_encoder_hid_proj
    _set_class_embedding = UNet2DConditionModel._set_class_embedding
    _set_add_embedding = UNet2DConditionModel._set_add_embedding
    get_time_embed = UNet2DConditionModel.get_time_embed
    get_class_embed = UNet2DConditionModel.get_class_embed
    get_aug_embed = UNet2DConditionModel.get_aug_embed
    process_encoder_hidden_states = UNet2DConditionModel.process_encoder_hidden_states
    set_default_attn_processor = UNet2DConditionModel.set_default_attn_processor
    set_attention_slice = UNet2DConditionModel.set_attention_slice
    # `pipe.fuse_qkv_projections()`: every `Attention` fused, encoder and decoders alike (AttentionMixin's own version
    # fuses only the newer attention classes, and the pipeline then sets a fused processor on unfused layers)
    fuse_qkv_projections = UNet2DConditionModel.fuse_qkv_projections
    unfuse_qkv_projections = UNet2DConditionModel.unfuse_qkv_projections

    @classmethod
    def _auto_map_module(cls) -> None:
        """No ``auto_map`` (and no re-export file): a Stable Diffusion folder with this `unet` loads through diffusers'
        own pipeline classes (see the README), and stays a folder without code files."""
        return None

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 4,
        out_channels: int = 4,
        center_input_sample: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        mid_block_type: str | None = "UNetMidBlock2DCrossAttn",
        up_block_types: tuple[str, ...] = (
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        only_cross_attention: bool | tuple[bool] = False,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int | tuple[int] = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        dropout: float = 0.0,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int | tuple[int] = 1280,
        transformer_layers_per_block: int | tuple[int] | tuple[tuple] = 1,
        reverse_transformer_layers_per_block: tuple[tuple[int]] | None = None,
        encoder_hid_dim: int | None = None,
        encoder_hid_dim_type: str | None = None,
        attention_head_dim: int | tuple[int] = 8,
        num_attention_heads: int | tuple[int] | None = None,
        dual_cross_attention: bool = False,
        use_linear_projection: bool = False,
        class_embed_type: str | None = None,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        resnet_skip_time_act: bool = False,
        resnet_out_scale_factor: float = 1.0,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        time_embedding_act_fn: str | None = None,
        timestep_post_act: str | None = None,
        time_cond_proj_dim: int | None = None,
        conv_in_kernel: int = 3,
        conv_out_kernel: int = 3,
        projection_class_embeddings_input_dim: int | None = None,
        attention_type: str = "default",
        class_embeddings_concat: bool = False,
        mid_block_only_cross_attention: bool | None = None,
        cross_attention_norm: str | None = None,
        addition_embed_type_num_heads: int = 64,
        num_train_timesteps: int = 1000,
        stage_boundaries: tuple[float, ...] = DEFAULT_STAGE_BOUNDARIES,
        boundary_units: str = "timestep",
        decoder_block_out_channels: tuple[tuple[int, ...], ...] | None = None,
        decoder_skip_adapters: bool = True,
        decoder_up_block_types: tuple[tuple[str, ...], ...] | None = None,
        decoder_attention_head_dim: tuple[int | tuple[int, ...], ...] | None = None,
    ):
        super().__init__()
        # 0. check the configuration: unsupported options, diffusers' own checks, the decoders' widths (`self.config`
        # holds every argument above already: @register_to_config sets it before this body runs)
        self.partition, decoders, per_block = check_config(
            self,
            options={name: self.config[name] for name in CHECKED_OPTIONS},
            **{name: self.config[name] for name in CHECKED_ARGUMENTS},
        )
        self.register_to_config(stage_boundaries=list(self.partition.boundaries))  # floats: JSON whatever was given
        self.sample_size = sample_size

        # 1. shared encoder, part 1: input convolution; time, class and added embeddings (UNet2DConditionModel's)
        blocks_time_embed_dim = self._build_embeddings()

        # 2. shared encoder, part 2: down path and middle block, built as UNet2DConditionModel builds them
        block_kwargs = self._build_encoder(per_block, blocks_time_embed_dim)
        self.num_upsamplers = len(down_block_types) - 1

        # 3. one tailored decoder per stage, clean stage first
        self.decoders = nn.ModuleList(
            [
                CrossAttnStageDecoder(
                    encoder_block_out_channels=block_out_channels,
                    **decoder,  # its block_out_channels, up_block_types and per_block (its own heads)
                    out_channels=out_channels,
                    temb_channels=blocks_time_embed_dim,
                    norm_num_groups=norm_num_groups,
                    norm_eps=norm_eps,
                    act_fn=act_fn,
                    conv_out_kernel=conv_out_kernel,
                    block_kwargs=block_kwargs,
                    skip_adapters=decoder_skip_adapters,
                )
                for decoder in decoders
            ]
        )

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        r"""FreeU (https://huggingface.co/papers/2309.11497) in every stage's decoder: its up blocks scale their
        backbone features by ``b1``/``b2`` and filter their skips by ``s1``/``s2``, as
        [`~diffusers.UNet2DConditionModel.enable_freeu`] does in its up path (what `pipe.enable_freeu` calls)."""
        for decoder in self.decoders:
            UNet2DConditionModel.enable_freeu(decoder, s1=s1, s2=s2, b1=b1, b2=b2)

    def disable_freeu(self) -> None:
        """Disable FreeU in every stage's decoder."""
        for decoder in self.decoders:
            UNet2DConditionModel.disable_freeu(decoder)

    # ------------------------------------------------------------------------------------------------------------
    # LoRA: diffusers' `PeftAdapterMixin` on the module tree; a source U-Net's LoRA renamed onto it first
    def load_lora_adapter(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
        prefix: str | None = "transformer",
        hotswap: bool = False,
        **kwargs,
    ) -> None:
        r"""
        [`~diffusers.loaders.PeftAdapterMixin.load_lora_adapter`] (what `pipe.load_lora_weights` calls, with
        ``prefix="unet"``) for a LoRA of the source `UNet2DConditionModel` or of this model. A source LoRA's down
        and middle keys go to the shared encoder, its up-path keys to every decoder, each decoder its own copy of
        the adapter (see [`~diffusers_stages.models.lora.lora_to_stages`]); a LoRA saved from this model (keys
        ``decoders.{s}.``) loads as it is. Every tensor is checked against the layer it lands on before anything
        changes: decoders of tailored widths (``decoder_block_out_channels``) cannot take the source's up-path
        LoRA (a `ValueError` naming the decoder and the shapes). Files are read from safetensors only.

        Example:

        ```py
        >>> import torch
        >>> from diffusers import UNet2DConditionModel
        >>> from peft import LoraConfig
        >>> from peft.utils import get_peft_model_state_dict
        >>> from diffusers_stages import MultiStageUNet2DConditionModel
        >>> unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
        ...     norm_num_groups=4, cross_attention_dim=16, attention_head_dim=2,
        ...     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        ...     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
        >>> staged = MultiStageUNet2DConditionModel.from_unet(unet, stage_boundaries=(500,))
        >>> unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["to_q", "to_v"]))
        >>> staged.load_lora_adapter(get_peft_model_state_dict(unet), prefix=None, adapter_name="style")
        >>> x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
        >>> torch.allclose(staged(x, 700, text).sample, unet(x, 700, text).sample, atol=1e-5)
        True

        ```
        """
        require_peft()
        state_dict = fetch_lora(pretrained_model_name_or_path_or_dict, kwargs)
        state_dict, kwargs["network_alphas"], kwargs["metadata"] = self._prepare_lora(
            state_dict, prefix, kwargs.get("network_alphas"), kwargs.get("metadata")
        )
        super().load_lora_adapter(state_dict, prefix=prefix, hotswap=hotswap, **kwargs)

    def _prepare_lora(
        self,
        state_dict: dict[str, torch.Tensor],
        prefix: str | None,
        network_alphas: dict[str, float] | None = None,
        metadata: dict | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, float] | None, dict | None]:
        """A LoRA state dict (with its alphas and metadata) in this model's names, in PEFT's key format, checked
        against the layers it lands on (a `ValueError` naming the decoder and the shapes); nothing is changed."""
        first = next((key for key in state_dict if prefix is None or key.startswith(f"{prefix}.")), None)
        if first is not None and "lora_A" not in first and ".lokr_" not in first:  # diffusers' older key format
            state_dict = convert_unet_state_dict_to_peft(state_dict)
        state_dict, network_alphas, metadata = lora_to_stages(
            state_dict, self.num_stages, prefix, network_alphas, metadata
        )
        check_lora_fits(self, state_dict, prefix, lambda name: self._adapter_where(name, "LoRA"))
        return state_dict, network_alphas, metadata

    def set_adapters(
        self,
        adapter_names: list[str] | str,
        weights: float | dict | list[float] | list[dict] | list[None] | None = None,
    ) -> None:
        """[`~diffusers.loaders.PeftAdapterMixin.set_adapters`], with the block-wise scales of
        `UNet2DConditionModel` (``{"down": ..., "mid": ..., "up": {"block_0": ...}}``): ``"up"`` scales every
        decoder's up blocks alike, each layer as the source's (see `with_decoder_scales`)."""
        from diffusers.utils import USE_PEFT_BACKEND

        names = [adapter_names] if isinstance(adapter_names, str) else adapter_names
        listed = weights if isinstance(weights, list) else [weights] * len(names)
        if any(isinstance(weight, dict) for weight in listed) and len(listed) == len(names):
            weights = _maybe_expand_lora_scales(self, [1.0 if weight is None else weight for weight in listed])
            if USE_PEFT_BACKEND:  # (without it diffusers' own error follows)
                from peft.tuners.tuners_utils import BaseTunerLayer

                layers = [name for name, module in self.named_modules() if isinstance(module, BaseTunerLayer)]
                weights = [with_decoder_scales(w, layers) if isinstance(w, dict) else w for w in weights]
        super().set_adapters(adapter_names, weights)

    # ------------------------------------------------------------------------------------------------------------
    # IP-Adapter: what diffusers' `IPAdapterMixin` (`pipe.load_ip_adapter`, `set_ip_adapter_scale`,
    # `unload_ip_adapter`) calls on `pipe.unet`, with the source U-Net's layers renamed onto the stages
    @property
    def up_blocks(self) -> tuple:
        """No up path of its own (each decoder has one, ``decoders[s].up_blocks``): the decoders' up blocks as
        diffusers' block-wise scales (``set_ip_adapter_scale``, ``set_adapters`` with a dict) read a U-Net's, block
        ``i`` with ``attentions`` where a decoder's has them (see `blocks_with_attentions`)."""
        return blocks_with_attentions(self.decoders, "up_blocks")

    @property
    def attn_processors(self) -> dict[str, AttentionProcessor]:
        """The attention processors by name, a decoder's name (``decoders.{s}.up_blocks...``) also starting with the
        source U-Net's (``up_blocks...``, see `SourceLayerName`): diffusers' ``set_ip_adapter_scale`` gives a
        block-wise (dict) scale's ``"up"`` entries to every decoder's layers."""
        return with_source_layer_names(super().attn_processors)

    def _adapter_where(self, name: str, what: str = "weights") -> str:
        """The part of this model that layer ``name`` belongs to, for an adapter's (LoRA, IP-Adapter) error
        messages: ``"the shared encoder"``, or ``"decoder {s}"`` with why a tailored one cannot take the source's
        up-path ``what``; no name: the model as a whole."""
        if not name:
            return "this model (its source U-Net's layout)"
        if not name.startswith("decoders."):
            return "the shared encoder"
        why = f" (a decoder of tailored widths, `decoder_block_out_channels`, cannot take the source's up-path {what})"
        return f"decoder {name.split('.')[1]}{why if self.config.decoder_block_out_channels is not None else ''}"

    def _check_ip_adapter(self, state_dicts: list[dict] | dict) -> list[dict]:
        """The IP-Adapter state dicts as a list, checked against the layers they land on (a `ValueError` naming
        the decoder and the shapes); nothing is changed."""
        state_dicts = check_ip_adapter_state_dicts(state_dicts)
        check_ip_adapter_fits(self, state_dicts, self._adapter_where)
        return state_dicts

    def _load_ip_adapter_weights(
        self, state_dicts: list[dict] | dict, low_cpu_mem_usage: bool = _LOW_CPU_MEM_USAGE_DEFAULT
    ) -> None:
        r"""
        Load IP-Adapters made for the source `UNet2DConditionModel` (what `pipe.load_ip_adapter` calls): the image
        projection becomes the shared encoder's ``encoder_hid_proj``, the down and middle layers' ``to_k_ip`` /
        ``to_v_ip`` go to the encoder's processors and each up-path layer's to that layer of every decoder (each
        decoder its own copy), built by diffusers' own conversion. The forward then turns
        ``added_cond_kwargs["image_embeds"]`` into the image tokens once, in the encoder, and routes them with the
        rest of each sample's conditioning. Every tensor is checked first: decoders of tailored widths
        (``decoder_block_out_channels``) cannot take the source's up-path weights (a `ValueError` naming the decoder
        and the shapes, nothing changed).

        Example:

        ```py
        >>> import torch
        >>> from diffusers import UNet2DConditionModel
        >>> from diffusers_stages import MultiStageUNet2DConditionModel
        >>> unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
        ...     norm_num_groups=4, cross_attention_dim=16, attention_head_dim=2,
        ...     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        ...     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
        >>> staged = MultiStageUNet2DConditionModel.from_unet(unet, stage_boundaries=(500,))
        >>> widths = [unet.get_submodule(n[:-10]).to_k.weight.shape for n in unet.attn_processors if "attn2" in n]
        >>> adapter = {"image_proj": {"proj.weight": torch.randn(64, 12), "proj.bias": torch.zeros(64),
        ...     "norm.weight": torch.ones(16), "norm.bias": torch.zeros(16)},
        ...     "ip_adapter": {f"{2 * i + 1}.to_{p}_ip.weight": torch.randn(w) for i, w in enumerate(widths) for p in "kv"}}
        >>> unet._load_ip_adapter_weights([adapter]); staged._load_ip_adapter_weights([adapter])
        >>> x, text, image = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16), {"image_embeds": [torch.randn(2, 1, 12)]}
        >>> t = torch.tensor([100, 900])  # one sample per stage
        >>> torch.allclose(staged(x, t, text, added_cond_kwargs=image).sample,
        ...     unet(x, t, text, added_cond_kwargs=image).sample, atol=1e-5)
        True

        ```
        """
        state_dicts = self._check_ip_adapter(state_dicts)
        UNet2DConditionModel._load_ip_adapter_weights(self, state_dicts, low_cpu_mem_usage=low_cpu_mem_usage)

    def _convert_ip_adapter_attn_to_diffusers(
        self, state_dicts: list[dict], low_cpu_mem_usage: bool = _LOW_CPU_MEM_USAGE_DEFAULT
    ) -> dict[str, nn.Module]:
        """diffusers' conversion on the source's view of the layers (its names and order), each up-path
        processor copied to every decoder."""
        layers = ip_adapter_layers(self)
        processors = self.attn_processors
        view = SimpleNamespace(
            attn_processors={source: processors[targets[0]] for source, targets in layers.items()}, config=self.config
        )
        converted = UNet2DConditionModel._convert_ip_adapter_attn_to_diffusers(view, state_dicts, low_cpu_mem_usage)
        return {
            target: converted[source] if i == 0 else copy.deepcopy(converted[source])
            for source, targets in layers.items()
            for i, target in enumerate(targets)
        }

    def _load_ip_adapter_loras(self, state_dicts: list[dict]) -> dict:
        """The LoRAs of IP-Adapter FaceID state dicts in the source U-Net's names (``unet.up_blocks...``), which
        `pipe.load_lora_weights` then renames onto the decoders (see `load_lora_adapter`)."""
        layers = ip_adapter_layers(self)
        view = SimpleNamespace(attn_processors=dict.fromkeys(layers))
        return UNet2DConditionModel._load_ip_adapter_loras(view, state_dicts)

    _convert_ip_adapter_image_proj_to_diffusers = UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers

    def _build_embeddings(self) -> int:
        """The input convolution and the time, class and added embeddings, as `UNet2DConditionModel` builds them;
        returns the width of the embedding the blocks take."""
        c = self.config
        padding = (c.conv_in_kernel - 1) // 2
        self.conv_in = nn.Conv2d(c.in_channels, c.block_out_channels[0], kernel_size=c.conv_in_kernel, padding=padding)
        time_embed_dim, timestep_input_dim = self._set_time_proj(
            c.time_embedding_type, c.block_out_channels, c.flip_sin_to_cos, c.freq_shift, c.time_embedding_dim
        )
        self.time_embedding = TimestepEmbedding(
            timestep_input_dim,
            time_embed_dim,
            act_fn=c.act_fn,
            post_act_fn=c.timestep_post_act,
            cond_proj_dim=c.time_cond_proj_dim,
        )
        self._set_encoder_hid_proj(None, cross_attention_dim=c.cross_attention_dim, encoder_hid_dim=None)
        self._set_class_embedding(
            c.class_embed_type,
            act_fn=c.act_fn,
            num_class_embeds=c.num_class_embeds,
            projection_class_embeddings_input_dim=c.projection_class_embeddings_input_dim,
            time_embed_dim=time_embed_dim,
            timestep_input_dim=timestep_input_dim,
        )
        self._set_add_embedding(
            c.addition_embed_type,
            addition_embed_type_num_heads=c.addition_embed_type_num_heads,
            addition_time_embed_dim=c.addition_time_embed_dim,
            cross_attention_dim=c.cross_attention_dim,
            encoder_hid_dim=None,
            flip_sin_to_cos=c.flip_sin_to_cos,
            freq_shift=c.freq_shift,
            projection_class_embeddings_input_dim=c.projection_class_embeddings_input_dim,
            time_embed_dim=time_embed_dim,
        )
        self.time_embed_act = None if c.time_embedding_act_fn is None else get_activation(c.time_embedding_act_fn)
        return time_embed_dim * 2 if c.class_embeddings_concat else time_embed_dim

    def _build_encoder(self, per_block: dict[str, list], blocks_time_embed_dim: int) -> dict:
        """The down blocks and the middle block, as `UNet2DConditionModel` builds them; returns the keyword
        arguments every block shares (the decoders take them too)."""
        c = self.config
        mid_block_only_cross_attention = c.mid_block_only_cross_attention
        if mid_block_only_cross_attention is None:
            only = c.only_cross_attention
            mid_block_only_cross_attention = only if isinstance(only, bool) else False
        block_kwargs = {
            "dual_cross_attention": c.dual_cross_attention,
            "use_linear_projection": c.use_linear_projection,
            "upcast_attention": c.upcast_attention,
            "resnet_time_scale_shift": c.resnet_time_scale_shift,
            "attention_type": c.attention_type,
            "resnet_skip_time_act": c.resnet_skip_time_act,
            "resnet_out_scale_factor": c.resnet_out_scale_factor,
            "cross_attention_norm": c.cross_attention_norm,
            "dropout": c.dropout,
        }
        self.down_blocks = cross_attn_down_blocks(
            c.down_block_types, c.block_out_channels, per_block, blocks_time_embed_dim, c.norm_eps, c.act_fn,
            c.norm_num_groups, c.downsample_padding, block_kwargs,
        )  # fmt: skip
        mid_kwargs = {k: v for k, v in block_kwargs.items() if k != "resnet_out_scale_factor"}
        self.mid_block = get_mid_block(
            c.mid_block_type,
            temb_channels=blocks_time_embed_dim,
            in_channels=c.block_out_channels[-1],
            resnet_eps=c.norm_eps,
            resnet_act_fn=c.act_fn,
            resnet_groups=c.norm_num_groups,
            output_scale_factor=c.mid_block_scale_factor,
            transformer_layers_per_block=per_block["transformer_layers_per_block"][-1],
            num_attention_heads=per_block["num_attention_heads"][-1],
            cross_attention_dim=per_block["cross_attention_dim"][-1],
            mid_block_only_cross_attention=mid_block_only_cross_attention,
            attention_head_dim=per_block["attention_head_dim"][-1],
            **mid_kwargs,
        )
        return block_kwargs

    def encode(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        conditioning: dict[str, Any] | None = None,
        down_intrablock_additional_residuals: Sequence[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
        """Run the shared encoder on the whole batch: ``(hidden, skips, emb, encoder_hidden_states)``, the last as
        the cross-attention blocks see them. ``conditioning`` holds the masks and ``cross_attention_kwargs``;
        ``down_intrablock_additional_residuals`` (T2I-Adapter features) join the down path and the middle block's
        output as in `UNet2DConditionModel` (the caller's sequence is not emptied)."""
        conditioning = conditioning or {}
        adapter = list(down_intrablock_additional_residuals or ())
        # 1. time, class and added (SDXL text/time) embeddings, as UNet2DConditionModel
        emb = self.time_embedding(self.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
        if self.config.class_embed_type == "timestep" and torch.is_tensor(class_labels):
            class_labels = class_labels.reshape(-1)  # one label as a 0-d tensor too (`Timesteps` takes 1-D)
        class_emb = self.get_class_embed(sample=sample, class_labels=class_labels)
        if class_emb is not None and self.config.class_embeddings_concat:  # one label for the batch: one row each
            emb = torch.cat([emb, class_emb.reshape(-1, class_emb.shape[-1]).expand(emb.shape[0], -1)], dim=-1)
        elif class_emb is not None:
            emb = emb + class_emb
        if self.config.addition_embed_type is not None and added_cond_kwargs is None:
            raise ValueError(
                f"`added_cond_kwargs` must be given: this model has `addition_embed_type`="
                f"{self.config.addition_embed_type!r} (SDXL: `text_embeds` and `time_ids`)."
            )
        aug_emb = self.get_aug_embed(
            emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
        )
        emb = emb + aug_emb if aug_emb is not None else emb
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        encoder_hidden_states = self.process_encoder_hidden_states(encoder_hidden_states, added_cond_kwargs)
        conditioning = {**conditioning, "encoder_hidden_states": encoder_hidden_states}

        # 2. down path and middle block
        hidden = self.conv_in(sample)
        skips = (hidden,)
        for down_block in self.down_blocks:
            if getattr(down_block, "has_cross_attention", False):
                extra = {"additional_residuals": adapter.pop(0)} if adapter else {}
                hidden, res_samples = down_block(hidden_states=hidden, temb=emb, **conditioning, **extra)
            else:
                hidden, res_samples = down_block(hidden_states=hidden, temb=emb)
                if adapter:  # in place, as UNet2DConditionModel: the block's last skip is this tensor and takes it too
                    hidden += adapter.pop(0)
            skips += res_samples
        if self.mid_block is not None:
            extra = conditioning if getattr(self.mid_block, "has_cross_attention", False) else {}
            hidden = self.mid_block(hidden, emb, **extra)
            if adapter and hidden.shape == adapter[0].shape:
                hidden += adapter.pop(0)
        return hidden, skips, emb, encoder_hidden_states

    @apply_lora_scale("cross_attention_kwargs")
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        down_intrablock_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
        stage_index: int | None = None,
    ) -> UNet2DConditionOutput | tuple:
        r"""
        The arguments of [`~diffusers.UNet2DConditionModel.forward`], plus:

        Args:
            timestep (`torch.Tensor` or `float` or `int`): one timestep, or one per sample (stages may differ).
            down_block_additional_residuals, mid_block_additional_residual (*optional*): ControlNet residuals,
                added to the shared encoder's skips and middle-block output.
            down_intrablock_additional_residuals (*optional*): T2I-Adapter residuals, added in the shared encoder as
                `UNet2DConditionModel` adds them.
            stage_index (`int`, *optional*): decode every sample with this stage's decoder, skipping the
                data-dependent routing (it makes `torch.compile(fullgraph=True)` work).
        """
        # 0. check the input; masks become additive biases with a query axis (as UNet2DConditionModel)
        timesteps = self.check_inputs(
            sample, timestep, stage_index, self.config.in_channels, dtype=compute_dtype(self.conv_in)
        )
        check_encoder_hidden_states(encoder_hidden_states, sample.shape[0], self.config.cross_attention_dim)
        check_encoder_attention_mask(encoder_attention_mask, *encoder_hidden_states.shape[:2])
        if self.class_embedding is not None:  # (labels given to a model without one are ignored, as diffusers does)
            num_labels = self.config.num_class_embeds if self.config.class_embed_type is None else None
            self.check_labels(class_labels, sample.shape[0], stage_index, num_labels)
        if self.encoder_hid_proj is not None and self.config.encoder_hid_dim_type == "ip_image_proj":
            check_image_embeds(added_cond_kwargs, sample.shape[0])
        if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
            raise ValueError(
                "ControlNet residuals come in pairs: give both `down_block_additional_residuals` and "
                "`mid_block_additional_residual`, or neither (T2I-Adapter features go in "
                "`down_intrablock_additional_residuals`)."
            )
        num_skips = len(skip_channels(self.config.block_out_channels, self.config.layers_per_block))
        if down_block_additional_residuals is not None and len(down_block_additional_residuals) != num_skips:
            raise ValueError(
                f"`down_block_additional_residuals` must hold {num_skips} tensors, one per skip connection of the "
                f"encoder (a ControlNet of this U-Net's layout gives them), got {len(down_block_additional_residuals)}."
            )
        conditioning = {
            "attention_mask": mask_to_bias(attention_mask, sample.dtype),
            "encoder_attention_mask": mask_to_bias(encoder_attention_mask, sample.dtype),
            "cross_attention_kwargs": cross_attention_kwargs,
        }
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        # 1. shared encoder, once on the whole batch (ControlNet residuals added to its outputs), embedding the checked
        # timesteps (diffusers' `get_time_embed` builds a tensor of a float or an int only, not of a numpy float)
        hidden, skips, emb, encoder_hidden_states = self.encode(
            sample, timesteps, encoder_hidden_states, class_labels, timestep_cond, added_cond_kwargs, conditioning,
            down_intrablock_additional_residuals,
        )  # fmt: skip
        if down_block_additional_residuals is not None:
            skips = tuple(skip + residual for skip, residual in zip(skips, down_block_additional_residuals))
            hidden = hidden + mid_block_additional_residual
        conditioning["encoder_hidden_states"] = encoder_hidden_states

        # 2. route: each stage's decoder on its own rows of every tensor (the whole batch when one stage holds it)
        forward_upsample_size = any(size % 2**self.num_upsamplers for size in sample.shape[-2:])

        def decode(stage: int, inputs: list) -> torch.Tensor:
            return self.decoders[stage](*inputs, forward_upsample_size)

        inputs, skips = [hidden, list(skips), emb, conditioning], None  # handed over: each skip freed once read
        out = dispatch_by_stage(self.partition, timesteps, stage_index, decode, inputs)
        if not return_dict:
            return (out,)
        return UNet2DConditionOutput(sample=out)

    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel,
        stage_boundaries: Sequence[float] = DEFAULT_STAGE_BOUNDARIES,
        boundary_units: str = "timestep",
        num_train_timesteps: int | None = None,
    ) -> MultiStageUNet2DConditionModel:
        r"""
        Warm-start from a pretrained [`~diffusers.UNet2DConditionModel`] (a Stable Diffusion ``unet``): the encoder
        is the U-Net's down path and every decoder a copy of its up path, so the new model's output equals the
        source's at every timestep (fine-tune the decoders apart afterwards). ``num_train_timesteps`` defaults to
        1000 (Stable Diffusion's schedule).
        """
        return warm_start(cls, UNet2DConditionModel, unet, stage_boundaries, boundary_units, num_train_timesteps)
