"""Plot the quality table (``benchmarks/results/quality_smollm2.json``): accuracy vs length, one panel per task,
one line per setting; CPU-reference rows solid, SGLang-GPU rows dashed.

    python benchmarks/quality_plot.py [--json benchmarks/results/quality_smollm2.json] [--png ...png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_JSON = RESULTS / "quality_smollm2.json"
DEFAULT_PNG = RESULTS / "quality_smollm2.png"
_SHORT = {"cpu-reference": "cpu ref", "sglang-gpu": "gpu"}


def plot(rows, png: Path, title: str = "SmolLM2-135M-Instruct: exact-match accuracy") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    configs = []
    for r in rows:
        if r["config"] not in configs:
            configs.append(r["config"])
    configs.sort(key=lambda c: (c != "dense", c))
    cmap = plt.get_cmap("tab10")
    colors = {c: cmap(i % 10) for i, c in enumerate(configs)}
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        wheres = sorted({r["where"] for r in rows}, key=lambda w: (w != "cpu-reference", w != "sglang-gpu", w))
        styles = {"cpu-reference": "-", "sglang-gpu": "--"}
        for where in wheres:
            style = styles.get(where, ":")
            for c in configs:
                pts = sorted((r["length"], r["accuracy"], r["samples"]) for r in rows
                             if r["task"] == task and r["config"] == c and r["where"] == where)
                if not pts:
                    continue
                xs = [p[0] for p in pts]
                ys = [100 * p[1] for p in pts]
                lw = 2.6 if c == "dense" else 1.5
                ax.plot(xs, ys, style, marker="o", ms=3.5, lw=lw, color=colors[c],
                        label=f"{c} ({_SHORT.get(where, where)})")
        ns = sorted({r["samples"] for r in rows if r["task"] == task})
        ax.set_title(f"{task} (n={ns[0]}" + (f"-{ns[-1]}" if len(ns) > 1 else "") + " per point)", fontsize=10)
        ax.set_xscale("log", base=2)
        lengths = sorted({r["length"] for r in rows if r["task"] == task})
        ax.set_xticks(lengths)
        ax.set_xticklabels([f"{L // 1024}K" if L % 1024 == 0 else str(L) for L in lengths])
        ax.set_ylim(-3, 103)
        ax.set_xlabel("prompt tokens")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    if labels:
        fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.06 + 0.03 * ((len(labels) - 1) // 5), 1, 0.95))
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--png", type=Path, default=DEFAULT_PNG)
    args = ap.parse_args(argv)
    data = json.loads(args.json.read_text())
    plot(data["rows"], args.png)
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
