"""An mHC-converted GPT trains under DDP and FSDP2 (gloo, 2 ranks on CPU) exactly like one process.

Two ranks each take half of every global batch; after the same AdamW steps, the global mean
losses and every parameter (including the mHC phi/alpha/biases) match a single-process run on
the whole batch. Tolerance: losses rel 1e-5, parameters atol 2e-5 (fp32; only the order of the
gradient reduction differs).
"""
import importlib
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

WORLD = 2


def _args(kernels: str = "reference"):
    td = importlib.import_module("train_distributed")
    return td.parse_args([
        "--steps", "3", "--batch", "4", "--seq", "16", "--dim", "16", "--layers", "3", "--heads", "2",
        "--lr", "1e-2", "--kernels", kernels,
    ])


def _data():
    tg = importlib.import_module("tinygpt")
    return tg.load_corpus(50_000)


def _worker(rank: int, world: int, strategy: str, out_dir: str, kernels: str = "reference") -> None:
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    # A file rendezvous: no TCP port to pick and lose to another process on a busy machine.
    store = os.path.join(out_dir, "rendezvous")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        td = importlib.import_module("train_distributed")
        out = td.train(_args(kernels), rank, world, strategy, data=_data())
        if rank == 0:
            torch.save(out, os.path.join(out_dir, "out.pt"))
        # No rank tears down its gloo pairs while the other still talks to it (seen once:
        # rank 1 aborted in "terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def single():
    td = importlib.import_module("train_distributed")
    torch.set_num_threads(2)
    return td.train(_args(), 0, 1, "none", data=_data())


def _run(strategy: str, kernels: str = "reference") -> dict:
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(WORLD, strategy, d, kernels), nprocs=WORLD, join=True)
        return torch.load(os.path.join(d, "out.pt"), weights_only=True)


def _compare(single: dict, multi: dict) -> None:
    """Losses rel 1e-5 and every parameter (by its name in the unwrapped model) close."""
    multi = dict(multi, params={n.replace("._checkpoint_wrapped_module", ""): p for n, p in multi["params"].items()})
    worst = max(float((multi["params"][n] - p).abs().max()) for n, p in single["params"].items())
    print(f"losses single {single['losses']} multi {multi['losses']}; max |param diff| {worst:.3g}")
    assert len(multi["losses"]) == len(single["losses"]) == 3
    assert multi["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert single["losses"][-1] < single["losses"][0]  # it does train
    assert set(multi["params"]) == set(single["params"])
    mhc_names = [n for n in single["params"] if "mhc" in n]
    assert mhc_names, "the converted model has mHC parameters"
    for name, ref in single["params"].items():
        got = multi["params"][name]
        assert got.shape == ref.shape, name
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    # the mHC parameters moved from their init (they received gradients on every rank)
    init = importlib.import_module("train_distributed").build(_args())
    moved = [n for n, p in init.named_parameters() if "mhc" in n and not torch.allclose(p.detach(), single["params"][n])]
    assert moved, "no mHC parameter changed"


def test_ddp_matches_single_process(single):
    out = _run("ddp")
    assert out["local_numel"] == out["total_numel"]  # DDP replicates
    _compare(single, out)


def test_fsdp2_matches_single_process(single):
    from torch.distributed.fsdp import fully_shard  # noqa: F401  (torch >= 2.6 public path)

    out = _run("fsdp")
    # rank 0 holds about half of the parameter elements (dim-0 shards, padded)
    assert out["local_numel"] < 0.75 * out["total_numel"], (out["local_numel"], out["total_numel"])
    _compare(single, out)


def test_ddp_compiled_with_optimize_ddp_matches_single_process(single):
    assert torch._dynamo.config.optimize_ddp  # torch's default: Dynamo splits the graph at DDP buckets
    _compare(single, _run("ddp-compile"))


def test_ddp_compiled_with_the_cpu_kernels_matches_single_process():
    """``kernels="auto"`` on CPU: compiled, each rank's train step runs the fused coeffs kernels forward and
    backward inside the graph (``cpu_paths._CompiledCoeffs``) and the inlined mixes; after 3 AdamW steps
    the loss and every parameter equal one eager process's (which runs the same kernels eagerly)."""
    from mhc_compile import kernels_cpu

    if not kernels_cpu.available():
        pytest.skip(f"CPU kernels not built: {kernels_cpu.build_error()}")
    td = importlib.import_module("train_distributed")
    torch.set_num_threads(2)
    single_auto = td.train(_args("auto"), 0, 1, "none", data=_data())
    _compare(single_auto, _run("ddp-compile", "auto"))


def test_fsdp2_per_block_with_checkpointing_matches_single_process(single):
    """fully_shard + checkpoint_wrapper on every stream-carrying block, then the root: every
    parameter (mHC included) is a DTensor shard, 3 AdamW steps equal one process, and the
    parameters are gathered one block at a time."""
    out = _run("fsdp-blocks")
    assert out["all_sharded"]
    assert out["local_numel"] < 0.75 * out["total_numel"]
    _compare(single, out)
    blocks = out["block_bytes"]
    total = 4 * out["total_numel"]
    root = total - sum(blocks)
    peak = out["peak_unsharded_bytes"]
    print(f"peak unsharded {peak} B: root {root} B + one block {max(blocks)} B; all {total} B")
    assert single["peak_unsharded_bytes"] == total
    assert peak <= root + max(blocks) + 64 and peak < total - min(blocks) // 2
