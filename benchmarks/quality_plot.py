"""Plot a quality table (``benchmarks/results/quality_<model>.json``): accuracy vs prompt length, one row of
panels per place the rows were measured (CPU reference, SGLang on the GPU), one panel per task that has
sparse settings, plus one panel for the tasks measured dense only; one colour per setting (dense black, our
backend with everything off grey, a hue per mechanism: CLAA blues, PrHS oranges, ART greens, combinations
purples), the same in every panel.

    python benchmarks/quality_plot.py [--model smollm2 | --json FILE.json --png FILE.png]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_JSON = RESULTS / "quality_smollm2.json"
DEFAULT_PNG = RESULTS / "quality_smollm2.png"
_WHERE = {"cpu-reference": "CPU reference (transformers + reference math)", "sglang-gpu": "SGLang on the GPU"}
_FAMILIES = (("claa", "Blues"), ("prhs", "Oranges"), ("art", "Greens"), ("all", "Purples"))
MODEL_TITLES = {"smollm2": "SmolLM2-135M-Instruct", "qwen2.5-coder-0.5b": "Qwen2.5-Coder-0.5B-Instruct",
                "qwen2.5-coder-1.5b": "Qwen2.5-Coder-1.5B-Instruct"}
# our backend with every mechanism off: a dense baseline, drawn grey and dashed
_OURS_DENSE = ("dense(sparse-backend)", "ours-off")


def results_paths(model: str) -> tuple:
    """The combined results file and its plot for a model's short name."""
    return RESULTS / f"quality_{model}.json", RESULTS / f"quality_{model}.png"


def model_title(model: str) -> str:
    return f"{MODEL_TITLES.get(model, model)}: exact-match accuracy"


def _family(config: str) -> str:
    if config == "dense" or config in _OURS_DENSE:
        return "dense"
    if config.startswith("all") or "+" in config:          # several mechanisms at once
        return "all"
    return next((f for f, _ in _FAMILIES if config.startswith(f)), "other")


def setting_colors(configs, plt) -> dict:
    """A colour per setting: dense black, our backend's dense grey, each mechanism's settings in shades of its
    hue (darkest first), anything else from tab10."""
    colors = {}
    for fam, cmap_name in _FAMILIES:
        members = [c for c in configs if _family(c) == fam]
        cmap = plt.get_cmap(cmap_name)
        for i, c in enumerate(members):
            colors[c] = cmap(0.9 - 0.55 * i / max(1, len(members) - 1))
    others = plt.get_cmap("tab10")
    for i, c in enumerate(c for c in configs if c not in colors):
        colors[c] = "black" if c == "dense" else ("0.55" if _family(c) == "dense" else others(i % 10))
    return colors


def _ticks(ax, lengths):
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths)
    ax.set_xticklabels([f"{L // 1024}K" if L % 1024 == 0 else str(L) for L in lengths])
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)


def plot(rows, png: Path, title: str = "SmolLM2-135M-Instruct: exact-match accuracy") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({r["config"] for r in rows}, key=lambda c: (c != "dense", _family(c), c))
    colors = setting_colors(configs, plt)
    wheres = sorted({r["where"] for r in rows}, key=lambda w: (w != "cpu-reference", w != "sglang-gpu", w))
    sparse_tasks = sorted({r["task"] for r in rows if r["config"] != "dense"})
    dense_only = sorted({r["task"] for r in rows} - set(sparse_tasks))
    ncols = len(sparse_tasks) + (1 if dense_only else 0)
    # the settings' legend on the right, in as many columns as its entries need at this height (~0.15 in each)
    height = 3.3 * len(wheres)
    legend_cols = max(1, math.ceil(len(configs) / max(6, int(height / 0.15))))
    width = 4.4 * ncols + 3.2 * legend_cols
    fig, axes = plt.subplots(len(wheres), ncols, figsize=(width, height), squeeze=False)
    seen = {}
    for i, where in enumerate(wheres):
        for j, task in enumerate(sparse_tasks):
            ax = axes[i][j]
            for c in configs:
                pts = sorted((r["length"], r["accuracy"], r["samples"]) for r in rows
                             if r["task"] == task and r["config"] == c and r["where"] == where)
                if not pts:
                    continue
                dense = _family(c) == "dense"
                (line,) = ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "--" if c in _OURS_DENSE else "-",
                                  marker="o", ms=3.5, lw=2.6 if dense else 1.4, color=colors[c],
                                  zorder=3 if dense else 2)
                seen.setdefault(c, line)
            ns = sorted({r["samples"] for r in rows if r["task"] == task and r["where"] == where})
            ax.set_title(f"{task}, {_WHERE.get(where, where).split(' (')[0]}"
                         + (f" (n={ns[0]}" + (f"-{ns[-1]}" if len(ns) > 1 else "") + ")" if ns else ""), fontsize=9)
            _ticks(ax, sorted({r["length"] for r in rows if r["task"] == task}))
        if dense_only:
            ax = axes[i][-1]
            if not any(r["where"] == where and r["task"] in dense_only for r in rows):
                ax.axis("off")
                continue
            styles = ["-", "--", ":", "-."]
            for k, task in enumerate(dense_only):
                pts = sorted((r["length"], r["accuracy"]) for r in rows
                             if r["task"] == task and r["config"] == "dense" and r["where"] == where)
                if pts:
                    ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], styles[k % 4], marker="o", ms=3.5,
                            color="black", label=task)
            ax.set_title(f"dense only, {_WHERE.get(where, where).split(' (')[0]}", fontsize=9)
            _ticks(ax, sorted({r["length"] for r in rows if r["task"] in dense_only}))
            if ax.get_legend_handles_labels()[1]:
                ax.legend(fontsize=7, frameon=False)
        axes[i][0].set_ylabel("accuracy (%)")
    for ax in axes[-1]:
        ax.set_xlabel("prompt tokens")
    if seen:
        order = [c for c in configs if c in seen]
        fig.legend([seen[c] for c in order], order, loc="center right", fontsize=7.5, frameon=False,
                   title="setting", title_fontsize=8, ncol=legend_cols)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1 - 3.0 * legend_cols / width, 0.96))
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="short model name: the results file to plot")
    ap.add_argument("--json", type=Path, default=None, help="results file (default from --model)")
    ap.add_argument("--png", type=Path, default=None)
    args = ap.parse_args(argv)
    json_path, png = results_paths(args.model)
    json_path = args.json or json_path
    png = args.png or (json_path.with_suffix(".png") if args.json else png)
    data = json.loads(json_path.read_text())
    model = next((r["model"] for r in data["rows"] if r.get("model")), args.model)
    plot(data["rows"], png, title=model_title(model))
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
