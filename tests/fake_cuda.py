"""A stand-in accelerator for a CPU-only torch: catches the defects that only show on a GPU.

Inside ``with fake_cuda():``, a tensor asked for on ``"cuda"`` (a factory's ``device=``, ``.to("cuda")``,
``.cuda()``, a module's or pipeline's ``.to("cuda")``) is a `CudaTagged` tensor: it computes on the CPU, with real
values, but is on another device than the CPU, and CUDA's rules are enforced, so that code that works on a CPU but
would fail on a GPU fails here:

- an op mixing a stand-in tensor with a CPU tensor raises `DeviceMismatch`, except where CUDA allows it: a 0-dim CPU
  tensor (a scalar), CPU indices of a stand-in tensor, copies between devices (``.to``, ``.cpu()``, ``copy_``);
- ``.numpy()`` of a stand-in tensor raises `TypeError` (as CUDA's "can't convert cuda:0 device type tensor");
- a CPU `torch.Generator` given to an op that draws on the stand-in device raises `DeviceMismatch` (diffusers'
  ``randn_tensor`` draws on the CPU, then moves: allowed).

Host reads (``.item()``, ``.tolist()``, ``bool(tensor)``) work, as on CUDA (where they synchronise).

Streams (``torch.cuda.Stream``, ``torch.cuda.stream``, ``torch.cuda.current_stream``, ``Tensor.record_stream``) are
stand-ins too, with CUDA's ordering rule enforced: a tensor made on one stream (a copy under
``with torch.cuda.stream(side):``) and read by an op on another raises `StreamRace`, unless the reading stream
waited for it (``wait_stream``, after the tensor was made) and the tensor was marked as used there
(``record_stream``, without which its memory may be reused while that stream still reads it).

Limits: the stand-in tensors report ``device.type == "meta"`` (a CPU-only torch has no device guard for "cuda",
which many ops ask for), so code that branches on a tensor's ``device.type == "cuda"`` (autocast) takes its other
branch (code that branches on the ``torch.device("cuda")`` it was given takes the CUDA one, streams included); and
autograd cannot run through stand-in tensors (no "cuda" gradient accumulator either): forwards, losses and
sampling, and training only of what stays on the CPU.
"""

from __future__ import annotations

import contextlib
import itertools

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

# the device the stand-in tensors report (see the limits above); asking for "cuda" or "meta" gives a stand-in tensor
CUDA = torch.device("meta")


class DeviceMismatch(RuntimeError):
    """An op that CUDA would refuse: tensors on different devices, or a CPU generator for a CUDA op."""


class StreamRace(RuntimeError):
    """A tensor read on another stream than the one that made it, without ``wait_stream`` and ``record_stream``."""


class FakeStream:
    """A stand-in CUDA stream: records which streams it waited for, and when (see the module docstring)."""

    def __init__(self, device=None, priority: int = 0):
        self.device, self.waited = device, {}

    def wait_stream(self, stream: FakeStream) -> None:
        self.waited[stream] = next(_STREAMS["clock"])

    def synchronize(self) -> None:  # the host waits: every stream may read what this one made so far
        _STREAMS["synchronized"][self] = next(_STREAMS["clock"])


# the stream ops run on (None outside `fake_cuda()`), one default stream for every block, and the order of events
_DEFAULT_STREAM = FakeStream()
_STREAMS = {"current": None, "clock": itertools.count(1), "synchronized": {}}


@contextlib.contextmanager
def _stream(stream: FakeStream | None):
    previous = _STREAMS["current"]
    _STREAMS["current"] = stream or previous
    try:
        yield
    finally:
        _STREAMS["current"] = previous


def _record_stream(tensor: torch.Tensor, stream: FakeStream) -> None:
    if isinstance(tensor, CudaTagged):
        tensor.origin["recorded"].add(stream)


def _check_streams(func, args, kwargs) -> None:
    """`StreamRace` for an input made on another stream than the current one, not waited for or not recorded."""
    current = _STREAMS["current"]
    for tensor in tree_flatten((args, kwargs))[0]:
        origin = getattr(tensor, "origin", None)
        if current is None or origin is None or origin["stream"] in (None, current):
            continue
        made = origin["time"]
        waited = max(current.waited.get(origin["stream"], 0), _STREAMS["synchronized"].get(origin["stream"], 0))
        if waited < made:
            raise StreamRace(f"{func}: reads a tensor made on another stream, with no `wait_stream` for it since")
        if current not in origin["recorded"]:
            raise StreamRace(f"{func}: reads a tensor made on another stream, with no `record_stream` for this one")


class CudaTagged(torch.Tensor):
    """A CPU tensor (``elem``) on the stand-in device, made on the stream ``origin["stream"]``."""

    elem: torch.Tensor
    origin: dict

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        out = torch.Tensor._make_wrapper_subclass(
            cls,
            elem.shape,
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            layout=elem.layout,
            device=CUDA,
            requires_grad=False,
        )
        out.elem = elem
        out.origin = {"stream": _STREAMS["current"], "time": next(_STREAMS["clock"]), "recorded": set()}
        return out

    def __repr__(self) -> str:
        return f"CudaTagged({self.elem!r})"

    def numpy(self, *args, **kwargs):
        raise TypeError(
            "can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to "
            "host memory first."
        )

    def tolist(self):
        return self.elem.tolist()  # a host read, as on CUDA

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        with _FakeCudaMode():
            return func(*args, **(kwargs or {}))


_COPIES = {  # ops that move data between devices by design
    torch.ops.aten._to_copy.default,
    torch.ops.aten.copy_.default,
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.lift_fresh.default,
    torch.ops.aten.detach.default,
    torch.ops.aten.alias.default,
}
_ALIASES = {torch.ops.aten.detach.default, torch.ops.aten.alias.default}  # ``.data``: no read, the same memory
_INDEXING = {
    torch.ops.aten.index.Tensor,
    torch.ops.aten.index_put_.default,
    torch.ops.aten.index_put.default,
    torch.ops.aten._index_put_impl_.default,
}


def _is_cuda(device) -> bool:
    return device is not None and not isinstance(device, int) and torch.device(device).type in ("cuda", "meta")


def _unwrap(value):
    return value.elem if isinstance(value, CudaTagged) else value


def _check_devices(func, args, kwargs) -> None:
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    if not any(isinstance(t, CudaTagged) for t in tensors) or func in _COPIES:
        return
    if func in _INDEXING:
        # CPU indices may index a CUDA tensor; the values written must be on its device (or 0-dim)
        self_, indices = args[0], args[1]
        others = [t for t in tensors if t is not self_ and not any(t is i for i in indices if i is not None)]
        if not isinstance(self_, CudaTagged):
            raise DeviceMismatch(f"{func}: indexing a CPU tensor with CUDA tensors")
        tensors = [self_, *others]
    cpu = [t for t in tensors if not isinstance(t, CudaTagged) and t.dim() > 0]
    if cpu:
        raise DeviceMismatch(
            f"{func}: expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu "
            f"(CPU tensors of shapes {[tuple(t.shape) for t in cpu]})"
        )


def _check_generator(func, args, kwargs, on_cuda: bool) -> None:
    generator = kwargs.get("generator")
    if on_cuda and generator is not None and generator.device.type not in ("cuda", "meta"):
        raise DeviceMismatch(f"{func}: expected a 'cuda' device type for generator but found 'cpu'")


class _FakeCudaMode(TorchDispatchMode):
    """Every op: the device checks, then the op on the CPU data, its outputs stand-in tensors when it runs there."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        _check_devices(func, args, kwargs)
        if func not in _ALIASES:
            _check_streams(func, args, kwargs)
        inputs_on_cuda = any(isinstance(t, CudaTagged) for t in tree_flatten((args, kwargs))[0])
        if "device" in kwargs:
            on_cuda = _is_cuda(kwargs["device"])
            if on_cuda:
                kwargs["device"] = torch.device("cpu")
        else:
            on_cuda = inputs_on_cuda
        _check_generator(func, args, kwargs, on_cuda)
        if func is torch.ops.aten._local_scalar_dense.default:
            return func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if func is torch.ops.aten.copy_.default:  # keep the destination (a wrapper) and copy into its data
            dst, src = args[0], args[1]
            _unwrap(dst).copy_(_unwrap(src), *args[2:], **kwargs)
            return dst
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if not on_cuda:
            return out
        # an in-place op returns its (wrapped) first argument
        if isinstance(out, torch.Tensor) and args and isinstance(args[0], CudaTagged) and out is args[0].elem:
            return args[0]
        out = tree_map(
            lambda t: CudaTagged(t) if isinstance(t, torch.Tensor) and not isinstance(t, CudaTagged) else t, out
        )
        if func in _ALIASES and isinstance(args[0], CudaTagged):  # the same memory: its stream and records
            out.origin = args[0].origin
        return out


def _wrap_outputs(out):
    return tree_map(lambda t: CudaTagged(t) if type(t) in (torch.Tensor, torch.nn.Parameter) else t, out)


class _FakeCudaFunctions(TorchFunctionMode):
    """Moves to "cuda" (``Tensor.to``/``.cuda()``, a factory's ``device=``) without reaching the CPU-only torch's
    CUDA runtime: the data stays on the CPU and is wrapped."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if torch.is_grad_enabled() and any(
            isinstance(t, CudaTagged) and t.requires_grad for t in tree_flatten((args, kwargs))[0]
        ):  # refused here: the CPU-only torch would abort the process building its gradient accumulator
            raise RuntimeError("fake_cuda: autograd through stand-in tensors is not supported")
        if func is torch.Tensor.to:
            device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args[1:], **kwargs)
            if _is_cuda(device):
                self_ = args[0]
                if isinstance(self_, CudaTagged) and dtype in (None, self_.dtype):
                    return self_
                moved = _unwrap(self_).to(dtype=dtype, copy=True)
                return CudaTagged(moved)
        elif func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and isinstance(args[0], CudaTagged):
            # CPU or CUDA index tensors may index a CUDA tensor (a CPU-only torch cannot index a "cuda" one itself)
            index = tree_map(_unwrap, args[1])
            if func is torch.Tensor.__getitem__:
                return CudaTagged(args[0].elem[index])
            value = args[2]
            advanced = any(isinstance(i, torch.Tensor) for i in tree_flatten(args[1])[0])
            if advanced and type(value) is torch.Tensor and value.dim() > 0:
                raise DeviceMismatch("index_put_: the values written into a CUDA tensor are on the CPU")
            args[0].elem[index] = _unwrap(value)
            return None
        elif func is torch.Tensor.cuda:
            return CudaTagged(_unwrap(args[0]).clone()) if not isinstance(args[0], CudaTagged) else args[0]
        elif _is_cuda(kwargs.get("device")) and func is not torch._C._nn._parse_to:  # a factory on "cuda"
            _check_generator(func, args, kwargs, on_cuda=True)
            kwargs["device"] = torch.device("cpu")
            return _wrap_outputs(func(*args, **kwargs))
        return func(*args, **kwargs)


@contextlib.contextmanager
def fake_cuda(grad: bool = False):
    """Within this block, ``"cuda"`` is the stand-in device (see the module docstring). Gradients are off, unless
    ``grad``: then autograd runs for what stays on the CPU (a model trained there on inputs from the device)."""
    lazy_init, overwrite = torch.cuda._lazy_init, torch.__future__.get_overwrite_module_params_on_conversion()
    streams = {"Stream": torch.cuda.Stream, "stream": torch.cuda.stream, "current_stream": torch.cuda.current_stream}
    record_stream = torch.Tensor.record_stream
    torch.cuda._lazy_init = lambda: None  # what ``.to("cuda")`` calls first on a CPU-only torch (it raises there)
    torch.__future__.set_overwrite_module_params_on_conversion(True)  # ``module.to("cuda")``: wrapped parameters
    torch.cuda.Stream, torch.cuda.stream = FakeStream, _stream
    torch.cuda.current_stream = lambda device=None: _STREAMS["current"]
    torch.Tensor.record_stream = _record_stream
    _STREAMS["current"] = _DEFAULT_STREAM
    try:
        with torch.set_grad_enabled(grad), _FakeCudaFunctions(), _FakeCudaMode():
            yield
    finally:
        torch.cuda._lazy_init = lazy_init
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
        for name, value in streams.items():
            setattr(torch.cuda, name, value)
        torch.Tensor.record_stream = record_stream
        _STREAMS["current"] = None
