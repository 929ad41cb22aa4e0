"""Fold the tuple arithmetic a ``torch.fx`` trace records: ``((a,) + rest)[0]`` is ``a``.

``torch.fx`` symbolic tracing records ``outputs = (hidden_states,) + outputs[1:]`` (how
transformers 4.x layers build their return, T5's among them) as an ``operator.add`` node on
tuples, and the caller's ``outputs[0]`` as a ``getitem`` of that node. The hidden state a residual
chain follows then passes through a container node that ``torch.export`` (which flattens tuples)
never shows, and ``streams.stream_wise_path`` stops there: a block's own graph saw two chains
where the model's graph saw one, and the model fell back to the whole-graph form. Each
``getitem(t, i)`` of a concatenation whose literal head holds element ``i`` now reads that element
directly; the nodes left without users are erased (only those: a dead module call stays)."""
from __future__ import annotations

import operator

from torch import fx


def fold_tuple_getitems(graph: fx.Graph) -> int:
    """Rewire ``getitem((x0, x1, ...) + rest, i)`` to ``xi`` for ``i`` inside the literal head;
    returns how many reads were folded."""
    folded = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not operator.getitem or len(node.args) != 2:
            continue
        src, index = node.args
        if not (isinstance(src, fx.Node) and src.op == "call_function" and src.target is operator.add
                and isinstance(index, int) and isinstance(src.args[0], (tuple, list))):
            continue
        head = src.args[0]
        if not (0 <= index < len(head) and isinstance(head[index], fx.Node)):
            continue
        node.replace_all_uses_with(head[index])
        graph.erase_node(node)
        if not src.users:
            graph.erase_node(src)
        folded += 1
    return folded
