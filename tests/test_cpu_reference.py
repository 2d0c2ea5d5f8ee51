"""The CPU reference model (benchmarks.eval.cpu_reference) on a tiny random Llama: its own forward equals the
transformers forward, the sparse settings reduce to dense at their exact limits, and CLAA's later layers hold only
the kept tokens. No downloads."""

from __future__ import annotations

import pytest
import torch

from sglang_sparse import claa
from sglang_sparse.config import ArtConfig, ClaaConfig, PrhsConfig
from benchmarks.eval.cpu_reference import RefConfig, ReferenceLlama


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny_ref_llama")
    words = "alpha beta gamma delta the quick brown fox jumps over lazy dog one two three four five".split()
    corpus = [" ".join(words[(5 * i + 3 * j) % len(words)] for j in range(12)) for i in range(200)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                        show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                      bos_token_id=0, eos_token_id=1, tie_word_embeddings=True, rope_theta=10000.0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(6.0)
    model.save_pretrained(out)
    return str(out)


def _ids(n: int):
    g = torch.Generator().manual_seed(n)
    return torch.randint(2, 250, (n,), generator=g).tolist()


def test_forward_matches_transformers(tiny_model_dir):
    ref = ReferenceLlama(tiny_model_dir, weight_dtype=torch.float32)
    ids = _ids(150)
    with torch.no_grad():
        hf = ref.hf(torch.tensor([ids])).logits[0, -1]
    mine = ref.dense_logits(ids)
    assert torch.allclose(mine, hf, atol=1e-4, rtol=1e-4), float((mine - hf).abs().max())


def test_exact_limits_equal_dense(tiny_model_dir):
    ref = ReferenceLlama(tiny_model_dir, weight_dtype=torch.float32)
    ids = _ids(200)
    cfgs = [
        RefConfig("dense"),
        RefConfig("prhs-all", prhs=PrhsConfig(mode="prhs", page_size=16, delta=0.0, budget=1.0, min_context_len=0)),
        RefConfig("art-exact", art=ArtConfig(mode="on", tau_mag=0.0, tau_dir=0.0), prhs=PrhsConfig(page_size=16)),
        RefConfig("claa-all", claa=ClaaConfig(mode="claa", keep_ratio=1.0, min_prompt_len=0)),
        RefConfig("claa-short", claa=ClaaConfig(mode="claa", keep_ratio=0.2, min_prompt_len=10_000)),
    ]
    res = ref.generate_many(ids, cfgs, max_new_tokens=10)
    dense = res["dense"].token_ids
    assert len(dense) > 0
    for c in cfgs[1:]:
        assert res[c.name].token_ids == dense, c.name
    assert res["prhs-all"].stats["decode_read_fraction"] == pytest.approx(1.0)
    assert res["art-exact"].stats["decode_read_fraction"] == pytest.approx(1.0)


def test_sparse_settings_read_less(tiny_model_dir):
    ref = ReferenceLlama(tiny_model_dir, weight_dtype=torch.float32)
    ids = _ids(400)
    cfgs = [RefConfig("prhs", prhs=PrhsConfig(mode="prhs", page_size=16, delta=0.05, budget=0.25,
                                              min_context_len=0)),
            RefConfig("prhs-floor", prhs=PrhsConfig(mode="prhs", page_size=16, delta=0.05, budget=0.25,
                                                    min_context_len=10_000))]
    res = ref.generate_many(ids, cfgs, max_new_tokens=4)
    assert 0 < res["prhs"].stats["decode_read_fraction"] <= 0.25 + 16 / 400
    assert res["prhs-floor"].stats["decode_read_fraction"] == pytest.approx(1.0)   # below min_context_len


def test_claa_later_layers_hold_kept_tokens(tiny_model_dir):
    ref = ReferenceLlama(tiny_model_dir, weight_dtype=torch.float32)
    ids = _ids(300)
    c = RefConfig("claa", claa=ClaaConfig(mode="claa", keep_ratio=0.2, min_prompt_len=0))
    states = ref.prefill_many(ids, [c])
    (key, (st, logits)), = states.items()
    f = claa.default_filter_layer(ref.num_layers)
    kept = claa.num_kept_tokens(300, 0.2, c.claa.window)
    assert key[1] == f
    assert [k.shape[0] for k in st.k] == [300] * f + [kept] * (ref.num_layers - f)
    assert st.kept == kept
    # the layers before the filter layer are the dense ones
    dense_st, _ = ref.prefill_many(ids, [RefConfig("dense")])[None]
    for i in range(f):
        assert torch.equal(st.k[i], dense_st.k[i])
    res = ref.generate_many(ids, [c], max_new_tokens=3)
    assert res["claa"].stats["claa_kept_tokens"] == kept


def test_estimate_ranking_stops_at_its_delta(tiny_model_dir):
    """``select="estimate"`` (the server's default) runs the estimate selection: pages taken in estimated-mass order
    until the estimated dropped mass is within delta, which on this peaked model reads fewer pages than the min/max
    ranking at the same delta (whose bound does not stop it) and reports an estimate within delta."""
    ref = ReferenceLlama(tiny_model_dir, weight_dtype=torch.float32)
    ids = _ids(400)
    prhs = lambda sel: PrhsConfig(mode="prhs", page_size=16, delta=0.3, budget=1.0, min_context_len=0,  # noqa: E731
                                  select=sel)
    res = ref.generate_many(ids, [RefConfig("est", prhs=prhs("estimate")), RefConfig("bounds", prhs=prhs("bounds"))],
                            max_new_tokens=4)
    est, bounds = res["est"].stats, res["bounds"].stats
    assert est["decode_read_fraction"] < bounds["decode_read_fraction"], (est, bounds)
    assert 0 < est["mean_delta_hat"] <= 0.3, est
