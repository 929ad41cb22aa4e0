"""The readers of the source kinds, one module per kind, each defining its registry entry
``KIND``; importing this package registers them in ``io.registry``, in detection order:
``converted`` (``converted.py``), ``hf`` (``hf.py``), ``export`` (``pt2.py``), ``pickle``
(``pickled.py``), ``factory`` (``factory.py``). ``common.py`` holds what the readers share."""
from __future__ import annotations

from ..registry import register_source_kind
from . import converted, factory, hf, pickled, pt2

BUILTIN_KINDS = (converted.KIND, hf.KIND, pt2.KIND, pickled.KIND, factory.KIND)
for _kind in BUILTIN_KINDS:
    register_source_kind(_kind)
