"""Plot benchmarks/results/serving_prefill_h100.json: TTFT speedup of CLAA over plain FlashInfer, with
the analytical ceiling 1 / (F/L + keep (1 - F/L)) of each keep ratio.

    python -m benchmarks.plot_serving_prefill [--json PATH] [--png PATH]
"""

from __future__ import annotations

import argparse
import json
import os

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=os.path.join(HERE, "serving_prefill_h100.json"))
    ap.add_argument("--png", default=os.path.join(HERE, "serving_prefill_h100.png"))
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in json.load(open(args.json)) if r["config"] != "flashinfer" and r.get("speedup")]
    cells = sorted({(r["input_len"], r["concurrency"]) for r in rows})
    configs = sorted({r["config"] for r in rows}, key=lambda c: [r["keep"] for r in rows if r["config"] == c][0])
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / max(1, len(configs))
    for j, cfg in enumerate(configs):
        by = {(r["input_len"], r["concurrency"]): r for r in rows if r["config"] == cfg}
        xs = [i + (j - (len(configs) - 1) / 2) * width for i, c in enumerate(cells) if c in by]
        ys = [by[c]["speedup"] for c in cells if c in by]
        bars = ax.bar(xs, ys, width, label=f"{cfg} (ceiling {by[next(iter(by))]['ceiling']:.2f}x)")
        for x, c in zip(xs, [c for c in cells if c in by]):
            ax.hlines(by[c]["ceiling"], x - width / 2, x + width / 2, colors="k", linestyles=":")
        ax.bar_label(bars, fmt="%.2fx", fontsize=7)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(range(len(cells)))
    ax.set_xticklabels([f"{L // 1024}K, conc {C}" for L, C in cells])
    ax.set_ylabel("median TTFT speedup vs SGLang FlashInfer")
    gpu = rows[0].get("gpu", "GPU") if rows else "GPU"
    ax.set_title(f"CLAA prefill in SGLang, Llama-3.1-8B shape (dummy weights), filter layer 15/32, {gpu}\n"
                 "dotted: analytical ceiling 1/(F/L + keep(1-F/L))", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(args.png)


if __name__ == "__main__":
    main()
