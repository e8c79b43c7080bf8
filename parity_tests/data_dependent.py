"""The host syncs of a step, seen on the CPU: the operators whose result the host must wait for.

On CUDA, ``torch.cuda.set_sync_debug_mode`` reports each host sync (``test_host_meta.py::
test_training_step_host_syncs``). On the CPU nothing syncs, but the same calls are still made, and they are the
operators whose output size or value the host reads (``DataDependentOps`` records each one, forward and backward,
with the Python line that made it)::

    aten.nonzero, aten.masked_select, boolean indexing and index_put      output size from the data
    aten._local_scalar_dense, aten.is_nonzero, aten.equal, Tensor.tolist  .item(), bool(t), torch.equal, .tolist()
    aten.repeat_interleave.Tensor without output_size                     output size from the repeats

A step that records none of them makes no host sync on CUDA either, for the same reason; the converse is
checked on the GPU.
"""

from __future__ import annotations

import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["DataDependentOps"]

_ALWAYS = {"nonzero", "masked_select", "_local_scalar_dense", "is_nonzero", "equal", "unique", "_unique2", "unique_consecutive"}
_BOOL_INDEX = {"index", "index_put", "index_put_", "_index_put_impl_"}


def _site() -> str:
    """The innermost Python frame outside torch and this file: ``transformers/models/.../x.py:123``."""
    for frame in reversed(traceback.extract_stack()):
        name = frame.filename
        if name == __file__ or "/torch/" in name:
            continue
        for anchor in ("/transformers/", "/qwenvl/", "/parity_tests/"):
            if anchor in name:
                return anchor.strip("/") + "/" + name.split(anchor, 1)[1] + f":{frame.lineno}"
        return f"{name}:{frame.lineno}"
    return "autograd engine"


def _tensors(values):
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (tuple, list)):
            yield from _tensors(value)


class DataDependentOps(TorchDispatchMode):
    """Records ``(operator, site)`` of every data-dependent operator run inside it (module docstring).

    ``host``: tensors that stay on the host when the model runs on CUDA (``HostMeta.grids``); an operator whose
    tensors all share their storage, or were computed from such tensors only, is not a sync there and is not
    recorded.
    """

    def __init__(self, host=()) -> None:
        super().__init__()
        self.seen: list[tuple[str, str]] = []
        self._host = {t.untyped_storage().data_ptr() for t in host}

    def __enter__(self):
        # Tensor.tolist reads the data without dispatching an operator: seen by wrapping it while the mode is on
        real, mode = torch.Tensor.tolist, self

        def tolist(tensor):
            if not mode._on_host((tensor,), {}):
                mode.seen.append(("tolist", _site()))
            return real(tensor)

        self._real_tolist, torch.Tensor.tolist = real, tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._real_tolist
        return super().__exit__(*exc)

    def _on_host(self, args, kwargs) -> bool:
        tensors = list(_tensors([*args, *kwargs.values()]))
        return bool(tensors) and all(t.untyped_storage().data_ptr() in self._host for t in tensors)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._overloadpacket.__name__
        flagged = name in _ALWAYS
        if name in _BOOL_INDEX:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            flagged = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())
        elif name == "repeat_interleave":
            flagged = isinstance(args[0], torch.Tensor) and kwargs.get("output_size") is None and (len(args) < 3 or args[2] is None)
        on_host = self._on_host(args, kwargs)
        if flagged and not on_host:
            self.seen.append((name, _site()))
        out = func(*args, **kwargs)
        if on_host:  # computed from host tensors only: on the host too
            self._host.update(t.untyped_storage().data_ptr() for t in _tensors([out]))
        return out
