"""Data-parallel training of an mHC-converted GPT with DDP or FSDP2, launched by torchrun.

    torchrun --nproc_per_node=2 examples/train_distributed.py --strategy ddp  --steps 50
    torchrun --nproc_per_node=8 examples/train_distributed.py --strategy fsdp --device cuda --dim 1024 --layers 12
    torchrun --nproc_per_node=4 examples/train_distributed.py --strategy fsdp-blocks --tp 2 --steps 50

Each rank builds the same plain GPT (same seed), converts it with ``mhc_compile.convert`` (the
mHC parameters are ordinary ``nn.Parameter``s, so DDP and FSDP2 treat them like any other
weight), wraps it, and trains on its slice of every global batch. Strategies:

* ``ddp``: ``DistributedDataParallel``; ``ddp-compile``: the DDP model under ``torch.compile``
  (``aot_eager``) with ``torch._dynamo.config.optimize_ddp`` at torch's default, so Dynamo
  splits the graph at DDP's buckets;
* ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) on the root module only;
* ``fsdp-blocks``: the per-block recipe: ``checkpoint_wrapper`` and ``fully_shard`` on every
  block, then the root (the converted GPT's blocks carry the n streams, so each block is its
  own unit: gathered before its forward, resharded after).

``--tp N`` (with ``fsdp`` / ``fsdp-blocks``) is 2-D parallel on a (world/N, N) mesh: tensor parallel
with SequenceParallel inside each group of N ranks (the torchtitan-style Llama and plan of
``tp_llama.py``, ending with ``mhc_compile.parallelize_mhc``), FSDP2 over the other dim; each data-
parallel rank takes its slice of the global batch, the N ranks of a TP group the same slice.

:func:`train` is also used by ``tests/test_distributed.py`` (gloo, 2 ranks on CPU) to check that
DDP / FSDP2 give the same losses and parameters as a single process.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tinygpt import GPT, get_batch, load_corpus, make_variant, param_groups, split  # noqa: E402


def build(args) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    example = torch.zeros(2, args.seq, dtype=torch.long)
    if args.model == "llama":  # the torchtitan-style Llama that --tp shards
        from tp_llama import TPLlama

        llama = TPLlama(vocab=256, c=args.dim, layers=args.layers, heads=args.heads)
        return make_variant(llama, args.variant, args.streams, example, builder="convert", kernels=args.kernels)
    gpt = GPT(c=args.dim, layers=args.layers, heads=args.heads, seq=args.seq)
    return make_variant(gpt, args.variant, args.streams, example, builder=args.builder, kernels=args.kernels)


def global_batches(args, data: torch.Tensor):
    """The same sequence of global batches on every rank (and in a single process)."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    for _ in range(args.steps):
        yield get_batch(data, args.batch, args.seq, gen)


def train(args, rank: int = 0, world: int = 1, strategy: str = "none", data: Optional[torch.Tensor] = None) -> dict:
    """Train ``args.steps`` steps; returns {"losses": [global mean loss per step], "params": {name: full
    tensor}, "local_numel": parameter elements held by this rank, "total_numel": all of them}.

    ``strategy``: "none" (one process, whole batch), "ddp" or "fsdp" (FSDP2). The global batch
    ``args.batch`` is split evenly across the data-parallel ranks (all ranks, or world/tp with
    ``args.tp``); gradients are averaged, so every strategy optimises the same global mean loss.
    """
    tp = args.tp if strategy != "none" else 1
    if world % tp:
        raise ValueError(f"--tp {tp} must divide the world size {world}")
    dp_world, dp_rank = world // tp, rank // tp   # rank = dp_rank * tp + tp_rank on the (dp, tp) mesh
    if args.batch % dp_world:
        raise ValueError(f"--batch {args.batch} must be divisible by the data-parallel size {dp_world}")
    device = torch.device(args.device if args.device != "cuda" else f"cuda:{rank % max(1, torch.cuda.device_count())}")
    if data is None:
        data = split(load_corpus(args.corpus_bytes))[0]
    model = build(args).to(device)
    names = [n for n, _ in model.named_parameters()]
    peak = {"max": None}
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    elif strategy == "ddp-compile":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        wrapped = torch.compile(ddp, backend="aot_eager")
    elif strategy in ("fsdp", "fsdp-blocks"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if tp > 1:  # TP + SP inside each group of tp ranks (mHC parameters replicated), FSDP2 across them
            from tp_llama import apply_tp

            mesh2 = init_device_mesh(device.type, (dp_world, tp), mesh_dim_names=("dp", "tp"))
            apply_tp(model, mesh2["tp"], sequence_parallel=True)
            mesh = mesh2["dp"]
        else:
            mesh = init_device_mesh(device.type, (world,))
        if strategy == "fsdp-blocks":
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

            blocks = model.layers if hasattr(model, "layers") else model.blocks
            for i, block in (blocks.items() if hasattr(blocks, "items") else enumerate(blocks)):
                blocks[i] = checkpoint_wrapper(block)
                fully_shard(blocks[i], mesh=mesh)
        fully_shard(model, mesh=mesh)
        wrapped = model
        peak = _watch_unsharded(model)
    elif strategy == "none":
        wrapped = model
        peak = _watch_unsharded(model)
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr)
    per = args.batch // dp_world
    losses = []
    for x, y in global_batches(args, data):
        x, y = x[dp_rank * per : (dp_rank + 1) * per].to(device), y[dp_rank * per : (dp_rank + 1) * per].to(device)
        loss = F.cross_entropy(wrapped(x).float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        logged = loss.detach().clone()
        if world > 1:
            dist.all_reduce(logged, op=dist.ReduceOp.SUM)  # the tp ranks of a group hold the same loss
            logged /= world
        losses.append(float(logged))
    sharded = all(hasattr(p, "to_local") for p in model.parameters())
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    params = {}
    for name, p in zip(names, model.parameters()):
        t = p.detach()
        if hasattr(t, "full_tensor"):  # FSDP2 DTensor shard -> full parameter (a collective)
            t = t.full_tensor()
        params[name] = t.cpu().clone()
    total = sum(t.numel() for t in params.values())
    return {"losses": losses, "params": params, "local_numel": local, "total_numel": total,
            "all_sharded": sharded, "peak_unsharded_bytes": peak["max"] if strategy.startswith("fsdp") or
            strategy == "none" else None,
            "block_bytes": [sum(p.numel() * p.element_size() for p in b.parameters()) for b in getattr(model, "blocks", [])]}


def _watch_unsharded(model: torch.nn.Module) -> dict:
    """Track, at every block's forward, the bytes of parameters held unsharded (FSDP2 swaps a
    unit's DTensor shards for full tensors while the unit runs). Returns {"max": bytes}, updated
    as the model runs; without FSDP every parameter counts."""
    peak = {"max": 0}

    def look(*_):
        held = sum(p.numel() * p.element_size() for p in model.parameters() if not hasattr(p, "to_local"))
        peak["max"] = max(peak["max"], held)
    for block in getattr(model, "blocks", []):
        block.register_forward_pre_hook(look)
        block.register_forward_hook(look)
    return peak


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategy", default="ddp", choices=("ddp", "ddp-compile", "fsdp", "fsdp-blocks", "none"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variant", default="mhc", choices=("plain", "hc", "mhc"))
    ap.add_argument("--model", default="gpt", choices=("gpt", "llama"),
                    help="gpt: tinygpt.GPT; llama: tp_llama.TPLlama (torchtitan's module names; --tp needs it)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size (TP + SequenceParallel, FSDP2 over the "
                    "other world/tp ranks; needs --strategy fsdp or fsdp-blocks, implies --model llama)")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--builder", default="auto", choices=("auto", "convert", "hand"))
    ap.add_argument("--kernels", default="auto", choices=("auto", "triton", "reference"))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=16, help="global batch (split across ranks)")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--corpus-bytes", type=int, default=2_000_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.tp > 1:
        if args.strategy not in ("fsdp", "fsdp-blocks", "none"):
            ap.error("--tp composes with FSDP2: use --strategy fsdp or fsdp-blocks")
        args.model = "llama"
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    distributed = "RANK" in os.environ and args.strategy != "none"
    if distributed:
        backend = "nccl" if args.device == "cuda" else "gloo"
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    else:
        rank, world = 0, 1
    try:
        out = train(args, rank, world, args.strategy if distributed else "none")
        if rank == 0:
            for i, loss in enumerate(out["losses"]):
                if i % 10 == 0 or i == len(out["losses"]) - 1:
                    print(f"step {i:5d}  loss {loss:.4f}")
        if distributed:
            dist.barrier()  # no rank tears down its connections while another still uses them
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
