"""Byte and launch counter for the mHC ops, measured through the Triton interpreter (no GPU).

Owns the counting machinery of ``benchmarks/bench_bytes.py``:

* **Triton kernels**: while a :class:`ByteCounter` is open, every interpreted launch is counted
  (kernel name), and every ``tl.load`` / ``tl.store`` adds the bytes of its *active* lanes (the
  mask respected; a masked-off lane moves nothing) to the tensor it touches. This wraps the
  interpreter's ``InterpreterBuilder.create_masked_load`` / ``create_masked_store`` (``tl.load``
  without a mask goes through them too) and ``GridExecutor.__call__``: private triton internals,
  kept here alone; ``tests/test_bench_bytes.py::test_counter_hooks_triton_interpreter`` fails
  loudly when a triton upgrade moves them. Atomics and tensor-descriptor loads/stores are not
  counted, so they raise while the counter is open (no silent undercount).
* **torch ops between the kernels**: a ``TorchDispatchMode`` counts every aten op outside the
  kernels (the autograd engine's gradient adds, zero-filled gradients, clones; and inside an
  ``mhc::`` op's implementation, its partial sums, dtype copies, ``contiguous``) with the bytes of
  its tensor inputs and outputs. Views, aliases and allocations (``empty``) move no bytes and
  launch nothing; fills (``zeros``) count their output only; in-place ops count what they read
  and write. The interpreter's own host copies around a launch are not counted.

Every byte is attributed to one tensor and classified by its size: with ``T`` tokens and ``C``
channels (pick ``C`` above every coefficient width, 2n + n^2 and the logit tile W, and a T that
divides no parameter size), a tensor of ``numel = k * T`` elements is *per token*: *stream-sized*
when ``k >= C`` (X, h_in, dX, ...; reported in units of C * e per token), *coefficient-sized*
otherwise (H_pre, dp, partials per token; bytes per token). Any other tensor (phi, its gradient
partials, per-block partials) is *per call*. Nothing here launches a kernel of its own.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch

from mhc_compile._torch_internals import dispatch_mode_base

TorchDispatchMode = dispatch_mode_base()

# aten ops that allocate (no bytes, no launch) and fills (output bytes only)
_ALLOC = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "empty_permuted"}
_FILL = {"zeros", "zeros_like", "new_zeros", "ones", "ones_like", "new_ones", "full", "full_like", "new_full",
         "fill_", "zero_", "scalar_tensor"}


def _tensors(obj) -> list:
    """Tensors in nested lists, tuples and dicts (an aten call's arguments or results)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


@dataclass
class Tally:
    """Bytes by class and launches by kind, of one counted region."""

    T: int
    C: int
    stream: int = 0        # bytes of stream-sized per-token tensors
    coeff: int = 0         # bytes of coefficient-sized per-token tensors
    per_call: int = 0      # bytes of tensors whose size does not scale with T
    triton: int = 0        # Triton launches
    torch: int = 0         # torch ops that move bytes (each one kernel on a GPU)
    kernels: list = field(default_factory=list)   # launch names in order ("triton:<fn>" / "torch:<op>")
    detail: dict = field(default_factory=dict)    # launch name -> stream bytes

    def add(self, numel: int, nbytes: int, where: str) -> None:
        if numel % self.T == 0 and numel // self.T >= self.C:
            self.stream += nbytes
            self.detail[where] = self.detail.get(where, 0) + nbytes
        elif numel % self.T == 0:
            self.coeff += nbytes
        else:
            self.per_call += nbytes

    def units(self, elem: int) -> float:
        """Stream bytes per token in units of C * elem."""
        return self.stream / (self.T * self.C * elem)


# ============================================================================ triton hooks
def _interpreter():
    """The interpreter classes the counter wraps (private triton internals)."""
    from triton.runtime import interpreter

    return interpreter.InterpreterBuilder, interpreter.GridExecutor


_REFUSED = ("create_atomic_rmw", "create_atomic_cas", "create_descriptor_load", "create_descriptor_store")


class ByteCounter:
    """Context manager: count bytes and launches of everything run inside it (see the module doc).

        with ByteCounter(T, C) as tally:
            out = torch.ops.mhc.pre(x, h, "triton")
        tally.units(x.element_size()), tally.triton, tally.torch
    """

    _active: "ByteCounter | None" = None

    def __init__(self, T: int, C: int):
        self.tally = Tally(T, C)
        self._ranges: list = []        # (start, end, numel, elem) of the running launch's tensors
        self._launch = None            # name of the running Triton launch
        self._stack = contextlib.ExitStack()

    # ---- triton
    def _attribute(self, ptrs: np.ndarray, mask: np.ndarray, elem: int) -> None:
        active = np.broadcast_to(mask, ptrs.shape)
        count = int(np.count_nonzero(active))
        if count == 0:
            return
        addr = int(np.min(ptrs[active]))
        for start, end, numel, _ in self._ranges:
            if start <= addr < end:
                self.tally.add(numel, count * elem, f"triton:{self._launch}")
                return
        raise RuntimeError(f"{self._launch}: a load/store at {addr:#x} touches no tensor argument")

    def _patch_triton(self) -> None:
        builder, executor = _interpreter()
        counter = self
        orig_load, orig_store = builder.create_masked_load, builder.create_masked_store
        orig_call = executor.__call__

        # (ptrs, mask, ...) and (ptrs, value, mask, ...): the cache arguments after them differ
        # between triton versions (3.6: cache_modifier, eviction_policy; 3.9: cache_policy)
        def load(b, ptrs, mask, *rest, **kw):
            counter._attribute(ptrs.data, mask.data, ptrs.get_element_ty().primitive_bitwidth // 8)
            return orig_load(b, ptrs, mask, *rest, **kw)

        def store(b, ptrs, value, mask, *rest, **kw):
            counter._attribute(ptrs.data, mask.data, ptrs.get_element_ty().primitive_bitwidth // 8)
            return orig_store(b, ptrs, value, mask, *rest, **kw)

        def call(ex, *args, **kwargs):
            name = getattr(ex.fn, "__name__", "kernel")
            counter._ranges = [
                (a.data_ptr(), a.data_ptr() + a.numel() * a.element_size(), a.numel(), a.element_size())
                for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)
            ]
            counter.tally.triton += 1
            counter.tally.kernels.append(f"triton:{name}")
            counter._launch = name
            try:
                return orig_call(ex, *args, **kwargs)
            finally:
                counter._launch = None
                counter._ranges = []

        def refuse(name):
            def fn(*a, **k):
                raise NotImplementedError(f"bytecount does not count {name}; extend benchmarks/bytecount.py")
            return fn

        patches = [(builder, "create_masked_load", load), (builder, "create_masked_store", store),
                   (executor, "__call__", call)] + [(builder, n, refuse(n)) for n in _REFUSED]
        for owner, attr, fn in patches:
            old = getattr(owner, attr)
            setattr(owner, attr, fn)
            self._stack.callback(setattr, owner, attr, old)

    # ---- torch
    def _torch_op(self, name: str, inputs, outputs, mutated: bool) -> None:
        """Count one torch op given its flat inputs and outputs."""
        if self._launch is not None:
            return  # the interpreter's own host copies around a launch
        base = name.split(".")[0]
        ins, outs = inputs, outputs
        if not outs or base in _ALLOC:
            return
        in_storages = {t.untyped_storage().data_ptr() for t in ins}
        if not mutated and all(o.untyped_storage().data_ptr() in in_storages for o in outs):
            return  # a view or a no-op (contiguous of a contiguous tensor, .to of the same dtype)
        moved = outs if base in _FILL else ins + outs
        where = f"torch:{base}"
        self.tally.torch += 1
        self.tally.kernels.append(where)
        for t in moved:
            self.tally.add(t.numel(), t.numel() * t.element_size(), where)

    def __enter__(self) -> Tally:
        if ByteCounter._active is not None:
            raise RuntimeError("ByteCounter is not reentrant")
        import os

        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise RuntimeError("ByteCounter counts interpreted Triton launches: set TRITON_INTERPRET=1 before importing triton")
        self._patch_triton()
        if not hasattr(torch.library, "get_kernel"):
            raise RuntimeError("ByteCounter needs torch.library.get_kernel (torch >= 2.10)")
        self._stack.enter_context(_AtenMode(self))
        ByteCounter._active = self
        self._stack.callback(setattr, ByteCounter, "_active", None)
        return self.tally

    def __exit__(self, *exc) -> None:
        self._stack.close()


class _AtenMode(TorchDispatchMode):
    """Counts aten ops. An ``mhc::`` op is run through its CPU kernel (``torch.library.get_kernel``)
    with this mode pushed again, so the torch ops inside its implementation are counted too (the
    mode is popped while its handler runs, and calling the op itself would re-enter the handler)."""

    def __init__(self, counter: ByteCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "mhc":
            kernel = torch.library.get_kernel(func, "CPU")
            with self:
                return kernel.call_boxed(torch.DispatchKeySet(torch.DispatchKey.CPU), *args, **kwargs)
        out = func(*args, **kwargs)
        name = func.__name__
        mutated = name.split(".")[0].endswith("_") or "out" in kwargs
        self.counter._torch_op(name, _tensors((args, kwargs)), _tensors(out), mutated)
        return out
