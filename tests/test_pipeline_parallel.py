"""Pipeline parallel (``torch.distributed.pipelining``, gloo, 2 CPU ranks) of an mHC-converted GPT
equals one process, at perturbed mHC parameters.

The converted GPT (3 blocks, n = 2 streams) is split into 2 stages (``examples/train_distributed.py
--pp 2``: blocks 0-1 | block 2): the activation sent between the ranks is the (B, T, n, C) stream.
GPipe and 1F1B with 2 microbatches: the first step's loss and every gradient of each stage (mHC
parameters included) equal the single-process run on the whole batch (relative 1e-4), and after
3 AdamW steps the losses and parameters do too.
"""
import importlib
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

TESTS = Path(__file__).resolve().parent
EXAMPLES = TESTS.parent / "examples"
for _p in (EXAMPLES, TESTS):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

WORLD = 2


def _args(schedule: str = "1f1b"):
    td = importlib.import_module("train_distributed")
    return td.parse_args([
        "--steps", "3", "--batch", "4", "--seq", "16", "--dim", "16", "--layers", "3", "--heads", "2",
        "--streams", "2", "--lr", "1e-2", "--kernels", "reference", "--pp", "2", "--pp-schedule", schedule,
        "--microbatches", "2",
    ])


def _data():
    tg = importlib.import_module("tinygpt")
    return tg.load_corpus(50_000)


def perturb(model: torch.nn.Module) -> None:
    """Every mHC parameter += N(0, 0.3), seeded: the same values in every process."""
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mhc" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)


def _worker(rank: int, world: int, schedule: str, out_dir: str) -> None:
    for p in (EXAMPLES, TESTS):
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))
    from _gloo import gloo_group

    with gloo_group(rank, world, out_dir):
        td = importlib.import_module("train_distributed")
        out = td.train_pipeline(_args(schedule), rank, world, data=_data(), prepare=perturb)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def single():
    td = importlib.import_module("train_distributed")
    return td.train_pipeline(_args(), 0, 1, data=_data(), prepare=perturb)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_two_stage_pipeline_matches_single_process(single, schedule):
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(WORLD, schedule, d), nprocs=WORLD, join=True)
        ranks = [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]
    # each stage holds its own part; together exactly the whole model's parameters
    names = [set(r["params"]) for r in ranks]
    assert not (names[0] & names[1]) and names[0] | names[1] == set(single["params"])
    assert any(".mhc" in n for n in names[0]) and any(".mhc" in n for n in names[1])
    grads = {**ranks[0]["grads"], **ranks[1]["grads"]}
    params = {**ranks[0]["params"], **ranks[1]["params"]}
    assert set(grads) == set(single["grads"])
    worst_grad = max(_rel(grads[n], g) for n, g in single["grads"].items())
    worst_mhc = max(_rel(grads[n], g) for n, g in single["grads"].items() if ".mhc" in n)
    worst_param = max(float((params[n] - p).abs().max()) for n, p in single["params"].items())
    print(f"{schedule}: losses single {single['losses']} pp {ranks[0]['losses']}; worst grad rel "
          f"{worst_grad:.3g} (mHC {worst_mhc:.3g}); max |param diff| after 3 steps {worst_param:.3g}")
    assert ranks[0]["losses"] == ranks[1]["losses"]
    assert ranks[0]["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert worst_grad <= 1e-4 and worst_mhc <= 1e-4
    assert worst_param <= 2e-5
    # the perturbation is real: the mHC gradients are not those of the function-preserving init
    assert all(float(g.abs().max()) > 0 for n, g in single["grads"].items() if n.endswith("phi"))
