"""Where the time of one PrHS decode layer goes: page bounds, selection, sparse decode, one by one.

    python -m benchmarks.decode_breakdown [--configs 8x131072,8x32768] [--page-sizes 32,64]

Same data and timing as benchmarks/decode_attention.py (one Llama-3.1-8B layer: 32 query heads, 8 KV
heads, d 128, bf16 KV in SGLang's paged layout, random KV; CUDA-graph replays, median per call; ``--heads 12x2`` for
another model's heads, e.g. Qwen2.5-Coder-1.5B's, and ``--max-seq-len`` for a server's ``--context-length``, which
sizes the selection's tile: ``next_pow2`` of its pages, not of the request's). For
each (batch, context, page size), PrHS at budget 1/16 and delta 0.05:

* ``full``: ``SparseDecodeWrapper.run`` (bounds + selection + decode + merge), default launch shapes;
* ``bounds``: the page-bound kernel alone (reads every page summary), per (pages per program, warps);
* ``select``: the selection kernel alone, per warp count;
* ``full+art``: ``run`` with ART, per length of ART's sequential head (random KV: no stop);
* ``decode``: decode + merge over the selected pages (``run(select=False)``);
* ``dense``: ours over every page (the bandwidth reference of this machine);
* with ``--estimate-deltas``, ``--prhs-select estimate`` (every page allowed, delta on the estimated dropped mass;
  random key codes): ``estimate`` the page-mass estimate kernel alone (reads every page's 4-bit key codes),
  ``select-est`` the selection alone (normalisation, sort of every page, delta cut), ``full-est`` the whole run.

Output: ``benchmarks/results/decode_breakdown.json`` (and ``$OUT``), a table printed last.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from benchmarks.decode_attention import (DEV, Batch, art_params, copy_bandwidth_gbps, log, plan_args, prhs_pages,
                                         time_calls)
from benchmarks.serving import save_rows

H_Q, H_KV, D = 32, 8, 128


def set_heads(h_q: int, h_kv: int) -> None:
    """Time layers of ``h_q`` query / ``h_kv`` KV heads (here and in benchmarks.decode_attention's batches)."""
    global H_Q, H_KV
    from benchmarks import decode_attention

    if h_q % h_kv:
        raise ValueError(f"{h_q} query heads are not a multiple of {h_kv} KV heads")
    H_Q, H_KV = h_q, h_kv
    decode_attention.H_Q, decode_attention.H_KV, decode_attention.GROUP = h_q, h_kv, h_q // h_kv


def measure(bs: int, ctx: int, P: int, warps_list, bounds_shapes, art_heads, decode_shapes=(None,),
            estimate_deltas=(), estimate_shapes=(None,), max_seq_len: int = 0) -> list:
    from dataclasses import replace

    from flashinfer_ext.decode import SparseDecodeWrapper

    gen = torch.Generator().manual_seed(1234 + bs + ctx + P)
    batch = Batch(bs, ctx, P, gen)
    max_len = max(max_seq_len, ctx)
    w = SparseDecodeWrapper(H_Q, H_KV, D, P, max_batch_size=bs, max_seq_len=max_len, device=DEV)
    rows = []

    def row(part, us, **kw):
        r = dict(batch=bs, context=ctx, page_size=P, part=part, time_us=us, h_q=H_Q, h_kv=H_KV, max_seq_len=max_len,
                 **kw)
        rows.append(r)
        log(f"bs={bs} ctx={ctx} P={P} {part} {kw} {us:.1f} us")

    out = torch.empty(bs, H_Q, D, dtype=torch.bfloat16, device=DEV)
    w.plan(batch.req_to_token, batch.rows, batch.seq_lens, **plan_args({}, ctx))
    row("dense", time_calls(lambda i: w.run(batch.q, *batch.copies[i][:2], out=out), batch.n_copies)[0])

    prhs = prhs_pages(1 / 16, 0.05)
    w.plan(batch.req_to_token, batch.rows, batch.seq_lens, **plan_args(dict(pages=prhs), ctx))
    planned = w.launch
    row("full", time_calls(lambda i: w.run(batch.q, *batch.copies[i], out=out), batch.n_copies)[0],
        warps=planned.select_warps, block_p=planned.bounds_block_p, bounds_warps=planned.bounds_warps)
    q = batch.q
    # the stages alone: the planned launch with one stage's shape replaced
    for bp, bw, it in bounds_shapes:
        w.launch = replace(planned, bounds_block_p=bp, bounds_warps=bw, bounds_iters=it)
        row("bounds", time_calls(lambda i: w._launch_bounds(q, batch.copies[i][2], batch.copies[i][3]),
                                 batch.n_copies)[0], block_p=bp, bounds_warps=bw, bounds_iters=it)
    for warps in warps_list:
        w.launch = replace(planned, select_warps=warps)
        row("select", time_calls(lambda i: w._launch_select(), 1)[0], warps=warps)
    w.launch = planned
    for head, tail_pages in art_heads:
        w.plan(batch.req_to_token, batch.rows, batch.seq_lens, **plan_args(dict(
            pages=prhs, art=art_params(0.01, 1e-4), art_head_pages=head, art_tail_pages=tail_pages), ctx))
        row("full+art", time_calls(lambda i: w.run(batch.q, *batch.copies[i], out=out), batch.n_copies)[0],
            art_head=w.launch.head_len, splits=w.launch.num_splits, art_tail_pages=tail_pages)
    for shape in decode_shapes:
        # the sparse decode alone (the lists of the last selection), default launch or splits x warps x
        # pages per iteration x stages
        kw = {} if shape is None else dict(zip(("num_splits", "num_warps", "pages_per_iter", "num_stages"), shape))
        w.plan(batch.req_to_token, batch.rows, batch.seq_lens, **plan_args(dict(pages=prhs, **kw), ctx))
        la = w.launch
        row("decode", time_calls(lambda i: w.run(batch.q, *batch.copies[i], out=out, select=False), batch.n_copies)[0],
            splits=la.num_splits, decode_warps=la.num_warps, ppi=la.pages_per_iter, stages=la.num_stages)
    if estimate_deltas:
        from dataclasses import replace as _replace

        we = SparseDecodeWrapper(H_Q, H_KV, D, P, max_batch_size=bs, max_seq_len=max_len, device=DEV, estimate=True)
        codes = torch.randint(0, 256, (batch.kc.shape[0], H_KV, D // 2), dtype=torch.uint8, device=DEV)
        # 'auto': the wrapper's default for these heads
        estimate_shapes = [we.estimate_shape if x is None else x for x in estimate_shapes]
        for delta in estimate_deltas:
            pages = _replace(prhs_pages(1.0, delta), estimate=True)
            we.plan(batch.req_to_token, batch.rows, batch.seq_lens, **plan_args(dict(pages=pages), ctx))
            for shape in estimate_shapes:
                we.estimate_shape = shape
                row("estimate", time_calls(lambda i: we._launch_estimate(q, batch.copies[i][2], batch.copies[i][3],
                                                                          codes, batch.copies[i][0]),
                                           batch.n_copies)[0], delta=delta, est_pages=shape[0], est_warps=shape[1],
                    est_stages=shape[2], est_pages_per_dot=shape[3])
            we.estimate_shape = estimate_shapes[0]
            planned_est = we.launch
            for warps in sorted({planned_est.select_warps, *warps_list}):
                we.launch = _replace(planned_est, select_warps=warps)
                row("select-est", time_calls(lambda i: we._launch_select(), 1)[0], delta=delta, warps=warps,
                    planned=warps == planned_est.select_warps)
            we.launch = planned_est
            row("full-est", time_calls(lambda i: we.run(batch.q, *batch.copies[i], out=out, codes=codes),
                                       batch.n_copies)[0], delta=delta,
                pages_read=float(we.num_selected.float().mean()) / -(-ctx // P))
        del we
    batch.free()
    del w
    torch.cuda.empty_cache()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="8x131072,8x32768,1x131072,32x32768")
    ap.add_argument("--page-sizes", default="32")
    ap.add_argument("--warps", default="4,8,16,32")
    ap.add_argument("--art-heads", default="auto,8,32,6x4",
                    help="ART sequential head pages (auto = the default), optionally x the fewest pages per tail "
                         "split (default 8), e.g. auto,6x4")
    ap.add_argument("--bounds", default="64x4,128x4,64x4x4,64x4x8,128x4x4,64x8x8",
                    help="page-bound kernel shapes: pages per chunk x warps [x chunks per program]")
    ap.add_argument("--decode-shapes", default="auto",
                    help="sparse-decode launches: 'auto' (the plan's default) or splits x warps x pages per "
                         "iteration x stages, e.g. auto,8x4x1x3,32x4x1x3,16x8x2x3")
    ap.add_argument("--estimate-deltas", default="",
                    help="also time --prhs-select estimate at these deltas (comma list, e.g. 0.1,0.05)")
    ap.add_argument("--estimate-shapes", default="auto",
                    help="estimate-kernel launches to time: 'auto' (the wrapper's default for these heads) or pages "
                         "per program x warps x pipeline stages [x pages per tl.dot, default 1] (the first is used "
                         "for the other estimate rows), e.g. auto,8x4x2,8x4x2x4,16x4x3x2")
    ap.add_argument("--heads", default="32x8", help="query x KV heads of the layer (Llama-3.1-8B: 32x8)")
    ap.add_argument("--max-seq-len", type=int, default=0,
                    help="the wrappers' max_seq_len (a server's --context-length; 0 = each config's context)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "decode_breakdown.json"))
    args = ap.parse_args(argv)
    try:
        set_heads(*(int(x) for x in args.heads.split("x")))
    except (TypeError, ValueError) as exc:
        ap.error(f"--heads: {exc}")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rows = []
    warps = [int(x) for x in args.warps.split(",")]
    art_heads = []
    for x in args.art_heads.split(","):       # HEAD or HEADxTAIL (pages of the head, fewest pages per tail split)
        head, _, tail_pages = x.partition("x")
        art_heads.append((None if head == "auto" else int(head), int(tail_pages or 8)))
    bounds_shapes = [tuple(int(y) for y in (x.split("x") + ["1"])[:3]) for x in args.bounds.split(",")]
    decode_shapes = [None if x == "auto" else tuple(int(y) for y in x.split("x")) for x in args.decode_shapes.split(",")]
    if any(d is not None and len(d) != 4 for d in decode_shapes):
        ap.error("--decode-shapes entries are 'auto' or SPLITSxWARPSxPPIxSTAGES")
    fields = [None if x == "auto" else [int(y) for y in x.split("x")] for x in args.estimate_shapes.split(",")]
    estimate_shapes = [None if f is None else tuple(f + [1] * (4 - len(f))) for f in fields]  # 1 page per dot
    if any(f is not None and (len(f) not in (3, 4) or s[0] % s[3]) for f, s in zip(fields, estimate_shapes)):
        ap.error("--estimate-shapes entries are 'auto' or PAGESxWARPSxSTAGES[xPAGES_PER_DOT], PAGES a multiple of "
                 "the last")
    gbps = copy_bandwidth_gbps()
    log(f"copy bandwidth {gbps:.0f} GB/s on {torch.cuda.get_device_name()}")
    for P in (int(x) for x in args.page_sizes.split(",")):
        for cfg in args.configs.split(","):
            bs, ctx = (int(x) for x in cfg.split("x"))
            try:
                rows += measure(bs, ctx, P, warps, bounds_shapes, art_heads, decode_shapes,
                                [float(x) for x in args.estimate_deltas.split(",") if x],
                                estimate_shapes, args.max_seq_len)
            except Exception as exc:  # noqa: BLE001  keep the other configurations
                log(f"bs={bs} ctx={ctx} P={P} FAILED: {exc!r}")
    res = dict(gpu=torch.cuda.get_device_name(), copy_gbps=gbps, command="python -m benchmarks.decode_breakdown "
               + " ".join(argv if argv is not None else sys.argv[1:]), rows=rows)
    save_rows(res, args.out)
    print("\n| batch | context | P | part | select warps | launch shape | us |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        shape = f"{r['block_p']}x{r['bounds_warps']}x{r.get('bounds_iters', 1)}" if "block_p" in r else (
            f"ART head {r['art_head']}, {r['splits']} splits (tails >= {r.get('art_tail_pages', 8)} pages)" if "art_head" in r else
            f"{r['splits']} splits x {r['decode_warps']} warps x {r['ppi']} ppi x {r['stages']} stages"
            if "decode_warps" in r else (f"{r['est_pages']} pages x {r['est_warps']} warps x {r['est_stages']} stages x "
                                         f"{r['est_pages_per_dot']} per dot") if "est_pages" in r else "")
        print(f"| {r['batch']} | {r['context']} | {r['page_size']} | {r['part']} | {r.get('warps', '')} | "
              f"{shape} | {r['time_us']:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
