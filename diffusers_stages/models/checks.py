"""What the package's models check and read on every forward call: the one place for both, kept cheap.

Users call the models' ``forward`` directly in their own loops, so a bad argument must give a `ValueError` that names
it and the value received, not a shape error deep inside a convolution. The checks come in two kinds:

- shapes, ranks, dtypes and Python types: always checked; they cost nothing and never read tensor values, so they
  hold under ``torch.compile(fullgraph=True)``;
- tensor values (finite timesteps, class indices in range): checked only when the caller asks for them, which the
  models do on the routed path (no ``stage_index``), where the routing reads the timesteps on the host anyway. With a
  ``stage_index`` (the pipelines' per-step call, and the compiled path) values are trusted, so that the path stays
  free of host synchronisations and data-dependent branches.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence

import torch
from diffusers.models.activations import ACT2CLS
from torch import nn

from ..partition import exact_float

INDEX_DTYPES = (torch.int64, torch.int32)  # what an embedding table (`nn.Embedding`) takes as indices


def renamed_arguments(error: ValueError, names: Mapping[str, str]) -> ValueError:
    """``error`` with each argument it names in backticks (`` `name` ``) written as the caller knows it
    (``names[name]``: a command's option, a config key), for a check called with other names than the user gave.

    ```py
    >>> from diffusers_stages.models.checks import renamed_arguments
    >>> str(renamed_arguments(ValueError("`dataset` or `train_data_dir` is needed"), {"dataset": "--data"}))
    '`--data` or `train_data_dir` is needed'

    ```
    """
    pattern = "`(" + "|".join(re.escape(name) for name in names) + ")`"
    return ValueError(re.sub(pattern, lambda match: f"`{names[match[1]]}`", str(error)))


def _preview(values: torch.Tensor, limit: int = 8) -> str:
    """A short printable form of a tensor's values, for error messages."""
    flat = values.detach().reshape(-1)
    return str(flat[:limit].tolist())[:-1] + (", ...]" if flat.numel() > limit else "]")


def check_positive_integers(optional: tuple[str, ...] = (), **values) -> None:
    """A `ValueError` naming the first of ``values`` that is not a positive Python integer (bools refused); the names
    in ``optional`` may also be None. For configuration values, which are saved as JSON: a numpy integer is refused
    with a hint to pass ``int(...)`` (call arguments take it: `positive_integer_arguments`)."""
    for name, value in values.items():
        if value is None and name in optional:
            continue
        if not is_positive_integer(value):
            or_none = " or None" if name in optional else ""
            numpy_int = _is_integral(value) and not isinstance(value, int) and value >= 1
            numpy = " (a Python int: the config is saved as JSON; pass int(...))" if numpy_int else ""
            raise ValueError(f"`{name}` must be a positive integer{or_none}{numpy}, got {value!r}.")


def positive_integer_arguments(optional: tuple[str, ...] = (), **values) -> tuple[int | None, ...]:
    r"""
    The call arguments ``values``, in order, as Python ints: each must be a positive integer, a Python or numpy one
    (any `numbers.Integral`, as diffusers' pipelines take them; bools, numpy's too, and floats such as 2.0 are
    refused with a `ValueError` naming the argument); the names in ``optional`` may also be None (kept).

    Example:

    ```py
    >>> import numpy as np
    >>> from diffusers_stages.models.checks import positive_integer_arguments
    >>> positive_integer_arguments(batch_size=np.int64(2), num_inference_steps=4)
    (2, 4)

    ```
    """
    for name, value in values.items():
        if value is None and name in optional:
            continue
        if not _is_integral(value) or value < 1:
            or_none = " or None" if name in optional else ""
            raise ValueError(f"`{name}` must be a positive integer{or_none}, got {value!r}.")
    return tuple(None if value is None else int(value) for value in values.values())


def check_norm_eps_and_dropout(norm_eps: object, dropout: object) -> None:
    """A `ValueError` naming ``norm_eps`` unless it is a positive finite number (NaN makes every output NaN, a negative
    one the norms of flat groups, 0 divides by zero on a flat map) or ``dropout`` unless it is a number in ``[0, 1)``
    (1 drops every residual branch; torch's own errors name neither, some only in the first training forward)."""
    if isinstance(norm_eps, bool) or not isinstance(norm_eps, numbers.Real) or not 0 < norm_eps < math.inf:
        raise ValueError(f"`norm_eps` must be a positive finite number, got {norm_eps!r}.")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
        raise ValueError(f"`dropout` must be a number in [0, 1), got {dropout!r}.")


def is_non_negative_integer(value: object) -> bool:
    """Whether ``value`` is a Python integer >= 0 (a bool is not, nor a float such as 2.0)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: object) -> bool:
    """Whether ``value`` is a Python number a JSON config can hold (an int or a float, numpy's float64 too; not a
    bool, nor numpy's float32, which JSON cannot save)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_positive_finite(value: object) -> bool:
    """Whether ``value`` is a positive finite Python number (`_is_number`)."""
    return _is_number(value) and 0 < value < math.inf


# The options diffusers' models take unchecked and then fail on only in the first forward (a type or shape error deep
# inside torch), or build into a model whose outputs are NaN, or read as something else ("no" is a truthy flag): one
# rule each, shared by every model of the package that takes the option (`check_options`). name: (what the value
# must be, its check).
_FLAG = ("True or False", lambda value: isinstance(value, bool))
_ACTIVATIONS = tuple(ACT2CLS)  # the names diffusers' `get_activation` takes (in any case)


def _is_activation(value: object) -> bool:
    """Whether ``value`` names an activation diffusers' `get_activation` builds (its names in any case)."""
    return isinstance(value, str) and value.lower() in ACT2CLS


OPTION_RULES: dict[str, tuple[str, Callable[[object], bool]]] = {
    "freq_shift": ("a finite number", lambda value: _is_number(value) and math.isfinite(value)),
    "downsample_padding": ("an integer >= 0", is_non_negative_integer),
    "mid_block_scale_factor": ("a positive finite number", _is_positive_finite),  # what the middle block divides by
    "resnet_out_scale_factor": ("a positive finite number", _is_positive_finite),  # what each resnet divides by
    "act_fn": (f"one of {_ACTIVATIONS}", _is_activation),
    "time_embedding_act_fn": (f"None or one of {_ACTIVATIONS}", lambda value: value is None or _is_activation(value)),
    "timestep_post_act": (f"None or one of {_ACTIVATIONS}", lambda value: value is None or _is_activation(value)),
    # diffusers' ResnetBlock2D's `time_embedding_norm`: its error named that, not this argument
    "resnet_time_scale_shift": ("'default' or 'scale_shift'", lambda value: value in ("default", "scale_shift")),
    **dict.fromkeys(
        (
            "center_input_sample",
            "flip_sin_to_cos",
            "add_attention",
            "upcast_attention",
            "use_linear_projection",
            "resnet_skip_time_act",
            "class_embeddings_concat",
            "qkv_bias",
            "mlp_time_embed",
            "final_conv",
        ),
        _FLAG,
    ),
}


def check_options(**values: object) -> None:
    r"""
    A `ValueError` naming the first of ``values`` (model options, by name) that breaks its rule in `OPTION_RULES`:
    flags must be True or False, ``freq_shift`` a finite number, ``downsample_padding`` an integer >= 0, the scale
    factors positive finite numbers, activations names diffusers' `get_activation` takes.

    Example:

    ```py
    >>> from diffusers_stages.models.checks import check_options
    >>> check_options(freq_shift=1, downsample_padding=0, center_input_sample=False)
    >>> check_options(center_input_sample="no")
    Traceback (most recent call last):
    ...
    ValueError: `center_input_sample` must be True or False, got 'no'.

    ```
    """
    for name, value in values.items():
        what, valid = OPTION_RULES[name]
        if not valid(value):
            raise ValueError(f"`{name}` must be {what}, got {value!r}.")


def check_freq_shift(freq_shift: float, width: int, source: str) -> None:
    """A `ValueError` naming ``freq_shift`` when it is half the ``width`` of a sinusoidal projection (diffusers'
    `Timesteps`), whose frequencies divide by ``width // 2 - freq_shift``: every embedding, and output, NaN.
    ``source`` names the option the width comes from."""
    if width // 2 > 0 and freq_shift == width // 2:  # (a width of 1 has no frequency to divide)
        raise ValueError(
            f"`freq_shift`={freq_shift!r} must differ from {width // 2}, half the width of the sinusoidal projection "
            f"(`{source}`={width}): its frequencies divide by the difference, and every output would be NaN."
        )


def _is_integral(value: object) -> bool:
    """Whether ``value`` is an integer of any kind (`numbers.Integral`: Python's, numpy's), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_device(value: torch.device | str, name: str) -> torch.device:
    """``value`` as a `torch.device` this machine has; a `ValueError` naming the argument ``name`` when it is not one
    (not a device torch knows, one this machine lacks, or ``meta``, where weights would be lost)."""
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(f"`{name}` must be a torch device such as 'cpu' or 'cuda', got {value!r}.") from error
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    available = callable(getattr(backend, "is_available", None)) and backend.is_available()
    count = backend.device_count() if available and callable(getattr(backend, "device_count", None)) else None
    if not available or (device.index is not None and count is not None and device.index >= count):
        raise ValueError(
            f"`{name}` must be a device this machine has, got {value!r} "
            f"({f'no {device.type} device is available' if not available else f'{count} {device.type} devices'}; use 'cpu' "
            "or one this machine has)."
        )
    return device


def compute_dtype(model: nn.Module) -> torch.dtype:
    r"""
    The dtype ``model`` computes in (the dtype its input must have), read from its first layer with floating-point
    weights, or that layer's compute dtype under diffusers' layerwise casting.

    `ModelMixin.dtype` gives the same answer for the package's models, but walks every submodule (every decoder of a
    multi-decoder model) on each read: per forward call that walk costs more than routing does.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_stages.models.checks import compute_dtype
    >>> compute_dtype(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(2, 2).half()))
    torch.float16

    ```
    """
    for module in model.modules():
        weight = next((p for p in module.parameters(recurse=False) if p.is_floating_point()), None)
        if weight is None:
            continue
        registry = getattr(module, "_diffusers_hook", None)
        casting = registry.get_hook("layerwise_casting") if registry is not None else None
        return casting.compute_dtype if casting is not None else weight.dtype
    return torch.get_default_dtype()  # no floating-point weights at all


def disk_offload_path(module: nn.Module) -> str | None:
    """The folder of diffusers' group offloading to disk (``offload_to_disk_path``) on ``module`` or a submodule, whose
    weights then live in that folder's files (the modules hold uninitialised placeholders); `None` if there is none."""
    for submodule in module.modules():
        registry = getattr(submodule, "_diffusers_hook", None)
        hook = registry.get_hook("group_offloading") if registry is not None else None
        path = getattr(getattr(hook, "config", None), "offload_to_disk_path", None)
        if path is not None:
            return path
    return None


def check_savable(module: nn.Module, name: str) -> None:
    """A `ValueError` before ``module`` (named ``name`` in the message) is saved as a folder no loader reads: while
    diffusers' group offloading to disk is on (`disk_offload_path`: `save_pretrained` would write its uninitialised
    placeholders), or with LoRA adapters loaded in it or a submodule (fused or not: the wrapped layers' weights
    would be saved under other names, ``to_q.base_layer.weight``, beside the adapters' ``lora_A``/``lora_B``)."""
    adapters = sorted({a for m in module.modules() for a in (getattr(m, "peft_config", None) or {})})
    if adapters:
        raise ValueError(
            f"`save_pretrained` cannot save {name}: it has LoRA adapters loaded ({adapters}), whose layers would be "
            "saved under names no model loads (`to_q.base_layer.weight`, `lora_A`). Save the LoRA on its own "
            "(`pipe.save_lora_weights` or `model.save_lora_adapter`) and the model after `unload_lora()` (or "
            "`pipe.unload_lora_weights()`), or bake it into the weights first with `fuse_lora()` and then "
            "`unload_lora()`."
        )
    path = disk_offload_path(module)
    if path is not None:
        raise ValueError(
            f"`save_pretrained` cannot save {name}: group offloading to disk (`offload_to_disk_path`={path!r}) "
            "keeps its weights in that folder's files and leaves uninitialised placeholders in the model, which "
            "would be saved instead. Save before `enable_group_offload(offload_to_disk_path=...)`, or load the "
            "model again without it."
        )


def is_positive_integer(value: object) -> bool:
    """Whether ``value`` is a positive Python integer (a bool is not, nor a float such as 2.0)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_sample_size(sample_size: object) -> None:
    """A `ValueError` naming ``sample_size`` unless it is a positive integer, a ``(height, width)`` pair of them or
    None (the config value the pipelines read the image size from)."""
    pair = isinstance(sample_size, (list, tuple)) and len(sample_size) == 2
    if (
        sample_size is not None
        and not is_positive_integer(sample_size)
        and not (pair and all(is_positive_integer(side) for side in sample_size))
    ):
        raise ValueError(
            f"`sample_size` must be a positive integer, a (height, width) pair of them or None, got {sample_size!r}."
        )


def sample_size_is(sample_size: object, side: int) -> bool:
    """Whether a config's ``sample_size`` (one side, or a ``[height, width]`` pair) gives ``side`` x ``side``
    samples.

    Example:

    ```py
    >>> sample_size_is(16, 16), sample_size_is([16, 16], 16), sample_size_is([16, 8], 16), sample_size_is(8, 16)
    (True, True, False, False)

    ```
    """
    sides = list(sample_size) if isinstance(sample_size, (list, tuple)) else [sample_size, sample_size]
    return sides == [side, side]


def is_integer_tensor(value: object) -> bool:
    """Whether ``value`` is a tensor of integers (class labels): not floating-point, complex or bool."""
    return torch.is_tensor(value) and not (
        value.is_floating_point() or value.is_complex() or value.dtype == torch.bool
    )


def check_sample(
    sample: torch.Tensor,
    in_channels: int | None,
    multiple_of: int = 1,
    size: int | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Check a model's ``sample``: a floating-point ``(batch, in_channels, height, width)`` tensor, ``batch >= 1``,
    with height and width multiples of ``multiple_of`` (``2**downsamplings`` for a U-Net), or both ``size``, and of
    ``dtype`` (the `compute_dtype` of the layer that reads it) unless `torch.autocast` is on for its device (mixed
    precision casts it there). With ``in_channels=None`` (a container whose members check the rest) only the dtype
    and the batch are checked."""
    if not torch.is_tensor(sample) or not sample.is_floating_point():
        got = f"dtype {sample.dtype}" if torch.is_tensor(sample) else type(sample).__name__
        raise ValueError(f"`sample` must be a floating-point tensor, got {got}.")
    if dtype is not None and sample.dtype != dtype and not _autocasting(sample.device):
        raise ValueError(
            f"`sample` must have the model's dtype {dtype}, got {sample.dtype}: cast it (`sample.to(model.dtype)`), "
            "or run the model under `torch.autocast`."
        )
    shape = tuple(sample.shape)
    if in_channels is None:
        if sample.ndim == 0 or shape[0] < 1:
            raise ValueError(f"`sample` must have shape (batch, ...) with batch >= 1, got {shape}.")
        return
    if sample.ndim != 4 or shape[1] != in_channels or shape[0] < 1:
        raise ValueError(f"`sample` must have shape (batch, {in_channels}, height, width), batch >= 1, got {shape}.")
    if size is not None and shape[2:] != (size, size):
        raise ValueError(f"`sample` must be {size}x{size} (the model's `sample_size`), got shape {shape}.")
    if any(side % multiple_of for side in shape[2:]):
        raise ValueError(
            f"`sample`'s height and width must be multiples of {multiple_of} (the model halves them "
            f"{multiple_of.bit_length() - 1} times), got shape {shape}."
        )


def _autocasting(device: torch.device) -> bool:
    """Whether `torch.autocast` is on for ``device``'s type (never for a type autocast does not know, such as
    ``meta``, where torch raises)."""
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:
        return False


def check_encoder_hidden_states(states: torch.Tensor, batch: int, width: int | Sequence[int]) -> None:
    """Check a cross-attention model's ``encoder_hidden_states``: a floating-point ``(batch, tokens, width)`` tensor
    (``width`` the model's ``cross_attention_dim``; not checked when it is one per block)."""
    shape = tuple(states.shape) if torch.is_tensor(states) else None
    width_ok = not isinstance(width, int) or (shape is not None and shape[-1] == width)
    if shape is None or not states.is_floating_point() or len(shape) != 3 or shape[0] != batch or not width_ok:
        got = f"shape {shape}, dtype {states.dtype}" if shape is not None else type(states).__name__
        expected = width if isinstance(width, int) else "width"
        raise ValueError(
            f"`encoder_hidden_states` must be a floating-point tensor of shape ({batch}, tokens, {expected}): one text "
            f"encoding per sample, as wide as the model's `cross_attention_dim`; got {got}."
        )


def per_sample_timesteps(
    timestep: torch.Tensor | float, batch: int, device: torch.device, check_values: bool
) -> torch.Tensor:
    r"""
    Check ``timestep`` (a number, or a tensor of one value or one per sample) and return one timestep per sample,
    shape ``(batch,)``, on ``device``. Python integers become ``long`` (as in `UNet2DModel`), other numbers float64
    (as in `UNet2DConditionModel`; float32 on Apple's MPS, which has none: `exact_float`), so that the routing sees
    the value the caller gave (in float32, 441.99999 would be 442.0, across a boundary at 442); tensors keep their
    dtype. With ``check_values`` the values must also be finite (a host read).

    Example:

    ```py
    >>> import torch
    >>> from diffusers_stages.models.checks import per_sample_timesteps
    >>> per_sample_timesteps(torch.tensor(7), 3, torch.device("cpu"), check_values=True).tolist()
    [7, 7, 7]

    ```
    """
    if torch.is_tensor(timestep):
        if timestep.dtype == torch.bool or timestep.is_complex():
            raise ValueError(f"`timestep` must hold real numbers, got dtype {timestep.dtype}.")
        if timestep.ndim > 1 or timestep.numel() not in (1, batch):
            raise ValueError(
                f"`timestep` must be one value or one per sample ({batch}): a number, or a tensor of shape (), (1,) "
                f"or ({batch},), got shape {tuple(timestep.shape)}."
            )
        timesteps = timestep.to(device)
    elif isinstance(timestep, numbers.Real) and not isinstance(timestep, bool):
        integral = isinstance(timestep, numbers.Integral)
        # under torch.compile a number that changes between calls is symbolic: `math.isfinite` of it would break
        # the graph (fullgraph=True: an error), so it is checked eagerly only (an integer always is finite)
        if not integral and not torch.compiler.is_compiling() and not math.isfinite(timestep):
            raise ValueError(f"`timestep` must be finite, got {timestep}.")
        dtype = torch.long if integral else exact_float(device)
        timesteps = torch.tensor(timestep, dtype=dtype, device=device)
    else:
        raise ValueError(f"`timestep` must be a number or a tensor, got {type(timestep).__name__}.")
    if check_values and timesteps.is_floating_point() and not bool(torch.isfinite(timesteps).all()):
        raise ValueError(f"`timestep` must be finite, got {_preview(timesteps)}.")
    return timesteps.reshape(-1).expand(batch).contiguous()  # a real tensor: bucketize warns on expanded views


def check_table_timesteps(timesteps: torch.Tensor, table_size: int, check_values: bool) -> None:
    """Check the per-sample ``timesteps`` of a learned time embedding (``time_embedding_type="learned"``: one table
    row per training timestep): integer indices, and (with ``check_values``, a host read) in ``[0, table_size)``."""
    if timesteps.is_floating_point():
        raise ValueError(
            f"`timestep` must be integer training timesteps for a learned time embedding (one table row each), got "
            f"dtype {timesteps.dtype}."
        )
    if check_values and bool(((timesteps < 0) | (timesteps >= table_size)).any()):
        raise ValueError(
            f"`timestep` must lie in [0, {table_size}) for a learned time embedding of {table_size} rows "
            f"(`num_train_timesteps`), got {_preview(timesteps)}."
        )


def check_class_labels(
    class_labels: torch.Tensor | None,
    batch: int,
    conditional: bool,
    num_labels: int | None,
    check_values: bool,
    one_hot: bool = False,
) -> None:
    r"""
    Check a model's ``class_labels``: given exactly when the model is class-conditional, and then one label or one
    per sample.

    Args:
        class_labels (`torch.Tensor`, *optional*): what the caller passed.
        batch (`int`): the number of samples.
        conditional (`bool`): whether the model has a class embedding.
        num_labels (`int`, *optional*): labels are int64 (or int32: what an embedding table takes) indices in
            ``[0, num_labels)``; `None` when the model embeds labels some other way (``class_embed_type``
            ``"timestep"`` or ``"identity"``): only their presence and count are checked.
        check_values (`bool`): check that indices lie in range (a host read; see the module docstring).
        one_hot (`bool`): floating-point rows of width ``num_labels - 1`` (EDM's one-hot labels, the last index
            meaning "no class") are accepted as well.
    """
    if class_labels is None:
        if conditional:
            raise ValueError("`class_labels` must be given: this model is class-conditional.")
        return
    if not conditional:
        raise ValueError("`class_labels` were given, but this model has no class embedding (`num_class_embeds`).")
    if not torch.is_tensor(class_labels):
        raise ValueError(f"`class_labels` must be a tensor, got {type(class_labels).__name__}.")
    shape = tuple(class_labels.shape)
    if class_labels.ndim > 0 and shape[0] not in (1, batch):
        raise ValueError(f"`class_labels` must hold one label or one per sample ({batch}), got shape {shape}.")
    if num_labels is None:
        return
    if one_hot and class_labels.is_floating_point():
        if class_labels.ndim != 2 or shape[1] != num_labels - 1:
            raise ValueError(
                f"`class_labels` given as one-hot rows must have shape ({batch}, {num_labels - 1}), got {shape}."
            )
        return
    rows = f", or one-hot rows of width {num_labels - 1}" if one_hot else ""
    if not is_integer_tensor(class_labels):
        raise ValueError(f"`class_labels` must be integer class indices{rows}, got dtype {class_labels.dtype}.")
    if not one_hot and class_labels.dtype not in INDEX_DTYPES:
        raise ValueError(
            f"`class_labels` must be int64 (or int32) class indices, got dtype {class_labels.dtype}: pass "
            "`class_labels.long()`."
        )
    if class_labels.ndim > 1:
        raise ValueError(f"`class_labels` must be class indices of shape ({batch},){rows}, got shape {shape}.")
    if check_values and bool(((class_labels < 0) | (class_labels >= num_labels)).any()):
        raise ValueError(f"`class_labels` must be class indices in [0, {num_labels}), got {_preview(class_labels)}.")
