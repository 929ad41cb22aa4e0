"""Smoke test of benchmarks/bench_kernels.py so the script does not rot: its --quick path with
reference-only (eager) ops on CPU, the JSON/markdown writers, and the byte-floor formulas."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernels.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_byte_floor_matches_design(bench):
    """DESIGN.md: one site moves (5n+5)*C*2 bytes per token in bf16; n=4, C=1024, 16384 tokens
    at 2.97 TB/s is a 0.28 ms floor."""
    nbytes = bench.op_bytes("site", "fwd+bwd", 16384, 4, 1024, 2)
    assert abs(nbytes - 25 * 1024 * 2 * 16384) <= 3 * 4 * 1024 * 24 * 4  # + phi read/written once per call
    assert nbytes / 2.97e12 * 1e3 == pytest.approx(0.28, abs=0.01)
    # post_res forward: read x (nC) + h_out (C), write x' (nC), plus the fp32 coefficients
    assert bench.op_bytes("post_res", "fwd", 10, 4, 64, 2) == 10 * (9 * 64 * 2 + 4 * (4 + 16))


def test_cases_take_a_token_count(bench):
    """--cases NxC@T: the decode shapes gpu_check.sh times (the coefficient kernels' split-K)."""
    assert bench.parse_case("4x4096@8", 16384) == (4, 4096, 8)
    assert bench.parse_case("2x1024", 16384) == (2, 1024, 16384)


def test_quick_eager_run_writes_rows(bench, tmp_path):
    js, md = tmp_path / "rows.json", tmp_path / "rows.md"
    rows = bench.main(["--quick", "--impls", "eager", "--ops", "pre,post_res,site", "--streams", "2",
                       "--tokens", "8", "--channels", "16", "--cpu-reps", "1",
                       "--json", str(js), "--markdown", str(md)])
    # pre and post_res have fwd and bwd rows, the site one fwd+bwd row
    assert [(r["op"], r["pass"]) for r in rows] == [
        ("pre", "fwd"), ("pre", "bwd"), ("post_res", "fwd"), ("post_res", "bwd"), ("site", "fwd+bwd")]
    for r in rows:
        assert r["error"] is None, r
        assert r["ms"] > 0 and r["gbps"] > 0 and r["bytes"] > 0
    data = json.loads(js.read_text())
    assert data["meta"]["copy_gbps"] > 0 and len(data["rows"]) == len(rows)
    text = md.read_text()
    assert text.count("\n| ") == len(rows) + 1 and "| site | fwd+bwd |" in text


def test_retrace_bench_quick_runs():
    """benchmarks/bench_retrace.py --quick: one point, every time positive."""
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("bench_retrace", SCRIPT.parent / "bench_retrace.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    (row,) = mod.main(["--quick"])
    assert row["layers"] == 2 and min(row["forward_ms"], row["first_new_ms"], row["cached_new_ms"]) > 0
