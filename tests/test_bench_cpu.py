"""Smoke test of benchmarks/bench_cpu.py (so the script does not rot): its --quick path on the tiny
GPT, eval and train, one thread; rows carry a time per variant and the ratios to the original."""
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cpu.py"


def test_quick_run_writes_ratio_rows():
    spec = importlib.util.spec_from_file_location("bench_cpu", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--quick", "--models", "gpt", "--threads", "1", "--reps", "1"])
    assert [(r["model"], r["mode"], r["threads"]) for r in rows] == [("gpt", "eval", 1), ("gpt", "train", 1)]
    for r in rows:
        assert r["original_ms"] > 0 and r["mhc_ms"] > 0 and r["mhc_ref_ms"] > 0
        assert abs(r["mhc_ratio"] - r["mhc_ms"] / r["original_ms"]) < 1e-9
