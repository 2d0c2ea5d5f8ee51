"""Plot a serving_decode results file: median TPOT / ITL per config (bars), speedup over plain FlashInfer.

    python -m benchmarks.plot_serving_decode [JSON] [--png PATH]
"""

from __future__ import annotations

import argparse
import json
import os

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def plot(json_path: str, png: str | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png = png or json_path.replace(".json", ".png")
    rows = [r for r in json.load(open(json_path)) if r.get("median_tpot_ms")]
    def key(r):
        return r["input_len"], r["concurrency"], bool(r.get("warm_prefix")), r.get("tp", 1)

    cells = sorted({key(r) for r in rows})
    fig, axes = plt.subplots(1, len(cells), figsize=(max(7.5, 5.5 * len(cells)), 4.2), squeeze=False)
    for ax, (L, C, warm, tp) in zip(axes[0], cells):
        cell = [r for r in rows if key(r) == (L, C, warm, tp)]
        base = next((r["median_tpot_ms"] for r in cell if r["config"] == "flashinfer"), None)
        names = [r["config"] for r in cell]
        x = range(len(cell))
        ax.bar([i - 0.2 for i in x], [r["median_tpot_ms"] for r in cell], 0.4, label="median TPOT")
        ax.bar([i + 0.2 for i in x], [r.get("median_itl_ms") or 0 for r in cell], 0.4, label="median ITL")
        if base:
            for i, r in enumerate(cell):
                ax.annotate(f"{base / r['median_tpot_ms']:.2f}x", (i - 0.2, r["median_tpot_ms"]), ha="center",
                            va="bottom", fontsize=7)
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("ms per output token")
        ax.set_title(f"input {L // 1024}K, concurrency {C}{', prompts cached' if warm else ''} "
                     f"({cell[0].get('gpu', 'GPU')}{f' x{tp}, TP {tp}' if tp > 1 else ''})", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("Decode in SGLang, Llama-3.1-8B shape (dummy weights); labels: TPOT speedup vs flashinfer",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return png


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="?", default=os.path.join(HERE, "serving_decode_h100.json"))
    ap.add_argument("--png", default=None)
    args = ap.parse_args(argv)
    print(plot(args.json, args.png))


if __name__ == "__main__":
    main()
