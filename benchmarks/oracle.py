"""Answer-Informed Oracle and a per-layer report of token-ranking quality.

The oracle (CLAA paper) defines ground-truth prompt-token importance by how much the *answer*
attends to the prompt. For a prompt of S tokens and an answer of A tokens (generated greedily, or a
reference answer), with post-RoPE queries ``q_l[h, a]`` of answer token a and prompt keys
``k_l[g, j]`` at layer l (h reads KV head g = h // G)::

    P[l, h, a, j] = softmax_{j < S}( scale * q_l[h, a] . k_l[g, j] )      (softmax over the prompt keys only)
    M[a, j]       = max_{l, h} P[l, h, a, j]                              (max over layers and heads)
    oracle[j]     = mean_{a < k} M[a, j]                                  (first k answer tokens)
    oracle        = pool(oracle)                                          (optional 1-D pooling; off by default)

Ranking quality of a heuristic importance ``x`` (higher = keep) against the oracle ``o``, both
restricted to the prefix ``[0, S - w)`` (the w window tokens are kept by every method, so they are
left out of both):

* Spearman rank correlation: the Pearson correlation of the average ranks of x and o (:func:`spearman`).
* Mass recall at keep ratio r: with ``K = num_kept_tokens(S, r, w) - w`` prefix tokens kept
  (:func:`sglang_sparse.claa.num_kept_tokens`), H = the top-K prefix tokens by x, O = the top-K by o::

      recall@r = sum_{j in H} o[j] / sum_{j in O} o[j]      in [0, 1]; 1 = the oracle's own choice

  (:func:`mass_recall`).

The oracle and the metrics are :mod:`sglang_sparse.answer_oracle`'s (imported here).

Heuristics per layer l (the table's ``layer`` is the last layer whose scores are used, so a filter
layer f corresponds to the row l = f - 1):

* ``claa``: :func:`~sglang_sparse.claa.aggregate_max` of the window scores of layers
  ``max(0, l-N+1) .. l`` (N = ``--num-agg-layers``, 4);
* ``fastkv``: :func:`~sglang_sparse.claa.rank_fastkv` of layer l's window scores (w, avg pool 7);
* ``gemfilter``: :func:`~sglang_sparse.claa.rank_gemfilter` of layer l's last-query scores (w = 1,
  no pooling); GemFilter's own choice is one early layer (13 of 32, marked in the JSON);
* ``ranksum``: :func:`~sglang_sparse.claa.rank_weighted_ranksum` over the same layers as ``claa``.

Queries and keys are captured post-RoPE, exactly as the attention receives them, by an attention
function registered with transformers' ``AttentionInterface`` that records its inputs and then runs
SDPA (:mod:`sglang_sparse.capture`; :func:`verify_capture` checks them against the eager attention's
probabilities).

CLI::

    python -m benchmarks.oracle --model-path DIR --data FILE.jsonl --out DIR [--device cuda|cpu]
        [--max-new-tokens K] [--keep-ratios 0.1,0.2,0.4] [--window 8] [--num-agg-layers 4] ...

``FILE.jsonl`` rows: ``{"prompt": str, "answer": optional str}``. Writes ``ranking_quality.csv``,
``ranking_quality.json`` and ``ranking_quality.png`` under ``--out``. Never downloads anything: the
model and tokenizer are loaded with ``local_files_only=True``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from sglang_sparse.answer_oracle import (
    answer_attention_max,
    mass_recall,
    oracle_importance,
    ranking_metrics,
    spearman,
)
from sglang_sparse.claa import (
    aggregate_max,
    default_filter_layer,
    default_gemfilter_layer,
    pool_scores,
    rank_fastkv,
    rank_gemfilter,
    rank_weighted_ranksum,
    window_scores,
)
from sglang_sparse.capture import Capturing as _Capturing
from sglang_sparse.capture import capture_qk, verify_capture
from sglang_sparse.capture import register_capture as _register_capture

__all__ = [
    "METHODS",
    "OracleConfig",
    "spearman",
    "mass_recall",
    "answer_attention_max",
    "oracle_importance",
    "heuristic_importances",
    "ranking_metrics",
    "capture_qk",
    "verify_capture",
    "run",
    "main",
]

METHODS = ("claa", "fastkv", "gemfilter", "ranksum")


def heuristic_importances(window_layer_scores: Sequence[Tensor], last_query_scores: Sequence[Tensor], layer: int,
                          num_agg_layers: int) -> Dict[str, Tensor]:
    """Importance ``[S]`` of each method in :data:`METHODS` at ``layer`` (module docstring).

    window_layer_scores[l]: ``window_scores(q_l, k_l, w, pool_kernel)`` ``[H_kv, S]``;
    last_query_scores[l]: ``window_scores(q_l, k_l, 1, 1)`` ``[H_kv, S]``.
    """
    span = list(window_layer_scores[max(0, layer - num_agg_layers + 1): layer + 1])
    return {
        "claa": aggregate_max(span),
        "fastkv": rank_fastkv(window_layer_scores[layer]),
        "gemfilter": rank_gemfilter(last_query_scores[layer]),
        "ranksum": rank_weighted_ranksum(span),
    }


# --------------------------------------------------------------------------- one sample
@dataclass
class OracleConfig:
    keep_ratios: Tuple[float, ...] = (0.1, 0.2, 0.4)
    window: int = 8
    pool_kernel: int = 7
    pool: str = "avg"
    num_agg_layers: int = 4
    max_new_tokens: int = 32
    oracle_k: Optional[int] = None
    oracle_pool_kernel: int = 1
    oracle_pool: str = "max"
    use_reference_answers: bool = True
    chat_template: bool = False
    max_prompt_tokens: Optional[int] = None


class _SampleCollector:
    """Per-layer callback of the teacher-forced pass over prompt + answer."""

    def __init__(self, prompt_len: int, answer_len: int, cfg: OracleConfig):
        self.s, self.a, self.cfg = prompt_len, answer_len, cfg
        self.k_or = answer_len if cfg.oracle_k is None else max(1, min(cfg.oracle_k, answer_len))
        self.window_scores: Dict[int, Tensor] = {}
        self.last_query: Dict[int, Tensor] = {}
        self.answer_max: Optional[Tensor] = None

    def __call__(self, layer, query, key, scale):
        s = self.s
        q = query[0].transpose(0, 1).float()          # [T, H_q, D]
        k = key[0].transpose(0, 1).float()            # [T, H_kv, D]
        qp, kp = q[:s], k[:s]
        c = self.cfg
        self.window_scores[layer] = window_scores(qp, kp, c.window, c.pool_kernel, c.pool, sm_scale=scale).cpu()
        self.last_query[layer] = window_scores(qp, kp, 1, 1, sm_scale=scale).cpu()
        m = answer_attention_max(q[s: s + self.k_or], kp, scale)
        self.answer_max = m if self.answer_max is None else torch.maximum(self.answer_max, m)

    def oracle(self) -> Tensor:
        imp = self.answer_max.mean(dim=0).cpu()
        c = self.cfg
        return pool_scores(imp, c.oracle_pool_kernel, c.oracle_pool) if c.oracle_pool_kernel > 1 else imp


def _prompt_ids(tokenizer, prompt: str, cfg: OracleConfig) -> List[int]:
    if cfg.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    ids = list(ids)
    lim = cfg.max_prompt_tokens
    if lim and len(ids) > lim:                        # keep both ends (LongBench-style middle truncation)
        ids = ids[: lim // 2] + ids[len(ids) - (lim - lim // 2):]
    return ids


@torch.no_grad()
def _answer_ids(model, tokenizer, prompt_ids: List[int], row: dict, cfg: OracleConfig, device) -> Tuple[List[int], str]:
    ref = row.get("answer")
    if isinstance(ref, (list, tuple)):
        ref = ref[0] if ref else None
    if cfg.use_reference_answers and isinstance(ref, str) and ref.strip():
        ids = tokenizer(ref, add_special_tokens=False)["input_ids"][: cfg.max_new_tokens]
        if ids:
            return list(ids), "reference"
    inp = torch.tensor([prompt_ids], device=device)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    gen = model.generate(input_ids=inp, attention_mask=torch.ones_like(inp), max_new_tokens=cfg.max_new_tokens,
                         do_sample=False, pad_token_id=pad, eos_token_id=eos)
    return gen[0, len(prompt_ids):].tolist(), "generated"


@torch.no_grad()
def evaluate_sample(model, tokenizer, row: dict, cfg: OracleConfig, device) -> Optional[dict]:
    """Per-layer metrics of every method for one jsonl row; None if the prompt is too short."""
    prompt_ids = _prompt_ids(tokenizer, row["prompt"], cfg)
    s_len = len(prompt_ids)
    if s_len - min(cfg.window, s_len) < 2:
        return None
    answer, source = _answer_ids(model, tokenizer, prompt_ids, row, cfg, device)
    if not answer:
        return None
    col = _SampleCollector(s_len, len(answer), cfg)
    with _Capturing(model, col):
        model(input_ids=torch.tensor([prompt_ids + answer], device=device), use_cache=False)
    oracle = col.oracle()
    layers = sorted(col.window_scores)
    ws = [col.window_scores[l] for l in layers]
    lq = [col.last_query[l] for l in layers]
    per_layer = []
    for li in range(len(layers)):
        imps = heuristic_importances(ws, lq, li, cfg.num_agg_layers)
        per_layer.append({name: ranking_metrics(x, oracle, cfg.window, cfg.keep_ratios) for name, x in imps.items()})
    return {"prompt_tokens": s_len, "answer_tokens": len(answer), "oracle_tokens": col.k_or,
            "answer_source": source, "per_layer": per_layer}


# --------------------------------------------------------------------------- report
def _metric_names(keep_ratios: Sequence[float]) -> List[str]:
    return ["spearman"] + [f"recall@{r:g}" for r in keep_ratios]


def summarise(samples: Sequence[dict], keep_ratios: Sequence[float]) -> List[dict]:
    """Mean (and std) over samples per (layer, method): rows for the CSV/JSON table."""
    names = _metric_names(keep_ratios)
    num_layers = len(samples[0]["per_layer"])
    rows = []
    for layer in range(num_layers):
        for method in METHODS:
            row = {"layer": layer, "method": method}
            for name in names:
                vals = torch.tensor([s["per_layer"][layer][method][name] for s in samples], dtype=torch.float64)
                vals = vals[~torch.isnan(vals)]
                row[name] = float(vals.mean()) if vals.numel() else float("nan")
                row[name + "_std"] = float(vals.std(unbiased=False)) if vals.numel() else float("nan")
                row["n_" + name] = int(vals.numel())
            rows.append(row)
    return rows


def _plot(rows: List[dict], keep_ratios: Sequence[float], path: str, marks: Dict[str, int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = _metric_names(keep_ratios)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        for method in METHODS:
            pts = [(r["layer"], r[name]) for r in rows if r["method"] == method]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=method)
        for label, layer in marks.items():
            ax.axvline(layer, color="grey", linestyle=":", linewidth=1)
        ax.set_title(name if name == "spearman" else f"oracle mass {name}")
        ax.set_xlabel("layer (last scored)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("vs Answer-Informed Oracle")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out_dir: str, samples: List[dict], cfg: OracleConfig, meta: dict) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    rows = summarise(samples, cfg.keep_ratios)
    paths = {k: os.path.join(out_dir, f"ranking_quality.{k}") for k in ("csv", "json", "png")}
    fields = ["layer", "method"]
    for name in _metric_names(cfg.keep_ratios):
        fields += [name, name + "_std", "n_" + name]
    with open(paths["csv"], "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=fields)
        wr.writeheader()
        wr.writerows(rows)
    num_layers = len(samples[0]["per_layer"])
    marks = {"claa rows (filter layer - 1)": default_filter_layer(num_layers) - 1} if num_layers >= 2 else {}
    with open(paths["json"], "w") as f:
        json.dump({"config": asdict(cfg), "meta": meta, "num_layers": num_layers,
                   "defaults": {"filter_layer": default_filter_layer(num_layers) if num_layers >= 2 else None,
                                "claa_row": marks.get("claa rows (filter layer - 1)"),
                                "gemfilter_layer": default_gemfilter_layer(num_layers) if num_layers >= 2 else None},
                   "rows": rows,
                   "samples": [{k: v for k, v in s.items() if k != "per_layer"} for s in samples]},
                  f, indent=1, allow_nan=True)
    _plot(rows, cfg.keep_ratios, paths["png"], marks)
    return paths


# --------------------------------------------------------------------------- CLI
def _read_jsonl(path: str, limit: Optional[int]) -> List[dict]:
    rows = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f"{path}:{line_no}: each row needs a string field 'prompt'")
            rows.append(row)
            if limit and len(rows) >= limit:
                break
    return rows


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.oracle",
                                description="Answer-Informed Oracle: per-layer token-ranking quality of CLAA, "
                                            "FastKV- and GemFilter-style heuristics.")
    p.add_argument("--model-path", required=True, help="local Hugging Face model directory (causal LM)")
    p.add_argument("--data", required=True, help='jsonl with {"prompt": ..., "answer": optional}')
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="model dtype (auto: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer tokens (generated or reference)")
    p.add_argument("--keep-ratios", default="0.1,0.2,0.4", help="comma-separated keep ratios for mass recall")
    p.add_argument("--window", type=int, default=8, help="observation window of the heuristics")
    p.add_argument("--pool-kernel", type=int, default=7, help="pooling kernel of the window scores")
    p.add_argument("--pool", default="avg", choices=("avg", "max"))
    p.add_argument("--num-agg-layers", type=int, default=4, help="CLAA: layers aggregated (ending at each row)")
    p.add_argument("--oracle-k", type=int, default=None, help="mean over the first k answer tokens (default: all)")
    p.add_argument("--oracle-pool-kernel", type=int, default=1, help="pooling of the oracle (1 = none; authors: 13)")
    p.add_argument("--oracle-pool", default="max", choices=("avg", "max"))
    p.add_argument("--generate", action="store_true", help="always generate answers, ignoring reference answers")
    p.add_argument("--chat-template", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="truncate longer prompts in the middle")
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--verify", action="store_true",
                   help="check the captured q/k against eager attention on the first prompt and record it")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _load(model_path: str, device: str, dtype_name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype_name == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        dtype = getattr(torch, dtype_name)
    _register_capture()
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True, dtype=dtype,
                                                 attn_implementation="sdpa")
    model.to(device).eval()
    return model, tokenizer


def run(args: argparse.Namespace) -> Dict[str, str]:
    from tqdm import tqdm

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    keep = tuple(float(x) for x in args.keep_ratios.split(",") if x.strip())
    if not keep or any(not 0 < r <= 1 for r in keep):
        raise SystemExit(f"--keep-ratios must be in (0, 1], got {args.keep_ratios!r}")
    cfg = OracleConfig(keep_ratios=keep, window=args.window, pool_kernel=args.pool_kernel, pool=args.pool,
                       num_agg_layers=args.num_agg_layers, max_new_tokens=args.max_new_tokens,
                       oracle_k=args.oracle_k, oracle_pool_kernel=args.oracle_pool_kernel,
                       oracle_pool=args.oracle_pool, use_reference_answers=not args.generate,
                       chat_template=args.chat_template, max_prompt_tokens=args.max_prompt_tokens)
    rows = _read_jsonl(args.data, args.max_samples)
    if not rows:
        raise SystemExit(f"{args.data}: no rows")
    t0 = time.time()
    model, tokenizer = _load(args.model_path, device, args.dtype)
    meta = {"model_path": os.path.abspath(args.model_path), "data": os.path.abspath(args.data), "device": device,
            "dtype": str(next(model.parameters()).dtype), "rows": len(rows)}
    if args.verify:
        ids = torch.tensor([_prompt_ids(tokenizer, rows[0]["prompt"], cfg)], device=device)
        meta["verify_max_abs_diff"] = verify_capture(model, ids)
    samples, skipped = [], 0
    for row in tqdm(rows, desc="oracle", unit="prompt", disable=args.no_progress, file=sys.stderr):
        res = evaluate_sample(model, tokenizer, row, cfg, device)
        if res is None:
            skipped += 1
        else:
            samples.append(res)
    if not samples:
        raise SystemExit("every prompt was shorter than the window (or produced no answer): nothing to report")
    meta.update(skipped=skipped, evaluated=len(samples), seconds=round(time.time() - t0, 3))
    return write_report(args.out, samples, cfg, meta)


def main(argv: Optional[Sequence[str]] = None) -> int:
    paths = run(_parse_args(argv))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
