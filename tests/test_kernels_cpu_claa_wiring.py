"""CLAA's model-side wiring end to end at toy size: ClaaPrefill with the real window-scoring kernel
(Triton interpreter on CPU, compiled on a GPU), the real forward hooks on a toy decoder stack called the
way SGLang's Llama/Qwen loops call their layers, and the real ForwardBatch rewrite.

Checked against the reference math: the tokens the post-filter layers see are exactly CLAA's selection
(claa.window_scores of the aggregated layers -> claa.aggregate_max -> top-k + window) at their original
positions; layers before the filter layer see every token; the attention plan is rebuilt once; the kept
counts reach the logits output; per-row drops are recorded for decode. A batch without filtered
requests passes through untouched.
"""

from types import SimpleNamespace

import pytest
import torch

from kernel_cases import interpreter_device

DEVICE = interpreter_device("tests/test_kernels_cpu_claa_wiring.py")   # before flashinfer_ext's kernels

from sglang_sparse import claa  # noqa: E402
from sglang_sparse import claa_prefill as CP  # noqa: E402
from sglang_sparse.config import ClaaConfig  # noqa: E402
from test_claa_prefill import _hand_built_batch  # noqa: E402

pytestmark = pytest.mark.usefixtures("triton_interpreter_bf16_dot")

H_Q, H_KV, D, HID, L, F, P = 4, 2, 16, 8, 6, 4, 16


class ToyLayer(torch.nn.Module):
    """Called as SGLang's decoder layers are: layer(positions, hidden, forward_batch, residual)."""

    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    def forward(self, positions, hidden, forward_batch, residual):
        self.seen.append((positions.clone(), hidden.shape[0], None if residual is None else residual.shape[0]))
        return hidden + 1.0, (hidden.clone() if residual is None else residual)


class ToyLogits(torch.nn.Module):
    def forward(self, input_ids, hidden, lm_head, forward_batch, aux_hidden_states=None):
        return SimpleNamespace(customized_info=None, hidden=hidden)


def _setup(monkeypatch, cfg, r2t):
    import sglang.srt.runtime_context as rc

    monkeypatch.setattr(rc, "get_parallel", lambda: SimpleNamespace(attn_tp_size=1, attn_tp_group=None))
    seen = [[] for _ in range(L)]
    layers = torch.nn.ModuleList([ToyLayer(seen[i]) for i in range(L)])
    model = SimpleNamespace(model=SimpleNamespace(layers=layers), logits_processor=ToyLogits(), pp_group=None)
    mr = SimpleNamespace(model=model, page_size=P, device=DEVICE,
                         req_to_token_pool=SimpleNamespace(req_to_token=r2t.to(DEVICE)),
                         model_config=SimpleNamespace(get_max_num_attention_heads=lambda: H_Q, context_len=2048,
                                                      hf_config=SimpleNamespace(architectures=["LlamaForCausalLM"])))
    replans = []
    kbuf = torch.zeros(8, H_KV, D, device=DEVICE)
    pool = SimpleNamespace(get_key_buffer=lambda lid: kbuf, start_layer=0)
    state = SimpleNamespace(md=CP.ForwardMetadata())      # the backend's per-forward metadata
    cp = CP.ClaaPrefill(mr, cfg, L, pool, replan=lambda fb: replans.append(list(fb.extend_seq_lens_cpu)),
                        metadata=lambda: state.md)
    return cp, state, layers, model, seen, replans


def _run_model(layers, model, fb, hidden):
    positions, residual = fb.positions, None        # the model's local positions, reused for every layer
    for layer in layers:
        hidden, residual = layer(positions, hidden, fb, residual)
    return model.logits_processor(None, hidden, None, fb)


def test_claa_wiring_against_reference(monkeypatch, seed):
    gen = torch.Generator().manual_seed(seed)
    cfg = ClaaConfig(mode="claa", keep_ratio=0.25, filter_layer=F, window=4, num_layers=2, pool_kernel=7)
    lens, prefix = [150, 40, 200], [0, 32, 0]          # request 1 reuses a prefix: dense
    fb, r2t = _hand_built_batch(lens, prefix, P, gen)
    for name in ("positions", "out_cache_loc", "extend_seq_lens", "extend_start_loc", "extend_prefix_lens",
                 "req_pool_indices", "seq_lens"):
        setattr(fb, name, getattr(fb, name).to(DEVICE))
    orig_pos = fb.positions.clone()
    cp, state, layers, model, seen, replans = _setup(monkeypatch, cfg, r2t)
    assert cp.active and cp.filter_layer == F and cp.agg_layers == {2, 3}

    kept = {0: CP.kept_count(lens[0], cfg, P), 2: CP.kept_count(lens[2], cfg, P)}
    cp.drop.fill_(-1)
    state.md = CP.ForwardMetadata(forward_batch=fb, claa_kept=[kept[0], None, kept[2]])
    state.md.claa = cp.begin(fb, use_ragged=True, kept=state.md.claa_kept)
    drops = cp.drop[fb.req_pool_indices].tolist()
    assert drops == [lens[0] - kept[0], 0, lens[2] - kept[2]] and drops[0] % P == 0 and drops[2] % P == 0

    T = sum(lens)
    refs = {0: [], 2: []}
    starts = [0, lens[0], lens[0] + lens[1]]
    for lid in range(L):
        q = torch.randn(T, H_Q, D, generator=gen).to(DEVICE, torch.bfloat16)
        k = torch.randn(T, H_KV, D, generator=gen).to(DEVICE, torch.bfloat16)
        cp.score(lid, q.reshape(T, H_Q * D), k, fb)
        if lid in cp.agg_layers:
            for i in refs:
                s, n = starts[i], lens[i]
                refs[i].append(claa.window_scores(q[s:s + n].double().cpu(), k[s:s + n].double().cpu(),
                                                  cfg.window, cfg.pool_kernel))
    out = _run_model(layers, model, fb, torch.randn(T, HID, generator=gen).to(DEVICE))

    # reference selection (tolerant to float32 near-ties at the top-k boundary only)
    expect_pos = []
    for i, n in enumerate(lens):
        s = starts[i]
        if i not in refs:
            expect_pos.append(orig_pos[s:s + n].cpu())
            continue
        imp = claa.aggregate_max(refs[i])
        w, k_i = cfg.window, kept[i]
        ref_rows = torch.sort(torch.sort(imp[: n - w], descending=True, stable=True).indices[: k_i - w]).values
        expect_pos.append(torch.cat([orig_pos[s + ref_rows].cpu(), orig_pos[s + n - w: s + n].cpu()]))
    expect = torch.cat(expect_pos)
    n_kept = sum(kept.get(i, n) for i, n in enumerate(lens))
    for lid in range(L):
        (pos, rows, res_rows), = seen[lid]
        if lid < F:
            assert rows == T and torch.equal(pos.cpu(), orig_pos.cpu()), f"layer {lid} must see every token"
        else:
            assert rows == n_kept and res_rows == n_kept, f"layer {lid} saw {rows} rows, expected {n_kept}"
            sizes = [kept.get(i, n) for i, n in enumerate(lens)]
            for i, (g_i, e_i) in enumerate(zip(pos.cpu().split(sizes), expect.split(sizes))):
                if torch.equal(g_i, e_i):
                    continue
                # only swaps between near-equal scores at the top-k boundary are allowed
                assert i in refs, f"layer {lid}: dense request {i} changed"
                imp = claa.aggregate_max(refs[i])
                thr = torch.sort(imp[: lens[i] - cfg.window], descending=True).values[kept[i] - cfg.window - 1]
                diff = set(g_i.tolist()) ^ set(e_i.tolist())      # positions = rows (no prefix)
                assert all(abs(float(imp[j] - thr)) <= 1e-3 * float(thr) for j in diff), \
                    f"seed={seed} layer {lid} request {i}: kept tokens differ from the reference beyond near-ties"
    assert replans == [[kept[0], lens[1], kept[2]]]
    assert out.customized_info == {CP.CUSTOM_INFO_KEY: [kept[0], lens[1], kept[2]]}

    # a batch with no filtered request: hooks pass through, drops reset to 0
    seen_before = [len(x) for x in seen]
    fb2, r2t2 = _hand_built_batch([60, 70], [0, 0], P, gen)
    fb2.req_pool_indices = fb.req_pool_indices[:2].clone()
    for name in ("positions", "out_cache_loc", "extend_seq_lens", "extend_start_loc", "extend_prefix_lens",
                 "seq_lens"):
        setattr(fb2, name, getattr(fb2, name).to(DEVICE))
    state.md = CP.ForwardMetadata(forward_batch=fb2, claa_kept=[None, None])
    state.md.claa = cp.begin(fb2, use_ragged=True, kept=state.md.claa_kept)
    assert state.md.claa is None and cp.drop[fb2.req_pool_indices].tolist() == [0, 0]
    out2 = _run_model(layers, model, fb2, torch.randn(130, HID, generator=gen).to(DEVICE))
    for lid in range(L):
        assert len(seen[lid]) == seen_before[lid] + 1 and seen[lid][-1][1] == 130
    assert out2.customized_info is None and len(replans) == 1
