"""Answer-Informed Oracle: metrics by hand, the oracle formula, q/k capture against eager attention,
and the CLI end to end on a tiny random Llama built locally (no downloads).
"""

import csv
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

from benchmarks import oracle

F64 = torch.float64
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["alpha", "beta", "gamma", "delta", "needle", "haystack", "key", "value", "the", "is", "secret",
         "number", "city", "blue", "red", "green", "seven", "river"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random 3-layer Llama (hidden 64, 4 q heads / 2 kv heads, head_dim 16) and a ~300-token BPE
    tokenizer trained here with `tokenizers`, saved to a temporary directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = str(tmp_path_factory.mktemp("tiny_llama"))
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(200)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf_tok.save_pretrained(path)
    cfg = LlamaConfig(vocab_size=len(hf_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(1234)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():                      # sharper attention than the default init gives
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    model.save_pretrained(path)
    return path


def test_spearman_hand_computed():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert oracle.spearman(x, x * 10) == pytest.approx(1.0)
    assert oracle.spearman(x, -x) == pytest.approx(-1.0)
    # ties: ranks [0, 1.5, 1.5, 3] vs [0, 2, 1, 3] -> 4.5 / sqrt(4.5 * 5)
    assert oracle.spearman(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([1.0, 3.0, 2.0, 4.0])) == \
        pytest.approx(4.5 / math.sqrt(22.5), rel=1e-12)
    assert math.isnan(oracle.spearman(torch.ones(5), x.repeat(2)[:5]))


def test_spearman_matches_pearson_of_ranks_without_ties(seed):
    x, y = torch.randn(200, dtype=F64), torch.randn(200, dtype=F64)
    rx, ry = x.argsort().argsort().double(), y.argsort().argsort().double()
    n = 200
    ref = 1 - 6 * ((rx - ry) ** 2).sum() / (n * (n * n - 1))        # the classic closed form
    assert oracle.spearman(x, y) == pytest.approx(float(ref), abs=1e-12), f"seed={seed}"


def test_mass_recall_hand_computed():
    o = torch.tensor([0.5, 0.1, 0.3, 0.1], dtype=F64)
    assert oracle.mass_recall(o, torch.tensor([0.0, 9.0, 1.0, 5.0]), 2) == pytest.approx(0.2 / 0.8)
    assert oracle.mass_recall(o, o, 2) == 1.0
    assert oracle.mass_recall(o, -o, 4) == 1.0
    assert math.isnan(oracle.mass_recall(o, o, 0))


def test_oracle_importance_formula(seed):
    s_len, a_len, h_q, h_kv, d = 30, 5, 4, 2, 8
    layers = [(torch.randn(a_len, h_q, d, dtype=F64), torch.randn(s_len, h_kv, d, dtype=F64)) for _ in range(3)]
    scale = 0.3
    got = oracle.oracle_importance(layers, scale, first_k=3)
    ref = torch.zeros(s_len, dtype=F64)
    for a in range(3):
        best = torch.zeros(s_len, dtype=F64)
        for q, k in layers:
            for h in range(h_q):
                p = torch.softmax(torch.stack([(q[a, h] * k[j, h // 2]).sum() * scale for j in range(s_len)]), 0)
                best = torch.maximum(best, p)
        ref += best / 3
    torch.testing.assert_close(got, ref, msg=lambda m: f"seed={seed}\n{m}")
    pooled = oracle.oracle_importance(layers, scale, first_k=3, pool_kernel=3, pool="max")
    torch.testing.assert_close(pooled[1:-1], torch.stack([ref[j - 1: j + 2].max() for j in range(1, s_len - 1)]))


def test_ranking_metrics_prefix_and_counts(seed):
    o = torch.rand(50, dtype=F64) + 0.01
    m = oracle.ranking_metrics(o.clone(), o, window=8, keep_ratios=(0.2, 0.5))
    assert m["spearman"] == pytest.approx(1.0) and m["recall@0.2"] == 1.0 and m["recall@0.5"] == 1.0
    # the window tokens do not count: a heuristic that differs only there is still perfect
    x = o.clone()
    x[-8:] = -x[-8:]
    assert oracle.ranking_metrics(x, o, 8, (0.2,))["spearman"] == pytest.approx(1.0)
    rev = oracle.ranking_metrics(-o, o, 8, (0.2,))
    assert rev["spearman"] == pytest.approx(-1.0) and rev["recall@0.2"] < 1.0, f"seed={seed}"


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    return model, tok


def test_capture_matches_eager_attention(tiny_model, seed):
    model, tok = _load(tiny_model)
    ids = torch.randint(3, len(tok), (1, 40))
    assert oracle.verify_capture(model, ids) < 1e-5, f"seed={seed}"
    captured = oracle.capture_qk(model, ids)
    assert len(captured) == 3
    q, k, scale = captured[0]
    assert q.shape == (40, 4, 16) and k.shape == (40, 2, 16) and scale == pytest.approx(0.25)
    assert model.config._attn_implementation == "sdpa"          # restored afterwards
    # the captured keys are post-RoPE: the same token at two positions gives different keys
    same = torch.full((1, 6), 5)
    _, k2, _ = oracle.capture_qk(model, same)[0]
    assert not torch.allclose(k2[1], k2[4])


def test_sample_oracle_equals_reference_formula(tiny_model, seed):
    model, tok = _load(tiny_model)
    cfg = oracle.OracleConfig(window=4, max_new_tokens=5, keep_ratios=(0.3,))
    prompt = [int(x) for x in torch.randint(3, len(tok), (30,))]
    answer = [int(x) for x in torch.randint(3, len(tok), (5,))]
    col = oracle._SampleCollector(30, 5, cfg)
    with oracle._Capturing(model, col):
        model(input_ids=torch.tensor([prompt + answer]), use_cache=False)
    captured = oracle.capture_qk(model, torch.tensor([prompt + answer]))
    ref = oracle.oracle_importance([(q[30:], k[:30]) for q, k, _ in captured], captured[0][2])
    torch.testing.assert_close(col.oracle(), ref, msg=lambda m: f"seed={seed}\n{m}")
    from sglang_sparse.claa import window_scores
    torch.testing.assert_close(col.window_scores[2], window_scores(captured[2][0][:30], captured[2][1][:30], 4, 7))


def test_cli_end_to_end(tiny_model, tmp_path):
    rng = random.Random(7)
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": " ".join(rng.choice(WORDS) for _ in range(40))},
            {"prompt": " ".join(rng.choice(WORDS) for _ in range(50)), "answer": "the secret number is seven"},
            {"prompt": "key"},                                                    # too short: skipped
            {"prompt": " ".join(rng.choice(WORDS) for _ in range(45))}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "benchmarks.oracle", "--model-path", tiny_model, "--data", str(data),
           "--device", "cpu", "--out", str(out), "--max-new-tokens", "6", "--keep-ratios", "0.2,0.5",
           "--window", "4", "--verify"]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "oracle" in proc.stderr and "prompt" in proc.stderr          # the progress bar
    with open(out / "ranking_quality.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 * len(oracle.METHODS)
    assert {r["method"] for r in table} == set(oracle.METHODS)
    assert sorted({int(r["layer"]) for r in table}) == [0, 1, 2]
    for r in table:
        sp = float(r["spearman"])
        assert -1.0 <= sp <= 1.0, r
        for key in ("recall@0.2", "recall@0.5"):
            assert 0.0 < float(r[key]) <= 1.0 + 1e-12, r
        assert int(r["n_spearman"]) == 3
    # aggregating one layer: CLAA == max over that layer's heads, so row 0 equals ranksum's ranking quality
    by = {(int(r["layer"]), r["method"]): r for r in table}
    assert float(by[(0, "claa")]["spearman"]) == pytest.approx(float(by[(0, "ranksum")]["spearman"]))
    report = json.loads((out / "ranking_quality.json").read_text())
    assert report["meta"]["evaluated"] == 3 and report["meta"]["skipped"] == 1
    assert report["meta"]["verify_max_abs_diff"] < 1e-5
    assert {s["answer_source"] for s in report["samples"]} == {"generated", "reference"}
    assert all(1 <= s["answer_tokens"] <= 6 for s in report["samples"])
    png = (out / "ranking_quality.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
