"""The decode and CLAA scoring kernels on a real model's data (SmolLM2-135M-Instruct), against the reference math.

Random test data missed a regime real models produce: page upper bounds far below zero broke the selector's
sort (a server crash on SmolLM2 with ART). This test takes one decode step of SmolLM2 on a needle prompt from
the quality harness, in the CPU reference model (``benchmarks.eval.cpu_reference``), and gives the kernels
the layers with the most pages whose upper bound is below -2 (``SGLANG_SPARSE_REAL_LAYERS``, default 4, plus layer 0;
0 = all 30) as a batch of requests (each layer's query, keys and values, in randomly placed pages), under dense,
dense + ART, PrHS and PrHS + ART plans; ``kernel_cases.check_decode`` checks bounds, selections, ART's
decisions and outputs against the reference, and the interpreter's bounds check (CPU) or the GPU itself
catches any access outside the buffers. A second test scores SmolLM2's 7K-token prefill with CLAA's window
kernel at the default aggregated layers and compares scores and kept tokens with the reference.

ci/run_tests.sh collects it with the other interpreter tests (``test_kernels_cpu*.py``), after
tests/test_eval_tasks.py has converted the checkpoint. It needs that converted checkpoint (``python -m
benchmarks.models.smollm2``, or a directory in ``$SGLANG_SPARSE_SMOLLM2_DIR``) and is skipped without it or with
``SGLANG_SPARSE_SMOLLM2_TEST=0``. On CPU it runs the kernels in Triton's interpreter (both tests about 3.5 minutes
on two cores, each including a 7K-token prefill of the reference model); on a GPU, compiled.
``SGLANG_SPARSE_REAL_LENGTH`` sets the prompt length (default 7168 tokens: at 2K only one page of the 30 layers has a
bound <= -2, at 7K 165, 144 of them in the four layers chosen by default, and there the selector's old sort padding
fails this test with a read outside every buffer).
"""

import os
from pathlib import Path

import pytest

from kernel_cases import art_p, check_decode, every_page, fresh_seed, interpreter_device, pool_from_kv, sel

DEVICE = interpreter_device("tests/test_kernels_cpu_real_model.py")   # before flashinfer_ext's kernels are defined

REPO = Path(__file__).resolve().parents[1]
MODEL = Path(os.environ.get("SGLANG_SPARSE_SMOLLM2_DIR", REPO / ".models" / "SmolLM2-135M-Instruct"))

pytestmark = [pytest.mark.usefixtures("triton_interpreter_bf16_dot", "interpreter_bounds_check"),
              pytest.mark.skipif(not (MODEL / "conversion.json").exists()
                                 or os.environ.get("SGLANG_SPARSE_SMOLLM2_TEST") == "0",
                                 reason=f"needs the SmolLM2 checkpoint in {MODEL} (benchmarks/models/smollm2.py)")]


def _model_and_prompt(length: int):
    """The CPU reference model and the token ids of a single-needle prompt of ``length`` tokens."""
    from benchmarks.eval import tasks as T
    from benchmarks.eval.cpu_reference import ReferenceLlama
    from benchmarks.eval.harness import PromptFormat, render_prompt, template_overhead

    model = ReferenceLlama(str(MODEL))
    tok = model.tokenizer
    fmt = PromptFormat("chat", "chatml")
    s = T.make_sample("single_needle", length, 0, tok, seed=0, haystack="essays",
                      reserve=template_overhead(fmt, T.token_counter(tok)))
    return model, tok(render_prompt(s, fmt))["input_ids"]


def _decode_step_layers(length: int):
    """(qs, ks, vs): per layer, the query of the first decode step and the keys / values it attends to."""
    import torch

    from benchmarks.eval.cpu_reference import RefConfig

    model, ids = _model_and_prompt(length)
    (st, logits), = model.prefill_many(ids, [RefConfig("dense")]).values()
    st = st.for_decode(1)
    h = model.embed(torch.tensor([int(torch.argmax(logits))])).float()
    pos = torch.tensor([st.next_pos])
    qs, ks, vs = [], [], []
    with torch.no_grad():
        for i in range(model.num_layers):
            q, k, v = model._qkv(i, h, pos)
            st.append(i, k, v)
            qs.append(q[0])
            ks.append(st.k[i].clone())
            vs.append(st.v[i].clone())
            h = model._finish_layer(i, h, model._decode_attention(i, q[0], st, RefConfig("dense"),
                                                                  {"attn_calls": 0, "kv_tokens": 0.0,
                                                                   "tokens_read": 0.0})[None])
    return qs, ks, vs


def _negative_bound_pages(q, k, page_size: int) -> int:
    """(KV head, page) pairs of one layer whose float64 upper bound is <= -2 (the regime of the sort-padding bug)."""
    from sglang_sparse import prhs

    return int((prhs.page_bounds(q.double(), *prhs.page_summaries(k.double(), page_size), k.shape[2] ** -0.5)[0]
                <= -2).sum())


def _test_layers(negative, count: int):
    """The ``count`` layers with the most negative-bound pages, and layer 0 (every layer when ``count`` is 0 or
    covers them all), in layer order."""
    if count <= 0 or count >= len(negative):
        return list(range(len(negative)))
    ranked = sorted(range(len(negative)), key=lambda i: (-negative[i], i))
    return sorted(set(ranked[:count]) | {0})


def test_decode_kernels_on_smollm2_layers():
    """The layers that matter for the selector's sort (``SGLANG_SPARSE_REAL_LAYERS``, default 4: those with the
    most pages bounded below -2, plus layer 0), launched as a server batch of 30 requests would be: ART's
    sequential head walks each whole list."""
    import torch

    length = int(os.environ.get("SGLANG_SPARSE_REAL_LENGTH", "7168"))
    qs, ks, vs = _decode_step_layers(length)
    seed = fresh_seed()
    P = 32
    negative = [_negative_bound_pages(q, k, P) for q, k in zip(qs, ks)]
    layers = _test_layers(negative, int(os.environ.get("SGLANG_SPARSE_REAL_LAYERS", "4")))
    qs, ks, vs = [qs[i] for i in layers], [ks[i] for i in layers], [vs[i] for i in layers]
    pool = pool_from_kv(qs, ks, vs, P, DEVICE, torch.Generator().manual_seed(seed))
    a = art_p(1e-3, 1e-6, patience=2, min_blocks=4)
    h_q, h_kv, d = qs[0].shape[0], ks[0].shape[1], ks[0].shape[2]
    check_decode(None, P, h_q, h_kv, d, d, DEVICE, seed,
                 [dict(), dict(pages=every_page(), art=a), dict(pages=sel(1 / 16, 0.05)),
                  dict(pages=sel(1 / 4, 0.05), art=a)],
                 pool=pool, max_seq_len=max(k.shape[0] for k in ks) + P, num_sms=2 * len(layers) * h_kv)
    # the regime this test exists for: real keys give pages with upper bounds far below zero
    ub_negative = sum(negative[i] for i in layers)
    assert ub_negative >= 10, (f"layers {layers}: {ub_negative} page bounds <= -2: the data hardly exercises the "
                               f"regime this test is for")


def test_claa_scores_on_smollm2_prefill():
    """CLAA's window-scoring kernel on SmolLM2's prefill (the default aggregated layers before its default filter
    layer) against the reference, and the tokens CLAA keeps at 10 % from the kernel's cross-layer max against
    those kept from the reference's."""
    import torch

    from flashinfer_ext.claa_score import ClaaWindowScorer
    from kernel_cases import rel_err
    from sglang_sparse import claa

    length = int(os.environ.get("SGLANG_SPARSE_REAL_LENGTH", "7168"))
    model, ids = _model_and_prompt(length)
    n, window = len(ids), 8
    layers = claa.default_claa_layers(model.num_layers)
    sc = ClaaWindowScorer(model.h_q, model.h_kv, model.d, window, max_len=n, device=DEVICE)
    acc = torch.full((n,), float("-inf"), device=DEVICE)
    refs = []
    h = model.embed(torch.tensor(ids)).float()
    pos = torch.arange(n)
    with torch.no_grad():
        for i in range(max(layers) + 1):
            h, q, k, _ = model._prefill_layer(i, h, pos)
            if i not in layers:
                continue
            qb, kb = q.to(torch.bfloat16), k.to(torch.bfloat16)
            out = torch.full((model.h_kv, n), float("nan"), device=DEVICE)
            sc.score(qb.to(DEVICE), kb.to(DEVICE), acc, out)
            ref = claa.window_scores(qb.double(), kb.double(), window, sm_scale=model.sm_scale)
            refs.append(ref)
            e = rel_err(out.cpu(), ref)
            assert e <= 1e-4, f"layer {i}: window scores rel err {e:.2e}"
    agg = claa.aggregate_max(refs)
    assert rel_err(acc.cpu(), agg) <= 1e-4
    kept = set(claa.select_tokens(acc.cpu().double(), 0.1, window).tolist())
    kept_ref = set(claa.select_tokens(agg, 0.1, window).tolist())
    assert len(kept ^ kept_ref) <= max(2, len(kept_ref) // 100), f"{len(kept ^ kept_ref)} kept tokens differ"
