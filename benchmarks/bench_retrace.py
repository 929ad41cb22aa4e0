"""The cost of a new call signature for a converted Hugging Face model's stream-carrying layers.

A converted layer's graph is specialised to the ``None``/flag arguments of the call it was traced
for; a call with another signature (a padding mask where the example had None) traces the layer
once more (``blocks.carry``). This prints, for tiny-to-small GPT-2 configs on the current device,
the eval forward time of the converted model with the example's signature (the baseline), the
first forward with a new signature (every layer retraced), the next one (cached), and the
retrace cost per layer, each as a ratio to the baseline measured in the same run.

    python benchmarks/bench_retrace.py            # GPT-2 4x256 and 12x768, batch 2, 16 tokens
    python benchmarks/bench_retrace.py --quick    # one small point (CI smoke)
"""
from __future__ import annotations

import argparse
import json
import time
import warnings


def measure(layers: int, width: int, tokens: int = 16, device: str = "cpu") -> dict:
    import torch
    import transformers

    import mhc_compile
    from mhc_compile import MHCConfig

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=1000, n_positions=4 * tokens, n_embd=width, n_layer=layers,
                                  n_head=max(1, width // 64))
    model = transformers.GPT2LMHeadModel(cfg).to(device).eval()
    ids = torch.randint(1, 1000, (2, tokens), device=device)
    converted = mhc_compile.convert(model, MHCConfig(streams=4), (ids,))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0

    def timed(**kw) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        converted(ids, **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    with torch.no_grad():
        timed()
        base = min(timed() for _ in range(3))
        first = timed(attention_mask=mask)
        cached = min(timed(attention_mask=mask) for _ in range(3))
    per_layer = (first - cached) / layers
    return {"layers": layers, "width": width, "forward_ms": 1e3 * base, "first_new_ms": 1e3 * first,
            "cached_new_ms": 1e3 * cached, "retrace_ms_per_layer": 1e3 * per_layer,
            "first_new_ratio": first / base, "cached_new_ratio": cached / base}


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    points = [(2, 64)] if args.quick else [(4, 256), (12, 768)]
    rows = [measure(layers, width, device=args.device) for layers, width in points]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'model':>10} {'forward ms':>11} {'1st new-signature ms (x)':>26} {'cached ms (x)':>15} {'retrace ms/layer':>17}")
        for r in rows:
            print(f"{r['layers']:>4}x{r['width']:<5} {r['forward_ms']:>11.1f} "
                  f"{r['first_new_ms']:>17.0f} ({r['first_new_ratio']:>5.1f}x) "
                  f"{r['cached_new_ms']:>7.1f} ({r['cached_new_ratio']:>4.2f}x) {r['retrace_ms_per_layer']:>17.0f}")
    return rows


if __name__ == "__main__":
    main()
