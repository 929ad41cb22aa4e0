"""A small torchtitan-style Llama and its tensor-parallel plan, for ``train_distributed.py --tp``.

:class:`TPLlama` has torchtitan's module names (``tok_embeddings``, ``layers.<i>.attention_norm``,
``attention.{wq,wk,wv,wo}``, ``ffn_norm``, ``feed_forward.{w1,w2,w3}``, ``norm``, ``output``) and
attention that works on any number of local heads, so Colwise/Rowwise sharding applies as is.

:func:`apply_tp` is the usual ``torch.distributed.tensor.parallel`` recipe (the PyTorch TP
tutorial's, torchtitan's before 0.3): Colwise/Rowwise on the projections, and with
``sequence_parallel`` SequenceParallel on the norms and ``Shard(1)`` activations between blocks;
then ``mhc_compile.parallelize_mhc`` makes the mHC parameters replicated DTensors on the TP mesh.
``dtensor_stream=True`` keeps the activations DTensors between modules (``use_local_output=False``,
what torchtitan 0.3 does), so the converted blocks get a DTensor stream.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import mhc_compile


class Attention(nn.Module):
    def __init__(self, c: int, heads: int):
        super().__init__()
        self.head_dim = c // heads
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(c, c, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[0], x.shape[1]
        q, k, v = (w(x).view(b, t, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.w1, self.w3 = nn.Linear(c, 2 * c, bias=False), nn.Linear(c, 2 * c, bias=False)
        self.w2 = nn.Linear(2 * c, c, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, c: int, heads: int):
        super().__init__()
        self.attention_norm, self.ffn_norm = nn.RMSNorm(c), nn.RMSNorm(c)
        self.attention, self.feed_forward = Attention(c, heads), FeedForward(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x))
        return h + self.feed_forward(self.ffn_norm(h))


class TPLlama(nn.Module):
    def __init__(self, vocab: int = 256, c: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, c)
        self.layers = nn.ModuleDict({str(i): Block(c, heads) for i in range(layers)})
        self.norm, self.output = nn.RMSNorm(c), nn.Linear(c, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h)
        return self.output(self.norm(h))


class LlamaStage(nn.Module):
    """One pipeline stage of a (converted) :class:`TPLlama`: the embedding (first stage), layers
    ``lo..hi-1`` and the final norm and output (last stage), under their names in the whole model
    (``layers.1.attention.wq``), so :func:`apply_tp` shards a stage like the whole model. Between
    stages the activation is the converted blocks' ``(B, T, n, C)`` stream (under SequenceParallel
    each TP rank's sequence shard, a plain tensor: sent as is to the same TP rank of the next stage)."""

    def __init__(self, model: nn.Module, lo: int, hi: int, first: bool, last: bool):
        super().__init__()
        self.tok_embeddings = model.tok_embeddings if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in range(lo, hi)})
        self.norm, self.output = (model.norm, model.output) if last else (None, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tok_embeddings is not None:
            x = self.tok_embeddings(x)
        for layer in self.layers.values():
            x = layer(x)
        return self.output(self.norm(x)) if self.output is not None else x


def _no_parallel():
    """torchtitan's ``NoParallel``: a module run whole on every TP rank, its parameters replicated
    DTensors (so ``clip_grad_norm_`` and foreach optimizers see one kind of parameter), its input
    and output local tensors."""
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor.parallel import ParallelStyle
    from torch.distributed.tensor import distribute_module

    class NoParallel(ParallelStyle):
        def _apply(self, module, mesh):
            def inputs(mod, args, mesh):
                return tuple(DTensor.from_local(a, mesh, [Replicate()], run_check=False)
                             if isinstance(a, torch.Tensor) and not isinstance(a, DTensor) else a for a in args)

            return distribute_module(module, mesh, input_fn=inputs, output_fn=lambda mod, out, mesh: out.to_local())

    return NoParallel()


def apply_tp(model: nn.Module, tp_mesh, *, sequence_parallel: bool, dtensor_stream: bool = False) -> nn.Module:
    """Tensor parallel (and SequenceParallel) on a converted :class:`TPLlama`, then the mHC parameters
    replicated on ``tp_mesh``. The logits come back whole (``Replicate``) on every TP rank."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    if dtensor_stream and not sequence_parallel:
        raise ValueError("dtensor_stream needs sequence_parallel (a replicated DTensor stream would meet plain norms)")
    sp, local = sequence_parallel, not dtensor_stream
    act = Shard(1) if sp else Replicate()
    top = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=act, use_local_output=local),
        "norm": SequenceParallel() if sp else _no_parallel(),
        "output": ColwiseParallel(input_layouts=act, output_layouts=Replicate()),
    }  # a pipeline stage (``LlamaStage``) holds some of them: the plan of the parts it has
    parallelize_module(model, tp_mesh, {k: v for k, v in top.items() if getattr(model, k, None) is not None})
    for block in model.layers.values():
        plan = {
            "attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(), "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=act, use_local_output=local),
            "feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=act, use_local_output=local),
        }
        if not sp:
            plan.update({"attention_norm": _no_parallel(), "ffn_norm": _no_parallel()})
        else:
            plan.update({
                "attention_norm": SequenceParallel(),
                "attention": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
                "ffn_norm": SequenceParallel(),
                "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            })
        parallelize_module(block, tp_mesh, plan)
    from mhc_compile.parallel.partial_grads import foreach_skips_partial, replicate_partial_grads

    if foreach_skips_partial(tp_mesh):  # torch 2.11 would leave the SP norms' Partial gradients unclipped
        replicate_partial_grads(p for p in model.parameters() if isinstance(p, DTensor) and
                                all(isinstance(pl, Replicate) for pl in p.placements))
    from mhc_compile.placement import MHCSiteParams

    if not any(isinstance(m, MHCSiteParams) for m in model.modules()):  # plain (train_distributed --variant plain)
        return model
    return mhc_compile.parallelize_mhc(model, tp_mesh, sequence_parallel=sp)
