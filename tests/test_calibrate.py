"""Per-layer PrHS budget calibration (sglang_sparse.calibrate): the shift choice on constructed queries and
keys against hand computations, the oracle ranking against the bound ranking, the decode capture, the
profile written end to end on a tiny random Llama, and the error exit."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from sglang_sparse import calibrate as cal
from sglang_sparse.config import PrhsConfig

F64 = torch.float64
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
                PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_llama")
    subprocess.run([sys.executable, os.path.join(REPO, "tests", "tiny_llama.py"), str(out)], check=True,
                   env=_env(), capture_output=True, timeout=300)
    return str(out)


# 16 pages of 4 tokens, D = 4; 1 sink + 1 recent page, budget 1/4 = 4 pages at shift 0, 8 at 1, 16 at 2.
CFG = cal.CalibrationSettings(page_size=4, budget=0.25, delta=0.05, quantile=0.9, sink_pages=1, recent_pages=1)
N_KEYS = 64


def _peaked():
    """Every key 0 except token 29 (page 7), aligned with both query heads: its logit is 30, the others 0."""
    q = torch.zeros(2, 4, dtype=F64)
    q[:, 0] = 1.0
    k = torch.zeros(N_KEYS, 1, 4, dtype=F64)
    k[29, 0, 0] = 30.0
    return q, k


def _flat():
    """Every key equal: uniform attention, each page holds 1/16 of the mass."""
    q = torch.zeros(2, 4, dtype=F64)
    q[:, 1] = 1.0
    return q, torch.ones(N_KEYS, 1, 4, dtype=F64)


def test_max_shift_reaches_every_page():
    assert cal.max_shift([N_KEYS], CFG) == 2
    assert cal.max_shift([N_KEYS, 8 * 4], CFG) == 2                  # 8 pages: budget 2 -> 4 -> 8
    # the calibration's base budget is 1/16 (it measures the curves from there up to every page; a profile carries
    # its budget to the server), its delta and floors are the server's: 1/16 of N pages with 1 sink + 2 recents
    # reaches N = 129 pages at 16x
    d = cal.CalibrationSettings()
    assert (d.budget, d.delta, d.sink_pages, d.recent_pages) == \
        (1 / 16, PrhsConfig.delta, PrhsConfig.sink_pages, PrhsConfig.recent_pages)
    assert cal.max_shift([8192 + 16], d) == 4


def test_peaked_and_flat_layers_by_hand():
    q, k = _peaked()
    bound, oracle = cal.sample_dropped(q, k, 1.0, CFG, 2)
    # the needle's page is ranked first by its bound and kept from shift 0 on. Shift 0 keeps 4 pages: 0 (sink),
    # 15 (recent), 7 (needle) and 1 (lowest id among equal bounds): 15 of the 63 zero-logit tokens.
    z = 63 + math.exp(30)
    exp_peak = torch.tensor([(63 - 15) / z, (63 - 31) / z, 0.0], dtype=F64)
    torch.testing.assert_close(bound, exp_peak, rtol=1e-9, atol=1e-30)
    torch.testing.assert_close(oracle, exp_peak, rtol=1e-9, atol=1e-30)

    q, k = _flat()
    bound, oracle = cal.sample_dropped(q, k, 1.0, CFG, 2)
    exp_flat = torch.tensor([1 - 4 / 16, 1 - 8 / 16, 0.0], dtype=F64)
    torch.testing.assert_close(bound, exp_flat)
    torch.testing.assert_close(oracle, exp_flat)

    samples = 10
    layer_peak = torch.stack([cal.sample_dropped(*_peaked(), 1.0, CFG, 2)[0]] * samples)
    layer_flat = torch.stack([cal.sample_dropped(*_flat(), 1.0, CFG, 2)[0]] * samples)
    stats = cal.summarise([layer_peak, layer_flat], [layer_peak, layer_flat], CFG)
    assert stats["shift"] == [0, 2]
    assert stats["bound_quantile"][1] == pytest.approx([0.75, 0.5, 0.0])
    assert stats["bound_over_delta"] == [[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]

    # 9 peaked samples and 1 flat one: the 0.9 quantile is a peaked value, the 0.95 quantile the flat one
    mixed = torch.cat([layer_peak[:9], layer_flat[:1]])
    assert cal.summarise([mixed], [mixed], CFG)["shift"] == [0]
    strict = cal.CalibrationSettings(**{**CFG.__dict__, "quantile": 0.95})
    assert cal.summarise([mixed], [mixed], strict)["shift"] == [2]
    assert cal.summarise([mixed], [mixed], strict)["bound_quantile"][0] == pytest.approx([0.75, 0.5, 0.0])


def test_bound_ranking_that_misses_the_needle():
    """A needle the box bound cannot see: a page whose other keys have a larger ub gets ranked first, so only
    the oracle keeps the needle at shift 0."""
    q = torch.zeros(1, 2, dtype=F64)
    q[0] = torch.tensor([1.0, 1.0])
    k = torch.zeros(N_KEYS, 1, 2, dtype=F64)
    k[29, 0] = torch.tensor([6.0, 6.0])                 # logit 12, ub of page 7 = 12
    for t in range(8, 24):                              # pages 2..5: ub 14 from (8, -8)/(-8, 8) pairs, logits 0
        k[t, 0] = torch.tensor([8.0, -8.0]) if t % 2 else torch.tensor([-8.0, 8.0])
    bound, oracle = cal.sample_dropped(q, k, 1.0, CFG, 2)
    z = 63 + math.exp(12)
    # bound, shift 0: pages 0, 15, then 2, 3 (ub 16 > 12): the needle and 47 zero-logit tokens dropped
    # oracle, shift 0: pages 0, 15, 7, 1: 48 zero-logit tokens dropped
    # shift 1 (8 pages): both keep the needle and 31 zero-logit tokens
    exp_bound = torch.tensor([(math.exp(12) + 47) / z, 32 / z, 0.0], dtype=F64)
    exp_oracle = torch.tensor([48 / z, 32 / z, 0.0], dtype=F64)
    torch.testing.assert_close(bound, exp_bound, rtol=1e-9, atol=0)
    torch.testing.assert_close(oracle, exp_oracle, rtol=1e-9, atol=0)


def test_quantile_value_and_choose_shift():
    vals = [0.01] * 8 + [0.5, 0.6]
    assert cal.quantile_value(vals, 0.8) == 0.01
    assert cal.quantile_value(vals, 0.81) == 0.5
    assert cal.quantile_value(vals, 0.9) == 0.5
    assert cal.quantile_value(vals, 1.0) == 0.6
    assert cal.quantile_value(list(reversed(vals)), 0.5) == 0.01
    assert cal.choose_shift([0.9, 0.3, 0.05, 0.0], 0.05) == 2
    assert cal.choose_shift([0.9, 0.3, 0.06, 0.01], 0.05) == 3
    assert cal.choose_shift([0.04, 0.0], 0.05) == 0
    assert cal.choose_shift([0.9, 0.3], 0.0) == 1                  # the last shift: every page


def test_oracle_not_above_bound_summed_over_the_group(seed):
    """The oracle keeps the largest group-summed mass of any selection with the forced pages and at most the
    budget, so the dropped mass summed over a group's query heads is never above the bound ranking's."""
    gen = torch.Generator().manual_seed(seed)
    strict = 0
    for trial in range(12):
        page_size = [1, 3, 4][trial % 3]
        n = int(torch.randint(20, 90, (1,), generator=gen))
        h_kv, group = [(1, 3), (2, 2), (2, 4)][trial % 3]
        cfg = cal.CalibrationSettings(page_size=page_size, budget=[1 / 16, 0.2, 3][trial % 3],
                                      delta=[0.0, 0.05][trial % 2], sink_pages=trial % 2, recent_pages=1 + trial % 2)
        q = torch.randn(h_kv * group, 8, generator=gen, dtype=F64) * 2
        k = torch.randn(n, h_kv, 8, generator=gen, dtype=F64)
        shifts = cal.max_shift([n], cfg)
        b, o = cal.sample_dropped(q, k, 8 ** -0.5, cfg, shifts, per_head=True)      # [S + 1, H_q]
        bs = b.reshape(-1, h_kv, group).sum(-1)
        os_ = o.reshape(-1, h_kv, group).sum(-1)
        assert (os_ <= bs + 1e-12).all(), f"seed={seed} trial={trial}\n{bs}\n{os_}"
        # at the last shift the budget is every page: the oracle drops nothing; the bound selection stops once
        # its certificate is <= delta, which then bounds what it drops
        assert (o[-1] == 0).all() and (b[-1] <= cfg.delta + 1e-12).all()
        if cfg.delta == 0:
            assert (b[-1] == 0).all()
        # a larger budget keeps a superset: dropped mass never grows with the shift
        assert (b[1:] <= b[:-1] + 1e-12).all() and (o[1:] <= o[:-1] + 1e-12).all()
        strict += int((os_ < bs - 1e-9).any())
    assert strict > 0, f"seed={seed}: the oracle never beat the bound ranking"


def test_oracle_can_be_worse_per_head_and_for_the_max():
    """Not guaranteed per query head: the oracle keeps the page with the most group-summed mass, which can leave
    one head worse off than the bound ranking's choice. One-hot keys, q = log of each head's mass per page."""
    mass = torch.tensor([[0.5, 1e-12, 1e-12, 0.5],          # head 0: page A and the recent page
                         [0.1, 0.45, 1e-12, 0.45],          # heads 1, 2: mostly page B
                         [0.1, 0.45, 1e-12, 0.45]], dtype=F64)
    q = mass.log()
    k = torch.eye(4, dtype=F64)[:, None, :]                 # [4 tokens, 1 KV head, D = 4]
    cfg = cal.CalibrationSettings(page_size=1, budget=2, delta=0.0, sink_pages=0, recent_pages=1)
    b, o = cal.sample_dropped(q, k, 1.0, cfg, 1, per_head=True)
    # bound: page A has the larger ub (log 0.5 > log 0.45); oracle: page B has the larger summed mass (0.9 > 0.7)
    torch.testing.assert_close(b[0], torch.tensor([0.0, 0.45, 0.45], dtype=F64), atol=1e-9, rtol=0)
    torch.testing.assert_close(o[0], torch.tensor([0.5, 0.1, 0.1], dtype=F64), atol=1e-9, rtol=0)
    assert o[0].max() > b[0].max() and o[0].sum() < b[0].sum()
    # a sample's value is the max over the query heads
    b_max, o_max = cal.sample_dropped(q, k, 1.0, cfg, 1)
    torch.testing.assert_close(b_max, torch.tensor([0.45, 0.0], dtype=F64), atol=1e-9, rtol=0)
    torch.testing.assert_close(o_max, torch.tensor([0.5, 0.0], dtype=F64), atol=1e-9, rtol=0)


def _two_pages():
    """2 pages of 2 tokens, one KV head, two query heads. Head 0's logits are log(1, 1, 2, 2): attention
    (1, 1, 2, 2) / 6; head 1's are 0: uniform. Values: (1, 0) on page 0, (0, 1) on page 1."""
    q = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=F64)
    k = torch.zeros(4, 1, 2, dtype=F64)
    k[:, 0, 0] = torch.tensor([1.0, 1.0, 2.0, 2.0], dtype=F64).log()
    v = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=F64)[:, None, :]
    cfg = cal.CalibrationSettings(page_size=2, budget=0.5, delta=0.0, sink_pages=0, recent_pages=1)
    return q, k, v, cfg


def test_output_error_two_pages_by_hand():
    q, k, v, cfg = _two_pages()
    assert cal.max_shift([4], cfg) == 1
    got = cal.sample_measures(q, k, v, 1.0, cfg, 1)
    assert list(got) == list(cal.CURVES)
    # shift 0 keeps page 1 only (the recent page; the budget is 1 page). Head 0: dense (1/3, 2/3), sparse (0, 1):
    # error sqrt(2)/3 / (sqrt(5)/3) = sqrt(2/5), dropped 1/3. Head 1: dense (1/2, 1/2), sparse (0, 1): error 1,
    # dropped 1/2. Shift 1 keeps both pages: nothing dropped, no error.
    # The layer error: squared diffs 2/9 + 1/2 over squared norms 5/9 + 1/2, sqrt(13/19).
    e0 = math.sqrt(0.4)
    expect = {"mass": [0.5, 0.0], "mass-mean": [(1 / 3 + 0.5) / 2, 0.0],
              "output-error": [1.0, 0.0], "output-error-mean": [(e0 + 1.0) / 2, 0.0],
              "output-error-layer": [math.sqrt(13 / 19), 0.0]}
    for curve, want in expect.items():
        for side in (0, 1):
            torch.testing.assert_close(got[curve][side], torch.tensor(want, dtype=F64), atol=1e-12, rtol=0,
                                       msg=f"{curve} {side}")
    # the per-head function itself
    sel = torch.tensor([[1]]), torch.tensor([1])
    torch.testing.assert_close(cal.output_error(q, k, v, 2, *sel, 1.0), torch.tensor([e0, 1.0], dtype=F64),
                               atol=1e-12, rtol=0)


def test_output_error_zero_at_every_page_and_mean_below_max(seed):
    gen = torch.Generator().manual_seed(seed)
    strict = 0
    for trial in range(6):
        h_kv, group = [(1, 3), (2, 2), (2, 4)][trial % 3]
        n = int(torch.randint(30, 90, (1,), generator=gen))
        cfg = cal.CalibrationSettings(page_size=[3, 4][trial % 2], budget=0.2, delta=0.0, sink_pages=1,
                                      recent_pages=1)
        q = torch.randn(h_kv * group, 8, generator=gen, dtype=F64) * 2
        k = torch.randn(n, h_kv, 8, generator=gen, dtype=F64)
        v = torch.randn(n, h_kv, 8, generator=gen, dtype=F64)
        shifts = cal.max_shift([n], cfg)
        got = cal.sample_measures(q, k, v, 8 ** -0.5, cfg, shifts)
        for side in (0, 1):
            # every page at the last shift: the sparse output is the dense one
            assert float(got["output-error"][side][-1]) < 1e-12
            assert float(got["mass"][side][-1]) < 1e-12
            assert (got["mass-mean"][side] <= got["mass"][side] + 1e-15).all()
            assert (got["output-error-mean"][side] <= got["output-error"][side] + 1e-15).all()
            assert (got["output-error-layer"][side] <= got["output-error"][side] + 1e-12).all()
            assert float(got["output-error-layer"][side][-1]) < 1e-12
            assert (got["output-error-layer"][side][:-1] > 0).all()
            assert (got["output-error"][side][:-1] > 0).all()
            strict += int((got["mass-mean"][side][0] < got["mass"][side][0] - 1e-9).item())
        # the mass curves are those of sample_dropped
        b, o = cal.sample_dropped(q, k, 8 ** -0.5, cfg, shifts)
        torch.testing.assert_close(got["mass"][0], b)
        torch.testing.assert_close(got["mass"][1], o)
    assert strict > 0


def test_output_error_picks_a_smaller_shift_than_mass_when_values_agree():
    """Diffuse attention (every key equal) over identical values: dropping pages changes no output, so the shift
    chosen by output error is 0 where the dropped mass needs every page."""
    q, k = _flat()
    v = torch.ones(N_KEYS, 1, 3, dtype=F64) * torch.tensor([0.5, -2.0, 1.0], dtype=F64)
    got = cal.sample_measures(q, k, v, 1.0, CFG, 2)
    samples = 4
    stats = {c: cal.summarise([torch.stack([got[c][0]] * samples)], [torch.stack([got[c][1]] * samples)], CFG)
             for c in cal.CURVES}
    assert stats["mass"]["shift"] == [2] and stats["mass-mean"]["shift"] == [2]
    assert stats["output-error"]["shift"] == [0] and stats["output-error-mean"]["shift"] == [0]
    assert stats["output-error"]["bound_quantile"][0] == pytest.approx([0.0, 0.0, 0.0], abs=1e-12)
    kw = dict(model="m", num_layers=1, num_kv_heads=1, head_dim=4, created_by="x", device="cpu", prompt_lens=[64],
              num_prompts=1, stats=stats)
    by_error = cal.build_profile(cfg=cal.CalibrationSettings(**{**CFG.__dict__, "measure": "output-error"}), **kw)
    by_mass = cal.build_profile(cfg=CFG, **kw)
    assert by_error["prhs"]["layer_budget_shift"] == [0] and by_error["prhs"]["measure"] == "output-error"
    assert by_mass["prhs"]["layer_budget_shift"] == [2] and by_mass["prhs"]["measure"] == "mass"
    # the measurements stay the dropped mass either way
    assert by_error["measurements"] == by_mass["measurements"]
    # values that differ between pages: dropping pages now changes the output
    v2 = torch.arange(N_KEYS, dtype=F64)[:, None, None].expand(N_KEYS, 1, 3).contiguous()
    assert float(cal.sample_measures(q, k, v2, 1.0, CFG, 2)["output-error"][0][0]) > 0.1


def test_recall_quantile_by_hand():
    vals = [1.0] * 8 + [0.5, 0.2]
    assert cal.recall_quantile(vals, 0.8) == 1.0
    assert cal.recall_quantile(vals, 0.9) == 0.5
    assert cal.recall_quantile(vals, 1.0) == 0.2
    assert cal.recall_quantile(list(reversed(vals)), 0.85) == 0.5


def test_claa_recalls_by_hand():
    """S = 20, window 2, one layer aggregated: layer 0 ranks like the oracle, layer 1 in reverse. Keep ratio 0.2
    keeps 4 tokens, 2 of the prefix: the oracle's best two hold 18 + 17, the reversed ranking's 1 + 2."""
    oracle = torch.cat([torch.arange(1, 19, dtype=F64), torch.tensor([100.0, 100.0], dtype=F64)])
    scores = [oracle[None].clone(), -oracle[None].clone(), oracle[None].clone()]
    ccfg = cal.ClaaSettings(keep_ratios=(0.2, 1.0), window=2, num_layers=1)
    table = cal.claa_recalls(scores, oracle, ccfg)
    assert len(table) == 2                                     # filter layers 1 and 2
    assert table[0] == pytest.approx([1.0, 1.0])
    assert table[1] == pytest.approx([3 / 35, 1.0])
    # two layers aggregated (max): filter layer 2 reads layers 0 and 1, max(o, -o) = o
    table2 = cal.claa_recalls(scores, oracle, cal.ClaaSettings(keep_ratios=(0.2,), window=2, num_layers=2))
    assert table2 == [pytest.approx([1.0]), pytest.approx([1.0])]


def test_choose_claa_rule():
    """Filter layers 1..5 (rows 0..4), keep ratios 0.1, 0.2, 0.4, 10 prompts."""
    ccfg = cal.ClaaSettings(keep_ratios=(0.1, 0.2, 0.4), recall=0.9, quantile=0.9, num_layers=2)
    rec = torch.zeros(10, 5, 3, dtype=F64)
    rec[:, 0] = 1.0                                            # layer 1: below num_layers, never chosen
    rec[:, 1, 2] = 0.95                                        # layer 2, ratio 0.4: 9 of 10 prompts reach 0.9
    rec[0, 1, 2] = 0.5
    rec[:, 1, 1] = 0.92                                        # layer 2, ratio 0.2: 8 of 10
    rec[:2, 1, 1] = 0.3
    rec[:, 3, 0] = 0.99                                        # layer 4, ratio 0.1: every prompt
    choice, table = cal.choose_claa(rec, ccfg)
    assert choice == {"filter_layer": 2, "keep_ratio": 0.4, "recall": pytest.approx(0.95)}
    assert len(table) == 5 and table[1] == pytest.approx([0.0, 0.3, 0.95])
    loose = cal.ClaaSettings(**{**ccfg.__dict__, "quantile": 0.8})
    assert cal.choose_claa(rec, loose)[0] == {"filter_layer": 2, "keep_ratio": 0.2, "recall": pytest.approx(0.92)}
    rec[0, 1, 2] = 0.1
    rec[1, 1, 2] = 0.1                                         # layer 2 fails now: the next layer that passes
    assert cal.choose_claa(rec, ccfg)[0] == {"filter_layer": 4, "keep_ratio": 0.1, "recall": pytest.approx(0.99)}
    strict = cal.ClaaSettings(**{**ccfg.__dict__, "recall": 0.999})
    assert cal.choose_claa(rec, strict)[0] is None
    # every layer allowed: layer 1 reaches it with the smallest ratio
    assert cal.choose_claa(rec, cal.ClaaSettings(**{**ccfg.__dict__, "num_layers": 1}))[0]["filter_layer"] == 1


def test_kv_retrieval_prompt(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model, local_files_only=True)
    ids, key, value = cal.kv_retrieval_prompt(tok, 400, seed=5)
    assert 300 < len(ids) <= 400
    text = tok.decode(ids)
    assert f"key {key}: value {value}" in text and text.count(f"key {key}") == 2
    assert text.startswith("user: ") and text.endswith("assistant:")           # the chat template
    assert cal.kv_retrieval_prompt(tok, 400, seed=5) == (ids, key, value)
    assert cal.kv_retrieval_prompt(tok, 400, seed=6)[0] != ids


def test_decode_capture_equals_teacher_forced_pass(tiny_model):
    from sglang_sparse.capture import capture_qk

    from sglang_sparse.answer_oracle import oracle_importance
    from sglang_sparse.claa import window_scores

    model, tok = cal._load(tiny_model, "cpu")
    ids, _, _ = cal.kv_retrieval_prompt(tok, 150, seed=1)
    ccfg = cal.ClaaSettings(window=4, pool_kernel=3)
    answer, col = cal.generate_and_capture(model, tok, ids, 4, "cpu", ccfg)
    assert len(answer) == 5
    full = capture_qk(model, torch.tensor([ids + answer[:4]]), values=True)
    s = len(ids)
    for layer, (q, k, scale, v) in enumerate(full):
        samples = col.samples(layer)
        assert len(samples) == 4 and col.scale == scale
        assert not torch.allclose(v, k)
        for i, (qq, kk, vv) in enumerate(samples):
            assert kk.shape == (s + i + 1, 2, 16) and vv.shape == (s + i + 1, 2, 16)
            torch.testing.assert_close(qq, q[s + i], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(kk, k[: s + i + 1], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(vv, v[: s + i + 1], atol=1e-4, rtol=1e-4)
        # CLAA's window scores of the prompt, from the prefill
        torch.testing.assert_close(col.window_scores[layer], window_scores(q[:s], k[:s], 4, 3, sm_scale=scale),
                                   atol=1e-4, rtol=1e-4)
    # the oracle: the 4 answer tokens' attention over the prompt
    ref = oracle_importance([(q[s:], k[:s]) for q, k, _, _ in full], full[0][2])
    assert ref.shape == (s,)
    torch.testing.assert_close(col.oracle(), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("measure", [None, "output-error-layer"])
def test_cli_profile_schema(tiny_model, tmp_path, measure):
    prof, res = tmp_path / "p.json", tmp_path / "r.json"
    cmd = [sys.executable, "-m", "sglang_sparse.calibrate", "--model-path", tiny_model, "--device", "cpu",
           "--prompt-lens", "200,260", "--num-prompts", "2", "--answer-tokens", "3", "--page-size", "16",
           "--budget", "1/8", "--delta", "0.1", "--quantile", "0.75", "--out", str(prof), "--results", str(res)]
    # the default measure without CLAA; output error with CLAA (every filter layer allowed, a recall any reaches)
    cmd += ["--measure", measure, "--claa-num-layers", "1", "--claa-recall", "0.01"] if measure else ["--claa", "off"]
    claa = measure is not None
    measure = measure or "mass"
    proc = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "prompt 4/4" in proc.stderr
    p = json.loads(prof.read_text())
    assert list(p) == ["format", "model", "num_layers", "num_kv_heads", "head_dim", "page_size", "created_by",
                       "device", "prompt_lens", "num_prompts", "prhs", "claa", "measurements"]
    assert (p["format"], p["num_layers"], p["num_kv_heads"], p["head_dim"], p["page_size"]) == (1, 2, 2, 16, 16)
    assert p["model"] == os.path.basename(tiny_model) and p["device"] == "cpu"
    assert p["prompt_lens"] == [200, 260] and p["num_prompts"] == 2
    assert p["created_by"].startswith("python -m sglang_sparse.calibrate --model-path ")
    assert list(p["prhs"]) == ["budget", "delta", "quantile", "measure", "layer_budget_shift"]
    assert p["prhs"]["measure"] == measure
    assert (p["prhs"]["budget"], p["prhs"]["delta"], p["prhs"]["quantile"]) == (0.125, 0.1, 0.75)
    m = p["measurements"]
    assert list(m) == ["prhs_dropped_by_shift", "mean_bound_dropped"]
    assert list(m["prhs_dropped_by_shift"]) == ["bound", "oracle"]
    # 260 + 3 tokens = 17 pages of 16: budget ceil(17/8) = 3 -> 6 -> 12 -> 17
    shifts = cal.max_shift([263], cal.CalibrationSettings(page_size=16, budget=0.125))
    assert shifts == 3
    for kind in ("bound", "oracle"):
        rows = m["prhs_dropped_by_shift"][kind]
        assert len(rows) == 2 and all(len(r) == shifts + 1 for r in rows)
        assert all(r[-1] == 0.0 and all(0.0 <= x <= 1.0 for x in r) for r in rows)
        assert all(r[i + 1] <= r[i] + 1e-7 for r in rows for i in range(shifts))
    r = json.loads(res.read_text())
    chosen = r["measures"][measure]["bound_quantile"]
    assert p["prhs"]["layer_budget_shift"] == [cal.choose_shift(row, 0.1) for row in chosen]
    assert len(m["mean_bound_dropped"]) == 2
    assert r["profile"] == p and r["command"] == p["created_by"] and r["wall_s"] > 0
    assert len(r["prompts"]) == 4 and all(1 <= x["decode_samples"] <= 3 for x in r["prompts"])
    assert r["samples_per_layer"] == sum(x["decode_samples"] for x in r["prompts"])
    assert all(x["prompt_tokens"] <= x["target_tokens"] for x in r["prompts"])
    assert r["measures"]["mass"]["bound_mean"][0][0] == pytest.approx(m["mean_bound_dropped"][0])
    assert list(r["measures"]) == list(cal.CURVES) and r["measures"][measure] == r["per_layer"]
    assert r["settings"]["measure"] == measure
    for curve in cal.CURVES:
        rows = r["measures"][curve]["oracle_quantile"]
        assert len(rows) == 2 and all(len(row) == shifts + 1 and row[-1] <= 1e-6 for row in rows)
    for a, b in zip(r["measures"]["mass-mean"]["bound_mean"], r["measures"]["mass"]["bound_mean"]):
        assert all(x <= y + 1e-9 for x, y in zip(a, b))
    if not claa:
        assert p["claa"] is None and r["claa"] is None
        return
    c = r["claa"]
    assert c["filter_layers"] == [1] and c["settings"]["keep_ratios"] == [0.1, 0.2, 0.4]
    assert len(c["recall_per_prompt"]) == 4 and len(c["recall_quantile"]) == 1 and len(c["recall_quantile"][0]) == 3
    assert all(0.0 < x <= 1.0 + 1e-9 for x in c["recall_quantile"][0])
    assert p["claa"] == c["choice"] == {"filter_layer": 1, "keep_ratio": 0.1, "recall": c["recall_quantile"][0][0]}
    # the server's profile check accepts it
    from sglang_sparse.config import check_profile

    with open(os.path.join(tiny_model, "config.json")) as f:
        check_profile(p, str(prof), json.load(f), None)


@pytest.mark.parametrize("path_kind", ["missing", "no_config"])
def test_cli_bad_model_path_exits_2(tmp_path, path_kind):
    path = tmp_path / "nope" if path_kind == "missing" else tmp_path
    proc = subprocess.run([sys.executable, "-m", "sglang_sparse.calibrate", "--model-path", str(path)], env=_env(),
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("python -m sglang_sparse.calibrate: error: --model-path: ")
    assert proc.stdout == ""
