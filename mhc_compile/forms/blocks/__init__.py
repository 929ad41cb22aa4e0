"""Stream-carrying blocks: the scale path of ``convert``.

The whole-graph analysis (``passes``) finds the sites and chains; :mod:`.plan` decides, from
that graph, which modules ("blocks") hold each chain's sites and whether the chain can cross
them as a real ``(..., n, C)`` tensor; :mod:`.trace` traces each block's own forward with its
child modules as leaves; :mod:`.carry` rewrites that graph with the same passes and installs it
as the block's forward, so the parent's Python forward runs unchanged.
"""
from .carry import carry_blocks
from .signature import BlockCallError
from .plan import BlockPlan, plan_blocks

__all__ = ["BlockCallError", "BlockPlan", "carry_blocks", "plan_blocks"]
