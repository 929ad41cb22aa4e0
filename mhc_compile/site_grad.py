"""The gradient mailbox of one mHC site in eager autograd (used by ``mhc_compile.ops``).

A site's streams X feed three ops (coeffs, pre, post_res or the boundary into the next site).
Instead of letting autograd sum their three dX with two separate adds, pre and post_res/boundary
hand their part to the site's coeffs backward, which runs after both and writes one dX (a site
whose coefficients a boundary computed: to that boundary's backward, as part of its dX'). This
module owns the bookkeeping: which ops belong to one site (by identity of X and of the coeffs
call's outputs), what was handed over in the running backward pass, and its reset when the pass
ends (``_torch_internals.at_backward_end``). It knows nothing of kernels; ``ops`` does the math.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor

from ._torch_internals import at_backward_end, engine_will_run


class SiteGrad:
    """The gradient mailbox of one coeffs call: X (weak), its H_pre/H_post/H_res (weak), and
    the dX parts handed over in the running backward pass."""

    def __init__(self, x: Tensor, outs, takes_dh: bool = True) -> None:
        self.x = weakref.ref(x)
        self.outs = tuple(weakref.ref(o) for o in outs)
        self.takes_dh = takes_dh  # False: a boundary's next site (its backward sums no pre's dH_pre)
        self.clear()

    def clear(self) -> None:
        self.g_add = self.g_hin = self.h_pre = self.g_mix = self.h_mix = self.g_hpre = None
        self.queued = False

    # a copied or pickled coefficient tensor is no site's output: it carries no mailbox
    def __deepcopy__(self, memo) -> None:
        return None

    def __reduce__(self):
        return (type(None), ())

    def take(self) -> tuple:
        """(g_add, g_hin, h_pre, g_mix, h_mix, g_hpre) handed over so far; empties the box."""
        out = (self.g_add, self.g_hin, self.h_pre, self.g_mix, self.h_mix, self.g_hpre)
        self.g_add = self.g_hin = self.h_pre = self.g_mix = self.h_mix = self.g_hpre = None
        return out

    def pending(self) -> bool:
        return self.g_add is not None or self.g_hin is not None or self.g_mix is not None

    def reads(self, x: Tensor, **coeffs: Tensor) -> bool:
        """Whether an op on ``x`` with these coefficients (by name: h_pre, h_post, h_res) reads
        this site's X and coefficients."""
        idx = {"h_pre": 0, "h_post": 1, "h_res": 2}
        return self.x() is x and all(self.outs[idx[k]]() is t for k, t in coeffs.items())

    def open(self) -> bool:
        """Arm the end-of-pass reset; False (hand nothing over) when the hook is unavailable."""
        if not self.queued:
            self.queued = at_backward_end(self.clear)
        return self.queued

    def coeffs_will_run(self) -> bool:
        """Whether this pass runs the coeffs backward (so it can also compute pre's dH_pre)."""
        # the node runs when a node it feeds runs (or captures a gradient): asking about the node
        # itself would also say yes when only its output's gradient is captured (autograd.grad
        # of H_pre), which does not run it
        out = self.outs[0]() if self.takes_dh else None
        node = None if out is None else out.grad_fn
        return node is not None and any(engine_will_run(f) for f, _ in node.next_functions if f is not None)

    def add(self, g_add: Optional[Tensor] = None, g_hin: Optional[Tensor] = None, h_pre: Optional[Tensor] = None,
            g_mix: Optional[Tensor] = None, h_mix: Optional[Tensor] = None, owe_dh: bool = False) -> None:
        """Hand over a dX (g_add), the pre-mix's incoming gradient (g_hin with its H_pre; with
        ``owe_dh`` its gradient of H_pre too, sum_c g_hin X, which coeffs then adds from its own
        pass over X), or the post_res mix's (g_mix with its H_res; one per pass: a second post_res
        hands over g_add)."""
        if g_hin is not None and owe_dh:
            self.g_hpre = g_hin if self.g_hpre is None else self.g_hpre + g_hin
        if g_mix is not None:
            assert self.g_mix is None, "one post_res mix per site and pass"
            self.g_mix, self.h_mix = g_mix, h_mix
        if g_add is not None:
            self.g_add = g_add if self.g_add is None else self.g_add + g_add
        if g_hin is not None:
            self.g_hin = g_hin if self.g_hin is None else self.g_hin + g_hin
            self.h_pre = h_pre


def eager_needs_grad(x: Tensor) -> bool:
    """Plain eager tensors that need a gradient: where the site mailbox applies (``ops`` also
    requires the Triton kernels: the reference path keeps autograd's adds, bit for bit)."""
    return type(x) is torch.Tensor and x.requires_grad and not torch.compiler.is_compiling()


def site_of(x: Tensor, **coeffs: Tensor) -> Optional[SiteGrad]:
    """The mailbox of the coeffs call whose outputs ``coeffs`` are, if the op reads its X."""
    if not eager_needs_grad(x):
        return None
    box = getattr(next(iter(coeffs.values())), "_mhc_site_grad", None)
    return box if box is not None and box.reads(x, **coeffs) else None
