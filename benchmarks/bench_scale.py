"""Conversion at scale: time and peak RSS of ``mhc_compile.convert`` against depth and width,
on models built under ``torch.device("meta")`` (nothing allocated), and the per-block FSDP2
peak of unsharded parameter bytes.

Each (width, depth) point runs in a fresh subprocess: ``rss_mb`` is the growth of the peak RSS
(``ru_maxrss``) from just before ``convert`` to just after, so it measures the conversion alone.
The baseline of every row is the same process's own cost of building the meta model and one
fake forward of it; ``ms_per_layer`` shows the time is linear in depth.

The FSDP2 figure runs one gloo rank in-process: a converted torchtitan-style Llama, with
``fully_shard`` on every stream-carrying block and the root; it records, at every block's
forward, the bytes of parameters held unsharded, and prints the peak against one block plus
the root and against the whole model.

    python benchmarks/bench_scale.py                      # widths 256,1024; depths 4..64
    python benchmarks/bench_scale.py --quick              # CI smoke: two small points
    python benchmarks/bench_scale.py --one-billion        # ~1B parameters (C=2048, L=22)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure_point(c: int, layers: int) -> dict:
    """Convert a meta-device TitanLlama (width c, depth layers); time and RSS growth."""
    import torch

    import mhc_compile
    from models.titan import TitanLlama

    with torch.device("meta"):
        model = TitanLlama(c=c, layers=layers, heads=max(1, c // 64), max_t=64, vocab=32000)
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 32000, (2, 16))
    before, t0 = _rss_mb(), time.perf_counter()
    out = mhc_compile.convert(model, mhc_compile.MHCConfig(streams=4), (ids,))
    seconds = time.perf_counter() - t0
    return dict(C=c, layers=layers, params=params, form=out.mhc_report.form, sites=out.mhc_report.num_sites,
                convert_s=round(seconds, 2), ms_per_layer=round(1e3 * seconds / layers, 1),
                rss_mb=round(_rss_mb() - before, 1))


def fsdp_peak(c: int = 64, layers: int = 6) -> dict:
    """Per-block FSDP2 (one gloo rank): the peak unsharded bytes during forward."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import mhc_compile
    from models.titan import TitanLlama

    torch.manual_seed(0)
    model = TitanLlama(c=c, layers=layers)
    ids = torch.randint(0, 64, (2, 16))
    model = mhc_compile.convert(model, mhc_compile.MHCConfig(streams=4, kernels="reference"), (ids,), inplace=True)
    blocks = [sum(p.numel() * p.element_size() for p in b.parameters()) for b in model.layers.values()]
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    store = tempfile.mktemp()
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for block in model.layers.values():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        peak = [0]

        def look(*_):
            held = sum(p.numel() * p.element_size() for p in model.parameters() if not hasattr(p, "to_local"))
            peak[0] = max(peak[0], held)
        for block in model.layers.values():
            block.register_forward_pre_hook(look)
            block.register_forward_hook(look)
        model(ids).sum().backward()
    finally:
        dist.destroy_process_group()
    root = total - sum(blocks)
    return dict(C=c, layers=layers, total_bytes=total, root_bytes=root, block_bytes=max(blocks),
                peak_unsharded_bytes=peak[0], peak_vs_root_plus_block=round(peak[0] / (root + max(blocks)), 3),
                peak_vs_all=round(peak[0] / total, 3))


def _in_subprocess(c: int, layers: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, __file__, "--worker", f"{c}x{layers}"], capture_output=True, text=True, env=env)
    if out.returncode:
        return dict(C=c, layers=layers, error=(out.stderr.strip().splitlines() or ["?"])[-1][:300])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="256,1024")
    p.add_argument("--depths", default="4,8,16,32,64")
    p.add_argument("--quick", action="store_true", help="two small points and the FSDP2 figure")
    p.add_argument("--one-billion", action="store_true", help="one point of about 1B parameters")
    p.add_argument("--json", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        import warnings
        warnings.simplefilter("ignore")
        c, layers = map(int, args.worker.split("x"))
        print(json.dumps(measure_point(c, layers)))
        return
    if args.quick:
        points = [(64, 2), (64, 4)]
    elif args.one_billion:
        points = [(2048, 22)]
    else:
        points = [(int(c), int(d)) for c in args.widths.split(",") for d in args.depths.split(",")]
    rows = []
    for c, layers in points:
        row = _in_subprocess(c, layers)
        rows.append(row)
        print(json.dumps(row), flush=True)
    fsdp = fsdp_peak()
    print(json.dumps({"fsdp2_per_block": fsdp}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"convert": rows, "fsdp2_per_block": fsdp}, indent=2))


if __name__ == "__main__":
    main()
