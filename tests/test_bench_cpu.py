"""Smoke test of benchmarks/bench_cpu.py (so the script does not rot): its --quick path on the tiny
GPT, eval and train, one thread; rows carry a time per variant and the ratios to the original; and
its --site table (one site's kernels and ops alone) times every call."""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cpu.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_cpu", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_quick_run_writes_ratio_rows():
    bench = _bench()
    rows = bench.main(["--quick", "--models", "gpt", "--threads", "1", "--reps", "1"])
    assert [(r["model"], r["mode"], r["threads"]) for r in rows] == [("gpt", "eval", 1), ("gpt", "train", 1)]
    for r in rows:
        assert r["original_ms"] > 0 and r["mhc_ms"] > 0 and r["mhc_unfused_ms"] > 0 and r["mhc_ref_ms"] > 0
        assert r["mhc_nocache_ms"] > 0 and r["mhc_mmgx_ms"] > 0
        assert abs(r["mhc_ratio"] - r["mhc_ms"] / r["original_ms"]) < 1e-9


def test_site_table_times_every_call():
    from mhc_compile import kernels_cpu

    if not kernels_cpu.available():
        import pytest
        pytest.skip("CPU kernels not built")
    rows = _bench().main(["--site", "--reps", "1"])
    assert len(rows) == 52 and {r["shape"] for r in rows} == {"minilm T=360 C=384", "gpt T=512 C=256"}
    assert all(r["us"] > 0 for r in rows)


def test_glue_script_times_every_call():
    """benchmarks/bench_cpu_glue.py (Python glue per call of the CPU eager path) runs and times each row."""
    from mhc_compile import kernels_cpu

    if not kernels_cpu.available():
        import pytest

        pytest.skip("CPU kernels not built")
    spec = importlib.util.spec_from_file_location("bench_cpu_glue", SCRIPT.with_name("bench_cpu_glue.py"))
    glue = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(glue)
    rows = glue.main(["--reps", "8"])
    assert len(rows) == 10 and all(us > 0 for _, us in rows)


def test_floor_script_adds_up_its_parts():
    """benchmarks/bench_cpu_floor.py (the GPT eval's floor: projection, gates and cold stream passes) runs
    on tiny shapes, times every part, and its floor ratio is the original plus those parts."""
    from mhc_compile import kernels_cpu

    if not kernels_cpu.available():
        pytest.skip("CPU kernels not built")
    spec = importlib.util.spec_from_file_location("bench_cpu_floor", SCRIPT.with_name("bench_cpu_floor.py"))
    floor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(floor)
    rows = floor.main(["--quick", "--reps", "1"])
    assert [r["model"] for r in rows] == ["gpt", "minilm"] and [r["passes"] for r in rows] == [(1, 2), (2, 2)]
    for out in rows:
        p, (reads, copies) = out["parts_us"], out["passes"]
        assert set(p) == {"proj", "gates", "read", "copy"} and all(v > 0 for v in p.values())
        assert out["floor_us"] == {"proj": 12 * p["proj"], "gates": 12 * p["gates"],
                                   "bytes": 6 * (reads * p["read"] + copies * p["copy"])}
        want = (out["original_ms"] + sum(out["floor_us"].values()) / 1e3) / out["original_ms"]
        assert abs(out["floor_ratio"] - want) < 1e-12 and out["mhc_ms"] > 0
    with pytest.raises(SystemExit, match="--models"):
        floor.main(["--quick", "--models", "bert"])
