"""Data-parallel training of an mHC-converted GPT with DDP or FSDP2, launched by torchrun.

    torchrun --nproc_per_node=2 examples/train_distributed.py --strategy ddp  --steps 50
    torchrun --nproc_per_node=8 examples/train_distributed.py --strategy fsdp --device cuda --dim 1024 --layers 12
    torchrun --nproc_per_node=2 examples/train_distributed.py --pp 2 --pp-schedule 1f1b --layers 4
    torchrun --nproc_per_node=4 examples/train_distributed.py --strategy fsdp-blocks --tp 2 --steps 50
    torchrun --nproc_per_node=4 examples/train_distributed.py --tp 2 --pp 2 --steps 50

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

``--pp N`` (:func:`train_pipeline`) splits the converted GPT into N pipeline stages, one per rank
(``torch.distributed.pipelining``, GPipe or 1F1B); the ``(B, T, n, C)`` stream crosses the stage
boundaries.

``--tp N`` (with ``fsdp`` / ``fsdp-blocks``) is 2-D parallel on a (world/N, N) mesh: tensor parallel
with SequenceParallel inside each group of N ranks (the torchtitan-style Llama and plan of
``tp_llama.py``, ending with ``mhc_compile.parallelize_mhc``), FSDP2 over the other dim; each data-
parallel rank takes its slice of the global batch, the N ranks of a TP group the same slice.

``--pp P --tp N`` together (P*N ranks, :func:`tp_pipeline`): the Llama split into P stages on a
(P, N) mesh, each stage under the TP + SP plan and ``parallelize_mhc``, ``checkpoint_wrapper`` per
block; each TP rank's sequence shard of the stream crosses to the same TP rank of the next stage.

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


class GPTStage(torch.nn.Module):
    """One pipeline stage of the converted GPT: the embedding (first stage), blocks ``lo..hi-1``
    and the final norm and head (last stage). Submodules keep their names in the whole model
    (``blocks.3.attn.mhc.phi``), so a stage's parameters compare by name with one process. The
    converted blocks carry the n streams, so between stages the activation sent is the
    ``(B, T, n, C)`` stream (the chain's first block expands, its last collapses)."""

    def __init__(self, model: torch.nn.Module, lo: int, hi: int, first: bool, last: bool):
        super().__init__()
        self.tok, self.pos = (model.tok, model.pos) if first else (None, None)
        self.blocks = torch.nn.ModuleDict({str(i): model.blocks[i] for i in range(lo, hi)})
        self.ln_f, self.head = (model.ln_f, model.head) if last else (None, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tok is not None:
            x = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks.values():
            x = block(x)
        return self.head(self.ln_f(x)) if self.head is not None else x


def _cuts(layers: int, stages: int) -> list[int]:
    if not 1 <= stages <= layers:
        raise ValueError(f"--pp {stages}: needs 1..{layers} stages for {layers} blocks")
    return [round(i * layers / stages) for i in range(stages + 1)]


def pipeline_stage(model: torch.nn.Module, rank: int, stages: int) -> GPTStage:
    """Rank ``rank``'s stage of ``model`` split into ``stages`` contiguous runs of blocks."""
    cuts = _cuts(len(model.blocks), stages)
    return GPTStage(model, cuts[rank], cuts[rank + 1], rank == 0, rank == stages - 1)


def tp_pipeline(model: torch.nn.Module, mesh, *, schedule: str, microbatches: int, loss_fn, device):
    """PP x TP on a ``(pp, tp)`` mesh: this rank's :class:`tp_llama.LlamaStage` of the converted
    Llama, sharded by the TP + SequenceParallel plan of :func:`tp_llama.apply_tp` (which ends with
    ``parallelize_mhc``), ``checkpoint_wrapper`` on each block, and the pipeline schedule over the
    ``pp`` dim (each TP rank talks to the same TP rank of the neighbouring stages; the stream
    crosses as its plain sequence shard). Returns (stage module, schedule)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
    from tp_llama import LlamaStage, apply_tp

    pp, pp_rank = mesh["pp"].size(), mesh["pp"].get_local_rank()
    cuts = _cuts(len(model.layers), pp)
    part = LlamaStage(model, cuts[pp_rank], cuts[pp_rank + 1], pp_rank == 0, pp_rank == pp - 1).to(device)
    apply_tp(part, mesh["tp"], sequence_parallel=True)
    for i, block in part.layers.items():
        part.layers[i] = checkpoint_wrapper(block)
    stage = PipelineStage(part, pp_rank, pp, device, group=mesh["pp"].get_group())
    kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
    return part, kind(stage, n_microbatches=microbatches, loss_fn=loss_fn)


def pipeline_step(schedule, x: torch.Tensor, y: torch.Tensor, group=None) -> torch.Tensor:
    """One schedule step (forward + backward of every microbatch) on this rank's stage; returns the
    global mean loss on every rank of the pipeline ``group`` (the mean of the equal-sized
    microbatches' mean losses)."""
    pp, pp_rank = dist.get_world_size(group), dist.get_rank(group)
    got: list = []
    if pp_rank == 0:
        schedule.step(x)
    elif pp_rank == pp - 1:
        schedule.step(target=y, losses=got)
    else:
        schedule.step()
    logged = torch.stack(got).detach().float().mean().reshape(1) if got else torch.zeros(1, device=x.device)
    dist.broadcast(logged, src=dist.get_global_rank(group, pp - 1) if group is not None else pp - 1, group=group)
    return logged


def clip_grad_norm_pp(params, max_norm: float, pp_group) -> torch.Tensor:
    """``clip_grad_norm_`` over the whole pipelined model: the stages' squared norms summed over
    ``pp_group`` (each stage sees only its own gradients; DTensor norms made whole first)."""
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm) ** 2
    dist.all_reduce(norm, group=pp_group)
    norm = norm.sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm


def train_pipeline(args, rank: int = 0, world: int = 1, data: Optional[torch.Tensor] = None,
                   prepare=None) -> dict:
    """Pipeline-parallel training (``torch.distributed.pipelining``, ``--pp world``): the converted
    GPT split into ``world`` stages, one per rank, ``args.microbatches`` microbatches per global
    batch, schedule ``args.pp_schedule`` (GPipe or 1F1B). ``world == 1`` runs the whole model on
    the whole batch (the single-process reference). ``prepare(model)`` runs on the whole model
    before the split (the tests perturb the mHC parameters there). Returns {"losses", "grads" (of
    the first step), "params"} for this rank's stage, by their names in the whole model."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    device = torch.device(args.device if args.device != "cuda" else f"cuda:{rank % max(1, torch.cuda.device_count())}")
    if data is None:
        data = split(load_corpus(args.corpus_bytes))[0]
    model = build(args)
    if prepare is not None:
        prepare(model)
    loss_fn = lambda out, y: F.cross_entropy(out.float().flatten(0, 1), y.flatten())  # noqa: E731
    schedule, group = None, None
    if world > 1 and args.tp > 1:  # PP x TP on a (pp, tp) mesh
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world // args.tp, args.tp), mesh_dim_names=("pp", "tp"))
        group = mesh["pp"].get_group()
        part, schedule = tp_pipeline(model, mesh, schedule=args.pp_schedule, microbatches=args.microbatches,
                                     loss_fn=loss_fn, device=device)
    elif world > 1:
        part = pipeline_stage(model, rank, world).to(device)
        stage = PipelineStage(part, rank, world, device)
        kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[args.pp_schedule]
        schedule = kind(stage, n_microbatches=args.microbatches, loss_fn=loss_fn)
    else:
        part = model.to(device)
    opt = torch.optim.AdamW(param_groups(part, args.weight_decay), lr=args.lr)
    losses, grads = [], {}
    for step, (x, y) in enumerate(global_batches(args, data)):
        x, y = x.to(device), y.to(device)
        opt.zero_grad(set_to_none=True)
        if schedule is None:
            loss = loss_fn(part(x), y)
            loss.backward()
            logged = loss.detach().float().reshape(1)
        else:
            logged = pipeline_step(schedule, x, y, group)
        if step == 0:
            grads = {n: _whole(p.grad) for n, p in part.named_parameters() if p.grad is not None}
        opt.step()
        losses.append(float(logged))
    params = {n: _whole(p) for n, p in part.named_parameters()}
    return {"losses": losses, "grads": grads, "params": params}


def _whole(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu().clone()


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
    ap.add_argument("--pp", type=int, default=1, help="pipeline stages (one per rank, or per TP group with --tp; --strategy is then unused)")
    ap.add_argument("--pp-schedule", default="1f1b", choices=("gpipe", "1f1b"))
    ap.add_argument("--microbatches", type=int, default=4, help="microbatches per global batch (with --pp)")
    args = ap.parse_args(argv)
    if args.pp > 1 and args.tp == 1 and args.model != "gpt":
        ap.error("--pp alone splits the GPT: use --model gpt (or add --tp for the Llama)")
    if args.tp > 1 and args.pp > 1:  # PP x TP + SP on a (pp, tp) mesh (train_pipeline / tp_pipeline)
        args.model = "llama"
    elif args.tp > 1:
        if args.strategy not in ("fsdp", "fsdp-blocks", "none"):
            ap.error("--tp composes with FSDP2: use --strategy fsdp or fsdp-blocks")
        args.model = "llama"
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    distributed = "RANK" in os.environ and (args.strategy != "none" or args.pp > 1)
    if distributed:
        backend = "nccl" if args.device == "cuda" else "gloo"
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    else:
        rank, world = 0, 1
    need = args.pp * (args.tp if args.pp > 1 else 1)
    if args.pp > 1 and world != need:
        raise SystemExit(f"--pp {args.pp} --tp {args.tp} needs {need} ranks (torchrun --nproc_per_node={need}), "
                         f"got {world}")
    try:
        if args.pp > 1:
            out = train_pipeline(args, rank, world)
        else:
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
