"""Coefficient recording: :class:`record_coeffs` collects every site's (H_pre, H_post, H_res) as
the ops compute them (``mhc_compile.diagnostics`` reads them)."""
from __future__ import annotations

# Active coefficient recorders (see :func:`record_coeffs`); each is a list that receives
# (h_pre, h_post, h_res) detached, in execution order, from every coeffs computation.
_RECORDERS: list[list] = []


class record_coeffs:
    """Context manager: collect every site's (H_pre, H_post, H_res) computed while it is open.

    Works for converted models and for compiled ones (custom-op implementations run at run
    time even inside a compiled graph). Used by ``mhc_compile.diagnostics``.

        with ops.record_coeffs() as rec:
            model(x)
        rec  # [(h_pre, h_post, h_res), ...] in execution order
    """

    def __enter__(self) -> list:
        self.records: list = []
        _RECORDERS.append(self.records)
        return self.records

    def __exit__(self, *exc) -> None:
        _RECORDERS.remove(self.records)


def _record(outs):
    if _RECORDERS:
        detached = tuple(o.detach() for o in outs)
        for rec in _RECORDERS:
            rec.append(detached)
    return outs
