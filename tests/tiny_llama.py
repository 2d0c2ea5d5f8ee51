"""Build a tiny random Llama checkpoint with a locally trained tokenizer (no downloads).

    python tests/tiny_llama.py OUT_DIR

Writes a Hugging Face model directory SGLang can serve on CPU (hidden 64, 2 layers, 4 query / 2 KV
heads of dim 16, float32), a byte-level BPE tokenizer with a chat template, and
``hf_greedy.json``: greedy continuations computed by transformers, the reference the end-to-end
tests compare the servers against. Deterministic: the same bytes on every run.
"""

from __future__ import annotations

import json
import os
import sys

PROMPTS = ["hello world the capital", "one two three four", "the lazy dog jumps over",
           "question: what is the answer"]
NEW_TOKENS = 12


def build(out: str) -> dict:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    os.makedirs(out, exist_ok=True)
    torch.manual_seed(1234)
    vocab = ("alpha beta gamma delta the quick brown fox jumps over lazy dog hello world capital "
             "paris france city one two three four five six seven eight nine ten answer question "
             "user assistant system what is").split()
    corpus = [" ".join(vocab[(7 * i + 3 * j) % len(vocab)] for j in range(10)) for i in range(300)]
    bos, eos, pad = "<s>", "</s>", "<pad>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=[bos, eos, pad], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant:{% endif %}")
    fast.save_pretrained(out)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=4096, bos_token_id=fast.bos_token_id,
                      eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
                      tie_word_embeddings=False, dtype="float32")
    model = LlamaForCausalLM(cfg).float().eval()
    # Random init is N(0, 0.02): scale it up so greedy decoding does not collapse onto one token.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    model.save_pretrained(out)
    greedy = {}
    for prompt in PROMPTS:
        ids = fast(prompt, return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                             pad_token_id=fast.pad_token_id)
        greedy[prompt] = gen[0, ids.shape[1]:].tolist()
    with open(os.path.join(out, "hf_greedy.json"), "w") as f:
        json.dump({"new_tokens": NEW_TOKENS, "greedy": greedy}, f, indent=1)
    return greedy


if __name__ == "__main__":
    print(json.dumps(build(sys.argv[1])))
