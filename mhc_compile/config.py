"""MHCConfig: the one configuration object of mhc-compile.

A frozen dataclass, validated on construction, in the style of torchao's quantisation
configs. ``MHCConfig.from_options`` builds it from the ``options`` dict that
``torch.compile(..., backend="mhc", options=...)`` passes through; unknown keys are
rejected with the list of valid ones.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional

VARIANTS = ("mhc", "hc")
INITS = ("preserve", "paper")
COLLAPSES = ("mean", "sum", "learned")
KERNELS = ("auto", "triton", "reference")
INNER_BACKENDS = ("inductor", "aot_eager", "eager")
GRAPH_BREAKS = ("error", "split")
MAX_STREAMS = 8


class MHCConfigError(ValueError):
    """A field of MHCConfig has a bad value, or an options dict has an unknown key."""


@dataclass(frozen=True)
class MHCConfig:
    """How a residual network is rewritten into n-stream manifold-constrained hyper-connections.

    Fields
    ------
    streams:          n, the number of residual streams (1 to 8).
    sinkhorn_iters:   Sinkhorn-Knopp iterations t_max (>= 1); each ends on the row normalisation.
    alpha_init:       initial value of the three gating scales alpha_pre, alpha_post, alpha_res.
    dynamic:          True: coefficients depend on each token (x . phi); False: biases only.
    variant:          "mhc" (sigmoid gates, Sinkhorn) or "hc" (unconstrained tanh hyper-connections).
    init:             "preserve" (converted model computes the original function at step 0)
                      or "paper" (xavier phi, zero biases: the from-scratch recipe).
    collapse:         how the n streams become one at the end of a chain: "mean", "sum", "learned".
    kernels:          "auto" (Triton on CUDA, reference on CPU), "triton" (also on CPU through
                      the Triton interpreter) or "reference" (plain torch everywhere).
    recompute:        drop mHC intermediates after forward and recompute them in backward.
    recompute_block:  L_r, sites per recompute block; None picks the paper's L_r* (near sqrt(n*L/(n+2))).
    eps:              epsilon inside the RMS of the flattened streams.
    fuse_boundaries:  fuse post_res of site l with coeffs+pre of site l+1 when adjacent.
    inner:            torch.compile backend that receives the rewritten graph ("inductor",
                      "aot_eager", "eager"); only used by the "mhc" backend.
    graph_breaks:     what the "mhc" backend does with a graph that holds residual sites and
                      ends or resumes at a graph break (its streams cannot cross the break):
                      "error" (MHCBackendError, the default) or "split" (each graph gets its
                      own chains, with an MHCGraphBreakWarning).
    """

    VERSION = 1  # of the to_dict() layout; from_dict refuses newer ones (class attribute, not a field)

    streams: int = 4
    sinkhorn_iters: int = 20
    alpha_init: float = 0.01
    dynamic: bool = True
    variant: str = "mhc"
    init: str = "preserve"
    collapse: str = "mean"
    kernels: str = "auto"
    recompute: bool = True
    recompute_block: Optional[int] = None
    eps: float = 1e-6
    fuse_boundaries: bool = True
    inner: str = "inductor"
    graph_breaks: str = "error"

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> MHCConfigError:
            return MHCConfigError(f"MHCConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("streams", "sinkhorn_iters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad(name, "must be an int")
        if not 1 <= self.streams <= MAX_STREAMS:
            raise bad("streams", f"must be between 1 and {MAX_STREAMS}")
        if self.sinkhorn_iters < 1:
            raise bad("sinkhorn_iters", "must be >= 1")
        for name in ("alpha_init", "eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(name, "must be a finite number")
        if self.eps <= 0:
            raise bad("eps", "must be > 0")
        for name in ("dynamic", "recompute", "fuse_boundaries"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be True or False")
        for name, allowed in (
            ("variant", VARIANTS),
            ("init", INITS),
            ("collapse", COLLAPSES),
            ("kernels", KERNELS),
            ("inner", INNER_BACKENDS),
            ("graph_breaks", GRAPH_BREAKS),
        ):
            if getattr(self, name) not in allowed:
                raise bad(name, f"must be one of {', '.join(map(repr, allowed))}")
        if self.recompute_block is not None:
            rb = self.recompute_block
            if isinstance(rb, bool) or not isinstance(rb, int) or rb < 1:
                raise bad("recompute_block", "must be None or an int >= 1")

    # ------------------------------------------------------------------ construction
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_options(cls, options: Optional[Mapping[str, Any]] = None) -> "MHCConfig":
        """Build from a torch.compile ``options`` dict (or an ``mhc.json``); unknown keys are errors.

        String values such as ``"4"``, ``"true"`` or ``"none"`` (from the command line) are
        coerced to the field's type.
        """
        if options is None:
            return cls()
        if isinstance(options, MHCConfig):
            return options
        if not isinstance(options, Mapping):
            raise MHCConfigError(f"mhc options must be a dict, got {type(options).__name__}")
        if "version" in options:  # a to_dict() (e.g. from mhc.json): check the version, drop the key
            _check_version(options["version"])
            options = {k: v for k, v in options.items() if k != "version"}
        valid = cls.field_names()
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise MHCConfigError(
                f"unknown mhc option(s) {', '.join(map(repr, unknown))}; valid options are: {', '.join(valid)}"
            )
        defaults = cls()
        kwargs = {k: _coerce(k, v, getattr(defaults, k)) for k, v in options.items()}
        return cls(**kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MHCConfig":
        """The inverse of :meth:`to_dict`: a dict from a newer mhc-compile (``version`` above
        :attr:`VERSION`) or with unknown keys is refused with an error naming them. A dict
        without ``version`` (mhc-compile 0.1's mhc.json) is read as version 1."""
        if not isinstance(data, Mapping):
            raise MHCConfigError(f"an MHCConfig dict must be a dict, got {type(data).__name__}")
        return cls.from_options({"version": 1, **data})

    def to_dict(self) -> dict[str, Any]:
        """Every field plus ``version``; :meth:`from_dict` (and ``from_options``) read it back."""
        return {"version": self.VERSION, **dataclasses.asdict(self)}

    def replace(self, **changes: Any) -> "MHCConfig":
        return dataclasses.replace(self, **changes)


def _check_version(version: Any) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MHCConfig.VERSION:
        raise MHCConfigError(
            f"MHCConfig dict version {version!r} is not readable by this mhc-compile (reads versions 1 to "
            f"{MHCConfig.VERSION}); upgrade mhc-compile")


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Turn command-line strings into the type of the field's default; leave other values alone."""
    if not isinstance(value, str) or isinstance(default, str):
        return value
    text = value.strip()
    low = text.lower()
    try:
        if name == "recompute_block":
            return None if low in ("none", "auto", "") else int(text)
        if isinstance(default, bool):
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        raise MHCConfigError(f"MHCConfig.{name}={value!r}: cannot be read as {type(default).__name__}") from None
    return value
