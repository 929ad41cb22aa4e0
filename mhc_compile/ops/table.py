"""The table of ``mhc::`` ops: one :class:`MHCOp` entry per fused op, read by everything that
needs to know the ops (``ops/custom.py`` registers them from it; ``passes/rewrite.py`` names
their outputs; ``passes/recompute.py`` finds them and the streams they produce in the joint
graph; ``diagnostics.record_streams`` finds where streams enter a site).

Per op: its name (``mhc::<name>`` and ``mhc::<name>_backward``), its outputs (by name, which also
fixes their shapes for the fake implementation), the tensor inputs its autograd saves (the
backward returns one gradient each) and the outputs it saves too (the boundary's X', which is
site l+1's X and kept by its consumers anyway; the backward recomputes the rest), and its
implementations as ``mhc_compile``-relative dotted paths: the plain-torch reference, the Triton
kernels (``kernels/``) and the fused C++ CPU kernels (``kernels_cpu/launch.py``), forward and
backward, plus the Triton launchers that do the op's backward work (``backward_kernels``: what
its Triton backward chains, and for ops of a site with a gradient mailbox, ``site_grad.py``, the
site's coeffs launchers that take over their dX and pre's dH_pre). Paths are imported on first use, so
reading the table imports neither Triton nor the CPU extension.

A new fused op: its kernel file(s), its reference functions, one entry here, and its forward /
backward / autograd functions in ``ops/custom.py`` registered with one ``register`` call (plus
the public wrapper in ``ops/__init__.py`` the rewrite emits).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..reference import compute_dtype

# Output names and their shapes, for x of shape (..., n, C) (see ``fake_outputs``)
STREAMS = "x"          # (..., n, C), dtype of x: the streams after the op
COEFFICIENTS = ("h_pre", "h_post", "h_res")  # (..., n), (..., n), (..., n, n) in the compute dtype
BRANCH_INPUT = "h_in"  # (..., C), dtype of x: what f reads
IMPLS = ("reference", "triton", "cpu")


@dataclass(frozen=True)
class MHCOp:
    """One ``mhc::`` op. ``reference``/``triton``/``cpu``: (forward, backward) dotted paths
    relative to ``mhc_compile``; ``site_entry``: where the streams entering a site show
    (``"input"``: argument 0; ``"output"``: the op's streams output, which enter the next site).
    ``saved_outputs``: (output, backward argument) pairs: outputs the autograd saves after the
    ``saved`` inputs, handed to ``mhc::<name>_backward`` as that optional argument (None there:
    recomputed). ``backward_kernels``: dotted paths of the Triton launchers that serve the
    backward (see the module docstring)."""

    name: str
    outputs: tuple[str, ...]
    saved: tuple[str, ...]
    reference: tuple[str, str]
    triton: tuple[str, str]
    cpu: tuple[str, str]
    site_entry: Optional[str] = None
    saved_outputs: tuple[tuple[str, str], ...] = ()
    backward_kernels: tuple[str, ...] = ()

    @property
    def qualname(self) -> str:
        return f"mhc::{self.name}"

    @property
    def stream_out(self) -> Optional[int]:
        """Index of the output that holds the new streams; None for an op that produces none."""
        return self.outputs.index(STREAMS) if STREAMS in self.outputs else None

    @property
    def node_names(self) -> tuple[str, ...]:
        """The names the rewrite gives the op's output nodes (``mhc_h_pre``, ``mhc_x``, ...)."""
        return tuple(f"mhc_{o}" for o in self.outputs)

    @property
    def coefficient_outputs(self) -> tuple[int, ...]:
        """Indices of the (h_pre, h_post, h_res) outputs (what ``record_coeffs`` records)."""
        return tuple(i for i, o in enumerate(self.outputs) if o in COEFFICIENTS)

    def function(self, impl: str, backward: bool = False) -> Callable:
        """The ``impl`` ("reference", "triton" or "cpu") forward, or backward, function."""
        if impl not in IMPLS:
            raise ValueError(f"{self.qualname}: impl={impl!r}; expected one of {IMPLS}")
        return _resolve(getattr(self, impl)[int(backward)])

    def backward_launchers(self) -> tuple[Callable, ...]:
        """The Triton launchers of ``backward_kernels``, resolved."""
        return tuple(_resolve(p) for p in self.backward_kernels)

    def op(self, backward: bool = False):
        """The registered ``torch.ops.mhc`` overload packet."""
        return getattr(torch.ops.mhc, self.name + ("_backward" if backward else ""))


def _resolve(path: str) -> Callable:
    # looked up on every call (the module import is cached by Python), like the function-level
    # imports this replaces: a kernel launcher patched on its module (tests' spies) is the one run
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(f"mhc_compile.{module}"), attr)


_COEFF_INPUTS = ("phi", "alpha", "b_pre", "b_post", "b_res")
# the coeffs backward's two passes over X (kernels/coeffs.py): dh (recompute, dH_pre of a pre-mix
# handed over through the site mailbox) and gx (dX with the other consumers' parts, and gphi)
_DH, _GX = "kernels.coeffs.dh_pass", "kernels.coeffs.x_pass"

OPS: dict[str, MHCOp] = {op.name: op for op in (
    MHCOp("coeffs", outputs=COEFFICIENTS, saved=("x", *_COEFF_INPUTS),
          reference=("reference.coeffs", "reference.coeffs_backward"),
          triton=("kernels.coeffs.coeffs_forward", "kernels.coeffs.coeffs_backward"),
          cpu=("kernels_cpu.launch.coeffs_forward", "kernels_cpu.launch.coeffs_backward"),
          backward_kernels=(_DH, _GX)),
    MHCOp("pre", outputs=(BRANCH_INPUT,), saved=("x", "h_pre"),
          reference=("reference.pre_mix", "reference.pre_mix_backward"),
          triton=("kernels.pre.pre_forward", "kernels.pre.pre_backward"),
          cpu=("kernels_cpu.launch.pre_forward", "kernels_cpu.launch.pre_backward"),
          site_entry="input",
          # without a mailbox its own kernel; with one, dX = H_pre g in the site's gx pass and,
          # when the site's coeffs backward runs in the same pass, dH_pre in its dh pass
          backward_kernels=("kernels.pre.pre_backward", _DH, _GX)),
    MHCOp("post_res", outputs=(STREAMS,), saved=("x", "h_out", "h_post", "h_res"),
          reference=("reference.post_res_mix", "reference.post_res_mix_backward"),
          triton=("kernels.post_res.post_res_forward", "kernels.post_res.post_res_backward"),
          cpu=("kernels_cpu.launch.post_res_forward", "kernels_cpu.launch.post_res_backward"),
          # with a mailbox, dX = H_res^T g in the site's gx pass (or the previous boundary's mix pass)
          backward_kernels=("kernels.post_res.post_res_backward", _GX, "kernels.boundary_bwd.post_res_pass")),
    # post_res of site l fused with coeffs and pre of site l+1 (adjacent dynamic sites)
    MHCOp("boundary", outputs=(STREAMS, *COEFFICIENTS, BRANCH_INPUT),
          saved=("x", "h_out", "h_post", "h_res", *_COEFF_INPUTS),
          reference=("reference.boundary", "reference.boundary_backward"),
          triton=("kernels.boundary.boundary_forward", "kernels.boundary.boundary_backward"),
          cpu=("kernels_cpu.launch.boundary_forward", "kernels_cpu.launch.boundary_backward"),
          site_entry="output",
          saved_outputs=((STREAMS, "x_next"),),
          # two passes (kernels/boundary_bwd.py): dh over the saved X' (site l+1's coefficients, its
          # pre-mix's dH_pre), then dX' (never written) and site l's post_res backward, which at
          # n >= 4 recomputes X' from the X and h_out tiles it reads instead of reading X'; gphi
          backward_kernels=(_DH, "kernels.boundary_bwd.post_res_pass", _GX)),
)}

STREAM_OPS = tuple(name for name, op in OPS.items() if op.stream_out is not None)


def fake_outputs(op: MHCOp, x: torch.Tensor):
    """Empty outputs of ``op`` for streams ``x`` (its fake implementation): a tensor for a
    one-output op, else a tuple."""
    lead, n, c = x.shape[:-2], x.shape[-2], x.shape[-1]
    cd = compute_dtype(x.dtype)
    shapes = {STREAMS: None, "h_pre": ((*lead, n), cd), "h_post": ((*lead, n), cd),
              "h_res": ((*lead, n, n), cd), BRANCH_INPUT: ((*lead, c), x.dtype)}
    outs = tuple(torch.empty_like(x, memory_format=torch.contiguous_format) if shapes[o] is None
                 else x.new_empty(shapes[o][0], dtype=shapes[o][1]) for o in op.outputs)
    return outs[0] if len(outs) == 1 else outs
