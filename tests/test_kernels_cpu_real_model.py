"""The decode kernels on a real model's queries and KV (SmolLM2-135M-Instruct), against the reference math.

Random test data missed a regime real models produce: page upper bounds far below zero broke the selector's
sort (a server crash on SmolLM2 with ART). This test takes one decode step of SmolLM2 on a needle prompt from
the quality harness, in the CPU reference model (``sglang_sparse.eval.cpu_reference``), and gives the kernels
its 30 layers as a batch of 30 requests (each layer's query, keys and values, in randomly placed pages), under
dense, dense + ART, PrHS and PrHS + ART plans; ``kernel_cases.check_decode`` checks bounds, selections, ART's
decisions and outputs against the reference, and the interpreter's bounds check (CPU) or the GPU itself
catches any access outside the buffers.

ci/run_tests.sh collects it with the other interpreter tests (``test_kernels_cpu*.py``), after
tests/test_eval_tasks.py has converted the checkpoint. It needs that converted checkpoint (``python -m
benchmarks.models.smollm2``, or a directory in ``$SGLANG_SPARSE_SMOLLM2_DIR``) and is skipped without it or with
``SGLANG_SPARSE_SMOLLM2_TEST=0``. On CPU it runs the kernels in Triton's
interpreter (about 6 minutes on two cores); on a GPU, compiled. ``SGLANG_SPARSE_REAL_LENGTH`` sets the prompt
length (default 7168 tokens: at 2K only one page of the 30 layers has a bound <= -2, at 7K 165, and there the
selector's old sort padding fails this test with a read outside every buffer).
"""

import os
from pathlib import Path

import pytest

from kernel_cases import check_decode, fresh_seed, interpreter_device, pool_from_kv

DEVICE = interpreter_device("tests/test_kernels_cpu_real_model.py")   # before flashinfer_ext's kernels are defined

REPO = Path(__file__).resolve().parents[1]
MODEL = Path(os.environ.get("SGLANG_SPARSE_SMOLLM2_DIR", REPO / ".models" / "SmolLM2-135M-Instruct"))

pytestmark = [pytest.mark.usefixtures("triton_interpreter_bf16_dot", "interpreter_bounds_check"),
              pytest.mark.skipif(not (MODEL / "conversion.json").exists()
                                 or os.environ.get("SGLANG_SPARSE_SMOLLM2_TEST") == "0",
                                 reason=f"needs the SmolLM2 checkpoint in {MODEL} (benchmarks/models/smollm2.py)")]


def _decode_step_layers(length: int):
    """(qs, ks, vs): per layer, the query of the first decode step and the keys / values it attends to."""
    import torch

    from sglang_sparse.eval import tasks as T
    from sglang_sparse.eval.cpu_reference import ReferenceLlama, RefConfig
    from sglang_sparse.eval.harness import PromptFormat, render_prompt, template_overhead

    model = ReferenceLlama(str(MODEL))
    tok = model.tokenizer
    fmt = PromptFormat("chat", "chatml")
    s = T.make_sample("single_needle", length, 0, tok, seed=0, haystack="essays",
                      reserve=template_overhead(fmt, T.token_counter(tok)))
    ids = tok(render_prompt(s, fmt))["input_ids"]
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


def test_decode_kernels_on_smollm2_layers():
    import torch

    length = int(os.environ.get("SGLANG_SPARSE_REAL_LENGTH", "7168"))
    qs, ks, vs = _decode_step_layers(length)
    seed = fresh_seed()
    P = 32
    pool = pool_from_kv(qs, ks, vs, P, DEVICE, torch.Generator().manual_seed(seed))
    art = dict(art=True, tau_mag=1e-3, tau_dir=1e-6, patience=2, min_blocks=4)
    h_q, h_kv, d = qs[0].shape[0], ks[0].shape[1], ks[0].shape[2]
    check_decode(None, P, h_q, h_kv, d, d, DEVICE, seed,
                 [dict(mode="dense"), dict(mode="dense", **art), dict(mode="prhs", budget=1 / 16, delta=0.05),
                  dict(mode="prhs", budget=1 / 4, delta=0.05, **art)],
                 pool=pool, max_seq_len=max(k.shape[0] for k in ks) + P)
    # the regime this test exists for: real keys give pages with upper bounds far below zero
    from sglang_sparse import prhs

    ub_negative = sum(int((prhs.page_bounds(q.double(), *prhs.page_summaries(k.double(), P), d ** -0.5)[0]
                           <= -2).sum()) for q, k in zip(qs, ks))
    assert ub_negative >= 10, f"{ub_negative} page bounds <= -2: the data hardly exercises the regime this test is for"
