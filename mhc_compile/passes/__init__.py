"""FX passes over ``torch.fx`` graphs, shared by the backend, ``convert`` and the CLI.

detect.detect_sites(graph) -> DetectResult      find residual sites (axis.py: each site's channel
                                                axis; native.py: states already multi-stream)
streams.build_chains(graph, detected) -> [Chain] group sites into chains of streams
rewrite.rewrite_graph(gm, config, param_provider) -> ResidualReport
"""
from .detect import DetectResult, NotTaken, Site, detect_sites
from .streams import Chain, build_chains
from .rewrite import default_param_provider, rewrite_graph

__all__ = ["DetectResult", "NotTaken", "Site", "detect_sites", "Chain", "build_chains",
           "default_param_provider", "rewrite_graph"]
