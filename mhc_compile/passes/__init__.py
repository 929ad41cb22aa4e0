"""FX passes over ``torch.fx`` graphs, shared by the backend, ``convert`` and the CLI.

detect.detect_sites(graph) -> DetectResult      find residual sites (axis.py: each site's channel
                                                axis; native.py: states already multi-stream)
streams.build_chains(graph, detected) -> [Chain] group sites into chains of streams
rewrite.rewrite_chain(gm, chain, config, provider, names)  emit one chain's mHC ops

``mhc_compile.graph_pipeline`` runs them in order (``analyze``, ``rewrite_graph``, the report).
"""
import sys as _sys

from .. import mode_switch as _mode_switch, placement as _placement
from .detect import DetectResult, NotTaken, Site, detect_sites
from .streams import Chain, build_chains
from .rewrite import default_param_provider, rewrite_chain

# placement.py and mode_switch.py (they work on nn.Modules) lived here until 2026-12: models
# pickled then name ``mhc_compile.passes.placement.MHCSiteParams`` and
# ``mhc_compile.passes.mode_switch._ModeDropout``; those module paths stay importable.
_sys.modules.setdefault(__name__ + ".placement", _placement)
_sys.modules.setdefault(__name__ + ".mode_switch", _mode_switch)

__all__ = ["DetectResult", "NotTaken", "Site", "detect_sites", "Chain", "build_chains",
           "default_param_provider", "rewrite_chain"]
