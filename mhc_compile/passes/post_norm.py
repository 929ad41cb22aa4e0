"""Join a site's ``post_res`` with the LayerNorm module that reads it: BERT's post-LN ``LN(x + f(x))``.

In a post-LN model (BERT, MiniLM, RoBERTa) every site's new streams go straight into a LayerNorm,
which normalises each stream over C. This pass runs on a block's own ``torch.fx`` trace (the blocks
form, where the LayerNorm is a ``call_module`` leaf) after the chain's rewrite. It replaces
``norm(ops.post_res(x, h_out, h_post, h_res, kernels))`` by ``ops.post_res_norm(x, h_out, h_post,
h_res, norm, kernels)`` when the post_res has no other reader. The module stays in the graph (a
``get_attr``) and is called as before unless ``ops.post_res_norm`` may run both in one CPU kernel
(eager, no gradient, a plain ``nn.LayerNorm`` without hooks); so the function, the parameters and
every hook are the same.
"""
from __future__ import annotations

from torch import fx, nn

from .. import ops


def fuse_post_norm(gm: fx.GraphModule) -> int:
    """Rewrite every ``LayerNorm(post_res(...))`` of ``gm``'s graph (above); returns how many.

    Only an ``nn.LayerNorm`` (or subclass: the op checks the exact type on every call) called on the
    post_res output alone, and a post_res whose only reader it is."""
    graph = gm.graph
    fused = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not ops.post_res or len(node.users) != 1:
            continue
        (user,) = node.users
        if user.op != "call_module" or user.args != (node,) or user.kwargs:
            continue
        try:
            norm = gm.get_submodule(user.target)
        except AttributeError:
            continue
        if not isinstance(norm, nn.LayerNorm):
            continue
        x, h_out, h_post, h_res, *rest = node.args
        kernels = rest[0] if rest else node.kwargs.get("kernels", "auto")
        with graph.inserting_before(user):
            module = graph.get_attr(user.target)
            new = graph.call_function(ops.post_res_norm, (x, h_out, h_post, h_res, module, kernels))
        new.meta = dict(user.meta)
        user.replace_all_uses_with(new)
        graph.erase_node(user)
        graph.erase_node(node)
        fused += 1
    return fused
