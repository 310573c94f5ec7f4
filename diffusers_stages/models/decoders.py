"""The decoder side of the multi-stage U-Nets (Zhang et al., CVPR 2024), shared by [`MultiStageUNet2DModel`] and
[`MultiStageUNet2DConditionModel`]: the skip widths of a diffusers down path, the 1x1 adapters that match them to a
tailored decoder's widths, the check of each stage's decoder widths, and one stage's decoder of a `UNet2DModel`.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Callable, Sequence

import torch
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import get_up_block
from torch import nn

from ..partition import TimestepPartition
from .packed_decoders import packable, packed_decoders


def skip_channels(block_out_channels: Sequence[int], layers_per_block: int | Sequence[int]) -> list[int]:
    """Widths of the skip connections a diffusers U-Net down path emits, in order (RESEARCH.md section 3);
    ``layers_per_block`` is one count for every block or one per block (as `UNet2DConditionModel` accepts)."""
    layers = [layers_per_block] * len(block_out_channels) if isinstance(layers_per_block, int) else layers_per_block
    widths = [block_out_channels[0]]
    for i, width in enumerate(block_out_channels):
        widths += [width] * layers[i]
        if i < len(block_out_channels) - 1:
            widths.append(width)  # the downsampler's output
    return widths


# up blocks whose resnets are the only layers that see the skip widths (so they can take the encoder's widths)
CONCATENATING_UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")


def skip_adapter(in_channels: int, out_channels: int) -> nn.Module:
    """A 1x1 convolution from ``in_channels`` to ``out_channels``; the identity (no weights) where they are equal."""
    return nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, kernel_size=1)


class SkipAdapters(nn.Module):
    """The front of a stage decoder: adapters from the encoder's skip widths (and its middle block's output width)
    to the widths a decoder of ``decoder_block_out_channels`` expects; identities where they agree, so a decoder
    copied from a U-Net's up path needs none (and loads that U-Net's weights under the same names)."""

    def __init__(
        self,
        encoder_block_out_channels: Sequence[int],
        decoder_block_out_channels: Sequence[int],
        layers_per_block: int | Sequence[int],
    ):
        super().__init__()
        encoder_skips = skip_channels(encoder_block_out_channels, layers_per_block)
        decoder_skips = skip_channels(decoder_block_out_channels, layers_per_block)
        self.mid_adapter = skip_adapter(encoder_block_out_channels[-1], decoder_block_out_channels[-1])
        self.skip_adapters = nn.ModuleList([skip_adapter(e, d) for e, d in zip(encoder_skips, decoder_skips)])

    def adapt(self, hidden: torch.Tensor, skips: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The encoder's middle-block output and skips, mapped to this decoder's widths. A list of ``skips`` is
        emptied: the decoder then holds the only references and frees each skip once read (as `UNet2DModel` does)."""
        adapted = [adapter(skip) for adapter, skip in zip(self.skip_adapters, skips)]
        if isinstance(skips, list):
            skips.clear()
        return self.mid_adapter(hidden), adapted


def _with_in_channels(resnet: ResnetBlock2D, in_channels: int, act_fn: str) -> ResnetBlock2D:
    """A fresh `ResnetBlock2D` built as diffusers' up blocks build ``resnet``, but taking ``in_channels``."""
    return ResnetBlock2D(
        in_channels=in_channels,
        out_channels=resnet.out_channels,
        temb_channels=resnet.time_emb_proj.in_features if resnet.time_emb_proj is not None else None,
        eps=resnet.norm1.eps,
        groups=resnet.norm1.num_groups,
        dropout=resnet.dropout.p,
        time_embedding_norm=resnet.time_embedding_norm,
        non_linearity=act_fn,
        output_scale_factor=resnet.output_scale_factor,
        pre_norm=resnet.pre_norm,
        skip_time_act=resnet.skip_time_act,
    )


def take_encoder_widths(
    up_blocks: nn.ModuleList,
    encoder_block_out_channels: Sequence[int],
    layers_per_block: int | Sequence[int],
    act_fn: str,
) -> None:
    """Rebuild the resnets of a decoder without skip adapters, as the authors' ``UNetModel_multistage`` builds
    them: each resnet concatenates its input (the middle block's output at the encoder's last width, then the
    previous resnet's output) with the encoder's skip at the *encoder's* width. The resnets are the only layers of
    `CONCATENATING_UP_BLOCKS` and ``CrossAttnUpBlock2D`` that see the skips, so nothing else changes."""
    pending = skip_channels(encoder_block_out_channels, layers_per_block)
    width = encoder_block_out_channels[-1]
    for up_block in up_blocks:
        for j, resnet in enumerate(up_block.resnets):
            in_channels = width + pending.pop()
            if resnet.in_channels != in_channels:
                up_block.resnets[j] = _with_in_channels(resnet, in_channels, act_fn)
            width = resnet.out_channels


def resolve_decoder_up_block_types(
    decoder_up_block_types: Sequence[Sequence[str]] | None,
    up_block_types: Sequence[str],
    num_stages: int,
    skip_adapters: bool,
    without_adapters: Sequence[str],
) -> tuple[tuple[str, ...], ...]:
    """Each stage's decoder up block types (``up_block_types`` for every decoder when ``None``), checked: one
    decoder per stage, one name per level; without ``skip_adapters`` (a bool), only the blocks in
    ``without_adapters`` (those whose resnets alone see the skips)."""
    if decoder_up_block_types is None:
        decoder_up_block_types = (tuple(up_block_types),) * num_stages
    given = decoder_up_block_types
    if not isinstance(given, (list, tuple)) or not all(isinstance(types, (list, tuple)) for types in given):
        raise ValueError(f"`decoder_up_block_types` must be one list of up block names per decoder, got {given!r}.")
    decoder_up_block_types = tuple(tuple(types) for types in given)
    if len(decoder_up_block_types) != num_stages or any(
        len(types) != len(up_block_types) or not all(isinstance(t, str) for t in types)
        for types in decoder_up_block_types
    ):
        raise ValueError(
            f"`decoder_up_block_types` must give {num_stages} decoders (one per stage) "
            f"{len(up_block_types)} up block names each, got {decoder_up_block_types}."
        )
    if not isinstance(skip_adapters, bool):
        raise ValueError(f"`decoder_skip_adapters` must be True or False, got {skip_adapters!r}.")  # noqa: TRY004
    other_blocks = {t for types in decoder_up_block_types for t in types} - set(without_adapters)
    if not skip_adapters and other_blocks:
        raise ValueError(
            f"`decoder_skip_adapters`=False needs up blocks among {tuple(without_adapters)}, got "
            f"{sorted(other_blocks)} in the decoders' up block types."
        )
    return decoder_up_block_types


def resolve_decoder_widths(
    decoder_block_out_channels: Sequence[Sequence[int]] | None,
    block_out_channels: Sequence[int],
    partition: TimestepPartition,
    norm_num_groups: int | None,
) -> tuple[tuple[int, ...], ...]:
    """Each stage's decoder widths (the encoder's when ``None``), checked: one decoder per stage of ``partition``,
    as many widths as ``block_out_channels``, each a positive multiple of ``norm_num_groups``."""
    if decoder_block_out_channels is None:
        decoder_block_out_channels = (tuple(block_out_channels),) * partition.num_stages
    given = decoder_block_out_channels
    if not isinstance(given, (list, tuple)) or not all(
        isinstance(widths, (list, tuple))
        and all(isinstance(w, numbers.Integral) and not isinstance(w, bool) for w in widths)
        for widths in given
    ):
        raise ValueError(
            f"`decoder_block_out_channels` must be one list of integer widths per decoder, got {given!r}."
        )
    decoder_block_out_channels = tuple(tuple(widths) for widths in given)
    if len(decoder_block_out_channels) != partition.num_stages:
        raise ValueError(
            f"`decoder_block_out_channels` must give one decoder per stage ({partition.num_stages} stages "
            f"from `stage_boundaries`={partition.boundaries}), got {len(decoder_block_out_channels)}."
        )
    groups = norm_num_groups or 1
    for widths in (tuple(block_out_channels), *decoder_block_out_channels):
        if len(widths) != len(block_out_channels) or any(w < 1 or w % groups for w in widths):
            raise ValueError(
                f"Every decoder needs {len(block_out_channels)} widths, each a positive multiple of "
                f"`norm_num_groups`={norm_num_groups}; got `decoder_block_out_channels`={decoder_block_out_channels}"
                f" for `block_out_channels`={tuple(block_out_channels)}."
            )
    return decoder_block_out_channels


class StageDecoder(SkipAdapters):
    """One stage's decoder: skip adapters, the up path of a `UNet2DModel`, and the output head.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_stages import MultiStageUNet2DModel
    >>> from diffusers_stages.models import StageDecoder
    >>> model = MultiStageUNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
    ...     down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    ...     stage_boundaries=[500], decoder_block_out_channels=((8, 16), (4, 8)))
    >>> decoder = model.decoders[1]  # the noisy stage's, half as wide as the encoder: its adapters narrow the skips
    >>> isinstance(decoder, StageDecoder), decoder.conv_out.in_channels
    (True, 4)
    >>> x = torch.randn(2, 3, 8, 8)
    >>> hidden, skips, emb, _ = model.encode(x, 700)  # the shared encoder's outputs
    >>> torch.allclose(decoder(hidden, list(skips), emb), model(x, 700).sample)
    True

    ```
    """

    def __init__(
        self,
        encoder_block_out_channels: Sequence[int],
        block_out_channels: Sequence[int],
        up_block_types: Sequence[str],
        layers_per_block: int,
        out_channels: int,
        temb_channels: int,
        norm_num_groups: int,
        norm_eps: float,
        act_fn: str,
        attention_head_dim: int | None,
        resnet_time_scale_shift: str,
        upsample_type: str,
        dropout: float,
        skip_adapters: bool = True,
    ):
        # adapters: encoder widths -> this decoder's widths (identity where equal, so a copy of a U-Net needs none);
        # without adapters every layer is an identity and the resnets take the encoder's widths (end of __init__)
        super().__init__(
            encoder_block_out_channels,
            block_out_channels if skip_adapters else encoder_block_out_channels,
            layers_per_block,
        )

        # up path, built exactly as UNet2DModel builds it
        self.up_blocks = nn.ModuleList([])
        reversed_channels = list(reversed(block_out_channels))
        output_channel = reversed_channels[0]
        for i, up_block_type in enumerate(up_block_types):
            prev_output_channel = output_channel
            output_channel = reversed_channels[i]
            input_channel = reversed_channels[min(i + 1, len(block_out_channels) - 1)]
            self.up_blocks.append(
                get_up_block(
                    up_block_type,
                    num_layers=layers_per_block + 1,
                    in_channels=input_channel,
                    out_channels=output_channel,
                    prev_output_channel=prev_output_channel,
                    temb_channels=temb_channels,
                    add_upsample=i < len(block_out_channels) - 1,
                    resnet_eps=norm_eps,
                    resnet_act_fn=act_fn,
                    resnet_groups=norm_num_groups,
                    attention_head_dim=attention_head_dim if attention_head_dim is not None else output_channel,
                    resnet_time_scale_shift=resnet_time_scale_shift,
                    upsample_type=upsample_type,
                    dropout=dropout,
                )
            )
        if not skip_adapters:  # the authors' decoder: its resnets take the encoder's skips at the encoder's widths
            take_encoder_widths(self.up_blocks, encoder_block_out_channels, layers_per_block, act_fn)
        self.conv_norm_out = nn.GroupNorm(num_channels=block_out_channels[0], num_groups=norm_num_groups, eps=norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, kernel_size=3, padding=1)

    def forward(self, hidden: torch.Tensor, skips: Sequence[torch.Tensor], emb: torch.Tensor) -> torch.Tensor:
        sample, skips = self.adapt(hidden, skips)
        skip_sample = None
        for up_block in self.up_blocks:
            res_samples, skips = tuple(skips[-len(up_block.resnets) :]), skips[: -len(up_block.resnets)]
            if hasattr(up_block, "skip_conv"):
                sample, skip_sample = up_block(sample, res_samples, emb, skip_sample)
            else:
                sample = up_block(sample, res_samples, emb)
        sample = self.conv_out(self.conv_act(self.conv_norm_out(sample)))
        if skip_sample is not None:
            sample = sample + skip_sample
        return sample


def _fusable_state(
    module: nn.Module, prefix: str, key: list, names: list[str] | None, tensors: list[torch.Tensor]
) -> bool:
    """Walk ``module`` once: append its structure to ``key`` (module types and names, attention processor types,
    train mode, gradient checkpointing, FreeU's factors, each parameter's and buffer's name, shape, dtype, device
    and ``requires_grad``; settings that are not parameters, such as a norm's eps, are taken to be equal, as
    decoders built from one config have them), its tensors to ``tensors`` and their names to ``names`` (unless
    `None`); `False` where a module runs code a fused pass would not run once per stage (hooks, an overridden
    ``forward`` such as accelerate's or diffusers' hooks install, a compiled module), and where gradient
    checkpointing would recompute it outside the fused pass (which does not checkpoint). Reads the module's
    ``__dict__`` directly: this runs on every fused forward."""
    state = module.__dict__
    checkpointing = state.get("gradient_checkpointing")
    if (
        state.get("_forward_hooks")
        or state.get("_forward_pre_hooks")
        or state.get("_backward_hooks")
        or state.get("_backward_pre_hooks")
        or "forward" in state
        or state.get("_compiled_call_impl") is not None
        or (checkpointing and torch.is_grad_enabled())
    ):
        return False
    # FreeU's factors are plain attributes of an up block, set per block (`enable_freeu`): part of the structure
    freeu = (state.get("s1"), state.get("s2"), state.get("b1"), state.get("b2"))
    key.append((type(module), type(state.get("processor")), state["training"], checkpointing, freeu))
    for group in (state["_parameters"], state["_buffers"]):
        for name, tensor in group.items() if group else ():
            if tensor is not None:
                key.append((name, tensor.shape, tensor.dtype, tensor.device, tensor.requires_grad))
                if names is not None:
                    names.append(prefix + name)
                tensors.append(tensor)
    for name, child in state["_modules"].items():
        if child is not None:
            key.append(name)
            child_prefix = f"{prefix}{name}." if names is not None else prefix
            if not _fusable_state(child, child_prefix, key, names, tensors):
                return False
    return True


def fused_decoders(decoders: Sequence[nn.Module]) -> Callable[..., torch.Tensor] | None:
    r"""
    One pass through several decoders of one architecture, or `None` when they are not fusable.

    Decoders are fusable when they have the same structure (module types and attention processor types, parameter
    and buffer names, shapes, dtypes and devices, train mode), none has hooks or is compiled, and they are
    `StageDecoder`s of the layers that have a channel-packed form (see
    [`~diffusers_stages.models.packed_decoders.packable`]): what `MultiStageUNet2DModel.from_unet` gives, and what
    training from it keeps. The returned callable takes the decoders' inputs (``hidden``, ``skips``, ``emb``)
    sample-major (row ``i * len(decoders) + k`` is the ``i``-th sample of ``decoders[k]``, the layout
    `dispatch_by_stage` gives a fused pass) and runs them as one network whose channels are
    the decoders' channels side by side: a convolution of all decoders is one grouped convolution, a group norm one
    group norm, a linear layer one batched matrix product. The parameters are stacked on every call, inside
    autograd: gradients reach each decoder's own parameters, and an optimizer step or a load is seen by the next
    call (nothing stacked is kept). Where the decoders' tensors of one name are consecutive rows of one storage (as
    [`stack_decoder_storage`] lays them out), their stack is a view of that storage instead of a copy: it reads the
    decoders' current values, so an in-place write through ``param.data`` (as diffusers' `EMAModel.copy_to` does),
    which changes no version counter, is still seen; anywhere else they are copied into a stack.

    Example:

    ```py
    >>> import torch
    >>> from diffusers import UNet2DModel
    >>> from diffusers_stages import MultiStageUNet2DModel
    >>> from diffusers_stages.models.decoders import fused_decoders
    >>> unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
    ...     down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    >>> model = MultiStageUNet2DModel.from_unet(unet, stage_boundaries=[500])
    >>> run = fused_decoders(list(model.decoders))
    >>> shapes = [(8, 8, 8), (8, 8, 8), (8, 4, 4), (16, 4, 4)]  # the encoder's skips, per sample
    >>> hidden, skips, emb = torch.randn(4, 16, 4, 4), [torch.randn(4, *shape) for shape in shapes], torch.randn(4, 32)
    >>> out = run(hidden, list(skips), emb)  # rows 0 and 2 for the first decoder, rows 1 and 3 for the second
    >>> first = model.decoders[0](hidden[0::2], [skip[0::2] for skip in skips], emb[0::2])
    >>> second = model.decoders[1](hidden[1::2], [skip[1::2] for skip in skips], emb[1::2])
    >>> torch.allclose(out[0::2], first, atol=1e-5) and torch.allclose(out[1::2], second, atol=1e-5)
    True

    ```
    """
    found = _fusable(decoders)
    if found is None or not packable(decoders[0]):
        return None
    names, tensors = found

    def stacked() -> dict[str, torch.Tensor]:
        # every decoder's tensors on a stage axis (in autograd: gradients reach the originals)
        return {name: stage_stack(stage_tensors) for name, stage_tensors in zip(names, zip(*tensors))}

    return packed_decoders(decoders[0], len(decoders), stacked)


def _fusable(decoders: Sequence[nn.Module]) -> tuple[list[str], list[list[torch.Tensor]]] | None:
    """The names of the first decoder's parameters and buffers and each decoder's tensors in that order, or `None`
    where the decoders differ in structure or one is not fusable (see `_fusable_state`)."""
    if not decoders:
        raise ValueError("`decoders` must hold at least one decoder, got none.")
    keys, names, tensors = [], [], []
    for decoder in decoders:
        key, tensors_of_decoder = [], []
        if not _fusable_state(decoder, "", key, None if keys else names, tensors_of_decoder):
            return None
        keys.append(key)
        tensors.append(tensors_of_decoder)
    if any(key != keys[0] for key in keys[1:]):
        return None
    return names, tensors


def stack_decoder_storage(decoders: Sequence[nn.Module]) -> bool:
    r"""
    Lay out the parameters and buffers of decoders of one structure as one stacked tensor per name, stage axis
    first, each decoder's tensor a view of its row, so that a fused pass (`fused_decoders`) reads them as one
    tensor instead of copying them into a stack on every call. Values, the parameter objects (so an optimizer's
    references), gradients and the state dict are unchanged, and names laid out already are left as they are. A
    `.to()` of the decoders themselves, a load with ``assign=True`` or a `copy.deepcopy` gives each tensor storage
    of its own again (the fused pass then copies, with the same results; a staged model's own `.to()` and casts lay
    its decoders out again while fused decoders are enabled). The decoders' state dicts give each row on a storage
    of its own (an alias, not a copy), so that accelerate's `save_state`, safetensors' `load_model` and `torch.save`
    see separate tensors, not weights tied to each other. Returns whether the decoders could be laid out
    (`False`, and nothing changed, for decoders that differ in structure or run code a fused pass would not run,
    such as hooks; decoders laid out may still run stage by stage where the packed pass has no form for them, e.g.
    with FreeU).

    Example:

    ```py
    >>> import torch
    >>> from diffusers_stages import MultiStageUNet2DModel
    >>> from diffusers_stages.models.decoders import stack_decoder_storage
    >>> model = MultiStageUNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
    ...     down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    ...     stage_boundaries=[300, 600])
    >>> decoders = list(model.decoders)
    >>> before = [p.clone() for p in decoders[1].parameters()]
    >>> stack_decoder_storage(decoders)
    True
    >>> first, second = decoders[0].conv_out.weight, decoders[1].conv_out.weight
    >>> second.data_ptr() - first.data_ptr() == first.numel() * first.element_size()
    True
    >>> all(torch.equal(p, q) for p, q in zip(decoders[1].parameters(), before))
    True

    ```
    """
    with torch.no_grad():  # gradient checkpointing keeps the fused pass to calls without gradients: lay them out
        found = _fusable(decoders)
    if found is None:
        return False
    with torch.inference_mode(False), torch.no_grad():  # the rows stay trainable when laid out in inference mode
        for stage_tensors in zip(*found[1]):
            if _consecutive_rows(stage_tensors):  # laid out already (an in-place `.to()`, `share_memory()`)
                continue
            rows = torch.stack([tensor.detach() for tensor in stage_tensors])
            for tensor, row in zip(stage_tensors, rows):
                tensor.data = row
    for decoder in decoders:
        if _rows_of_their_own not in decoder._state_dict_hooks.values():
            decoder.register_state_dict_post_hook(_rows_of_their_own)
    return True


def _rows_of_their_own(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """A state dict hook of laid-out decoders: each of ``module``'s tensors that is part of a larger storage (a row
    of `stack_decoder_storage`'s stack) is given as an alias of its own memory on a storage of its own (a slice of the
    stack's, no copy). Tools that take tensors sharing a storage for tied weights then see none: accelerate's
    `save_state` and `save_model` would drop all decoders but the first, safetensors' `load_model` refuses such a
    model, and `torch.save` of one decoder's state dict would write the whole stack. Entries that are the module's
    own tensors (``keep_vars=True``) are left as they are."""
    own = {id(t) for t in itertools.chain(module.parameters(), module.buffers())}
    for key, tensor in state_dict.items():
        if (
            not key.startswith(prefix)
            or not isinstance(tensor, torch.Tensor)
            or id(tensor) in own
            or tensor.device.type == "meta"
            or not _dense(tensor)
        ):
            continue
        size = tensor.numel() * tensor.element_size()
        storage = tensor.untyped_storage()
        if not size or storage.nbytes() <= size:
            continue
        start = tensor.storage_offset() * tensor.element_size()  # a dense tensor spans its size from its offset
        try:
            alias = tensor.new_empty(0).set_(storage[start : start + size], 0, tensor.shape, tensor.stride())
        except (RuntimeError, NotImplementedError, TypeError):  # a storage that cannot be sliced: left as it is
            continue
        state_dict[key] = alias


def _dense(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` covers its memory without gaps from its storage offset on (contiguous or channels-last,
    the layouts a model's `.to()` gives)."""
    return tensor.is_contiguous() or (tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last))


class _StorageRows(torch.autograd.Function):
    """The stack of tensors that are consecutive rows of one storage, as a view of it; its gradient is split back
    into one per tensor. The view shares the first tensor's version counter only: the tensors are saved for
    backward, so that an in-place change of any of them between forward and backward is autograd's error, as it is
    on the per-stage path, rather than gradients computed with the changed values."""

    @staticmethod
    def forward(ctx, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*tensors)
        return _rows_view(tensors)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.saved_tensors  # noqa: B018 (unpacking checks the tensors' versions)
        return grad.unbind(0)


def stage_stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(tensors)`` of tensors of one shape, dtype and device: a view without a copy where they are
    consecutive rows of one storage (as `stack_decoder_storage` lays them out), with the same gradients."""
    if not tensors:
        raise ValueError("`tensors` must hold at least one tensor to stack, got none.")
    if torch.compiler.is_compiling():  # traced by torch.compile: storage pointers cannot be traced, so a plain stack
        return torch.stack(list(tensors))
    if _consecutive_rows(tensors):
        if torch.is_grad_enabled() and tensors[0].requires_grad:
            return _StorageRows.apply(*tensors)
        return _rows_view(tensors)
    return torch.stack(list(tensors))


def _rows_view(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The stack of consecutive rows (see `_consecutive_rows`) as a view of the first one's storage."""
    first = tensors[0]
    return first.as_strided((len(tensors), *first.shape), (first.numel(), *first.stride()))


def _consecutive_rows(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether tensors of one shape, dtype and device are dense in one layout (contiguous, or all channels-last, as
    ``model.to(memory_format=torch.channels_last)`` leaves convolution weights) and follow each other in the storage
    of the first (the rows of a stack)."""
    first = tensors[0]
    size, stride, contiguous = first.numel() * first.element_size(), first.stride(), first.is_contiguous()
    start = first.data_ptr()
    return bool(
        size
        and (contiguous or _dense(first))
        and first.storage_offset() * first.element_size() + len(tensors) * size <= first.untyped_storage().nbytes()
        and all(
            t.data_ptr() == start + k * size and (t.is_contiguous() if contiguous else t.stride() == stride)
            for k, t in enumerate(tensors)
        )
    )
