"""Fixtures of the model tests."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# what reading a tensor value on the host dispatches to (`.item()`, `bool(tensor)`, `if tensor:`): a device
# synchronisation on an accelerator, and a data-dependent branch (graph break) under `torch.compile`
HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default}


class _HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.reads.append(func)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def host_reads():
    """``host_reads(fn)``: call ``fn()`` and return the number of tensor values it read on the host."""

    def count(fn) -> int:
        with _HostReads() as mode:
            fn()
        return len(mode.reads)

    return count
