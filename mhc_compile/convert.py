"""``mhc_compile.convert`` and ``mhc_compile.find_residuals``, the public face of the one
conversion pipeline (``pipeline.py``: capture, analysis, the blocks or whole-graph form).

``convert`` adds what a user of the function gets beyond the pipeline: the warning for a model
without residual sites, and on a ``transformers.PreTrainedModel`` a ``save_pretrained`` that writes
an ``mhc_compile.load``-able directory (``io.pretrained``). This module sits above ``io``, which
calls the pipeline, never this module. ``MHCCaptureError`` stays importable from here; the two
mode modules are named here by pickles of converted graph modules.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

from torch import nn

from .capture import MHCCaptureError  # noqa: F401 (public here too)
from .config import MHCConfig
from .io.pretrained import bind_save_pretrained, is_pretrained
from .mode_switch import _ModeBatchNorm, _ModeDropout  # noqa: F401 (pickles name them here)
from .passes.rewrite import ParamProvider
from .pipeline import find_residuals, run  # noqa: F401 (find_residuals: public here)


def convert(
    model: nn.Module,
    config: Optional[MHCConfig] = None,
    example_inputs: Any = None,
    *,
    example_kwargs: Optional[dict] = None,
    param_provider: Optional[ParamProvider] = None,
    inplace: bool = False,
    form: str = "auto",
) -> nn.Module:
    """Return ``model`` with its residual streams turned into n-stream mHC: the same class and
    module tree, the original state-dict keys plus the mHC parameters.

    ``example_inputs`` is a tuple of positional arguments (``example_kwargs`` optional keyword
    arguments, e.g. ``{"attention_mask": mask}``). ``inplace=True`` converts ``model`` itself;
    otherwise a converted copy is returned and ``model`` is not changed (the capture reads the
    model, the copy is made once, after it).

    ``form``: ``"blocks"`` makes the modules that hold a chain's sites carry the n streams (they
    take and return ``(..., n, C)``; the chain's first block expands, its last collapses), so
    per-block FSDP2, checkpointing and ``torch.compile`` work; ``"whole-graph"`` keeps the
    class but runs the rewritten whole graph as ``forward``; ``"auto"`` (default) is blocks when
    every chain can cross its blocks, else whole-graph with the reason in
    ``converted.mhc_report.form_reason``. The report is ``converted.mhc_report``. A model without
    residual sites is returned unchanged with a warning; a model that cannot be captured raises
    :class:`MHCCaptureError`.
    """
    from .capture import _as_tuple

    config = MHCConfig.from_options(config)
    args, kwargs = _as_tuple(example_inputs), dict(example_kwargs or {})
    conversion = run(model, config, args, kwargs, param_provider=param_provider, inplace=inplace, form=form)
    if not conversion.rewritten:
        report = conversion.report
        if not report.native:
            reasons = "; ".join(f"{t.node}: {t.reason}" for t in report.not_taken[:5])
            warnings.warn(
                f"mhc_compile.convert: no residual site found in {type(model).__name__}; returning the model unchanged"
                + (f" (adds not taken: {reasons})" if reasons else " (it has no add of x + f(x))"),
                stacklevel=2,
            )
        return model
    target = conversion.converted
    if is_pretrained(target):
        bind_save_pretrained(target, conversion.call)
    return target
