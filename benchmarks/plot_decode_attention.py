"""Plot benchmarks/results/decode_attention_h100.json (speedup over FlashInfer dense and the fraction
of the copy bandwidth, per batch x context, one column per KV set).

    python -m benchmarks.plot_decode_attention [benchmarks/results/decode_attention_h100.json]

Writes the PNG next to the JSON (same name, .png). Needs matplotlib (the CPU venv has it), so the
plot can be redrawn off the GPU machine from the JSON alone.
"""

from __future__ import annotations

import json
import os
import sys

SERIES = [  # (label, predicate)
    ("FlashInfer dense (page 1)", lambda r: r["method"] == "flashinfer_dense_p1"),
    ("ours dense", lambda r: r["method"] == "ours_dense"),
    ("ours dense + ART", lambda r: r["method"] == "ours_dense_art"),
    ("PrHS 1/8, d 0.05", lambda r: r["method"] == "ours_prhs" and abs(r["budget"] - 1 / 8) < 1e-9 and r["delta"] == 0.05),
    ("PrHS 1/16, d 0.05", lambda r: r["method"] == "ours_prhs" and abs(r["budget"] - 1 / 16) < 1e-9 and r["delta"] == 0.05),
    ("PrHS 1/32, d 0.05", lambda r: r["method"] == "ours_prhs" and abs(r["budget"] - 1 / 32) < 1e-9 and r["delta"] == 0.05),
    ("PrHS 1/16 + ART", lambda r: r["method"] == "ours_prhs_art"),
    ("PrHS 1/16, shared selection", lambda r: r["method"] == "ours_prhs_shared"),
]


def plot(json_path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(json_path) as f:
        rows = json.load(f)
    kinds = [k for k in ("random", "needle") if any(r["kv_set"] == k for r in rows)]
    configs = sorted({(r["batch"], r["context"]) for r in rows}, key=lambda c: (c[1], c[0]))
    labels = [f"b{b}\n{c // 1024}K" for b, c in configs]
    fig, axes = plt.subplots(2, max(1, len(kinds)), figsize=(7 * max(1, len(kinds)), 8), squeeze=False)
    for col, kind in enumerate(kinds):
        for label, pred in SERIES:
            sp, bw = [], []
            for cfg in configs:
                match = [r for r in rows if r["kv_set"] == kind and (r["batch"], r["context"]) == cfg and pred(r)]
                sp.append(match[0]["speedup_vs_flashinfer"] if match and match[0]["speedup_vs_flashinfer"] else None)
                bw.append(match[0]["frac_copy_bw"] * 100 if match else None)
            if all(v is None for v in sp + bw):
                continue
            xs = [i for i, v in enumerate(sp) if v is not None]
            axes[0][col].plot(xs, [sp[i] for i in xs], marker="o", label=label)
            xs = [i for i, v in enumerate(bw) if v is not None]
            axes[1][col].plot(xs, [bw[i] for i in xs], marker="o", label=label)
        ax = axes[0][col]
        ax.set_yscale("log", base=2)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_title(f"{kind} KV: speedup over FlashInfer dense (best page size)")
        ax.set_ylabel("speedup (x)")
        ax = axes[1][col]
        ax.set_title(f"{kind} KV: achieved bandwidth on the bytes read")
        ax.set_ylabel("% of measured copy bandwidth")
        ax.set_ylim(0, 110)
        for ax in axes[:, col]:
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    meta_path = json_path.replace(".json", "_meta.json")
    device = "GPU"
    if os.path.exists(meta_path):     # decode_attention.py writes the device name beside the rows
        with open(meta_path) as f:
            device = json.load(f).get("device", device)
    fig.suptitle(f"Decode attention, one Llama-3.1-8B layer (32 q / 8 KV heads, d 128, bf16), {device}")
    fig.tight_layout()
    png = os.path.splitext(json_path)[0] + ".png"
    fig.savefig(png, dpi=110)
    return png


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                               "results", "decode_attention_h100.json")
    print(plot(path))
