"""tokenizer.py — byte-level BPE on top of tiktoken, built from local files only.

* ``Tokenizer.from_tokenizer_json`` reads a Hugging Face tokenizer.json (GPT-2 style, SmolLM2,
  Llama-3, Qwen2); ``Tokenizer.from_gguf`` reads a GGUF file's tokenizer; ``to_json`` writes a
  tokenizer.json that both this file and HF ``tokenizers`` load with the same ids.
* ``train_bpe`` trains the tiny model's vocabulary on the task's text (special tokens last).
* ``format_chat`` wraps a user message in the ChatML prompt of instruct models.

Design decisions
* tiktoken does the encoding (fast, and no model-hub download: the vocabulary comes from the
  checkpoint's own file). tiktoken merges by rank, so a token's id must be its merge priority;
  the constructor checks that the merge list's token ids increase, which holds for the families
  above and for ``train_bpe``.
* The pre-tokenizer regex is derived from tokenizer.json's ``pre_tokenizer`` for the few forms
  those families use; anything else is rejected rather than approximated, because a silently
  different split gives different ids. Equality with HF ``tokenizers`` is tested.
* ``regex`` (not ``re``) is needed for the \\p{L}/\\p{N} classes of the GPT-2 pattern in
  ``train_bpe``; it is listed in requirements.txt.
"""
from __future__ import annotations

import json
import unicodedata
from collections import Counter
from pathlib import Path

import regex
import tiktoken

from cli import CheckpointError


GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# HF Digits(individual_digits=True) followed by ByteLevel(use_regex=True) as ONE regex: every
# digit is its own piece, and since the GPT-2 regex then runs on the text *between* digits, a
# digit acts like end-of-text for the whitespace lookahead ("  1" -> "  ", "1", not " ", " ", "1").
DIGITS_GPT2_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
DIGITS_BYTE_LEVEL = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTE_LEVEL]}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode char table used in byte-level BPE vocab files."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:  # whitespace / control bytes are moved to code points 256+
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


BYTE_TO_UNICODE = bytes_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}


def token_bytes(s: str) -> bytes:
    """A vocab-file token string (byte-level alphabet) -> its bytes; KeyError if not byte-level."""
    return bytes(UNICODE_TO_BYTE[c] for c in s)


def token_str(b: bytes) -> str:
    return "".join(BYTE_TO_UNICODE[x] for x in b)


def pattern_from_pre_tokenizer(pre: dict | None, where) -> str:
    """The tiktoken split regex equivalent to a tokenizer.json `pre_tokenizer` (the forms used by
    GPT-2-style, SmolLM2, Llama-3 and Qwen2 tokenizers); anything else is rejected."""
    steps = pre["pretokenizers"] if pre and pre.get("type") == "Sequence" else [pre]
    kinds = [s and s.get("type") for s in steps]
    byte_level = steps[-1] if kinds[-1] == "ByteLevel" else None
    if byte_level is None or byte_level.get("add_prefix_space"):
        raise CheckpointError(f"{where}: field 'pre_tokenizer' must end in ByteLevel(add_prefix_space=false), got {pre!r}")
    use_regex = byte_level.get("use_regex", True)
    if kinds == ["ByteLevel"] and use_regex:
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and use_regex:
        return DIGITS_GPT2_PATTERN
    if kinds == ["Split", "ByteLevel"] and not use_regex and "Regex" in steps[0].get("pattern", {}) \
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
        return steps[0]["pattern"]["Regex"]
    raise CheckpointError(f"{where}: field 'pre_tokenizer' {pre!r} is not supported")


class Tokenizer:
    """Byte-level BPE with tiktoken doing the work.

    tiktoken merges by token rank, so a token's id must also be its merge priority: we check that
    the merged token ids increase along the merge list (true for GPT-2, SmolLM2, Llama-3, Qwen2 and
    for `train_bpe`). Special (added) tokens found in the text are encoded as their ids.

    Bytes missing from the vocabulary (SmolLM2 lacks a few ASCII control characters such as \\x04):
    characters containing such a byte are DROPPED from the text before encoding (HF `tokenizers`
    drops the byte too, but after pre-tokenization, so the two can differ only around such a char).
    """

    def __init__(self, vocab: dict[bytes, int], merges: list[tuple[bytes, bytes]], special: dict[str, int],
                 pre_tokenizer: dict, normalizer: dict | None = None, eos_id: int | None = None, where="tokenizer"):
        for i, (a, b) in enumerate(merges):
            if a + b not in vocab:
                raise CheckpointError(f"{where}: merge {i} ({a!r}, {b!r}) produces a token missing from the vocab")
            if i and vocab[a + b] <= vocab[merges[i - 1][0] + merges[i - 1][1]]:
                raise CheckpointError(f"{where}: merge {i} ({a!r}, {b!r}): token ids are not in merge order, "
                                 "which tiktoken ranks cannot represent")
        if normalizer not in (None, {"type": "NFC"}):
            raise CheckpointError(f"{where}: field 'normalizer' {normalizer!r} is not supported (only null or NFC)")
        self.vocab, self.merges, self.special = vocab, merges, dict(special)
        self.pre_tokenizer, self.normalizer, self.eos_id = pre_tokenizer, normalizer, eos_id
        self.pattern = pattern_from_pre_tokenizer(pre_tokenizer, where)
        self.missing_bytes = bytes(b for b in range(256) if bytes([b]) not in vocab)
        self._build()

    def _build(self):
        self._enc = tiktoken.Encoding("adasr", pat_str=self.pattern, mergeable_ranks=self.vocab, special_tokens=self.special)
        self.vocab_size = self._enc.max_token_value + 1

    # --- loading
    @classmethod
    def from_tokenizer_json(cls, path, eos_id: int | None = None) -> "Tokenizer":
        """A HF tokenizer.json holding a byte-level BPE model."""
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: cannot read tokenizer: {e}") from None
        if not isinstance(d, dict):
            raise CheckpointError(f"{path}: expected a JSON object, got {type(d).__name__}")
        m = d.get("model") or {}
        if not isinstance(m, dict):
            raise CheckpointError(f"{path}: field 'model' must be a JSON object")
        if m.get("type") != "BPE" or m.get("byte_fallback") or m.get("continuing_subword_prefix") or m.get("end_of_word_suffix"):
            raise CheckpointError(f"{path}: field 'model' must be a plain byte-level BPE, got type {m.get('type')!r}")
        for field, kind in (("vocab", dict), ("merges", list)):
            if not isinstance(m.get(field), kind):
                raise CheckpointError(f"{path}: field 'model.{field}' must be a JSON "
                                      f"{'object' if kind is dict else 'list'}")
        added = d.get("added_tokens", [])
        if not isinstance(added, list) or not all(isinstance(t, dict) and isinstance(t.get("content"), str)
                                                   and type(t.get("id")) is int for t in added):
            raise CheckpointError(f"{path}: field 'added_tokens' must be a list of {{id, content}}")
        # every added token (special or not) is matched verbatim in the text, as HF does by default
        special = {t["content"]: t["id"] for t in d.get("added_tokens", [])}
        try:
            vocab = {token_bytes(s): i for s, i in m["vocab"].items() if s not in special}
            merges = [tuple(map(token_bytes, mg.split(" ") if isinstance(mg, str) else mg)) for mg in m["merges"]]
        except KeyError as e:
            raise CheckpointError(f"{path}: model vocab/merges contain {e} which is not a byte-level character") from None
        return cls(vocab, merges, special, d.get("pre_tokenizer"), d.get("normalizer"), eos_id, where=path)

    @classmethod
    def from_gguf(cls, reader, where="gguf") -> "Tokenizer":
        """From a gguf.GGUFReader's tokenizer.ggml.* metadata (tokenizer model 'gpt2')."""
        f = reader.fields
        model = f["tokenizer.ggml.model"].contents()
        if model != "gpt2":
            raise CheckpointError(f"{where}: field 'tokenizer.ggml.model' = {model!r} is not supported (only gpt2 byte-level BPE)")
        pre = f["tokenizer.ggml.pre"].contents() if "tokenizer.ggml.pre" in f else "default"
        pre_tokenizers = {"smollm": DIGITS_BYTE_LEVEL, "gpt2": BYTE_LEVEL, "default": BYTE_LEVEL}
        if pre not in pre_tokenizers:
            raise CheckpointError(f"{where}: field 'tokenizer.ggml.pre' = {pre!r} is not supported ({', '.join(pre_tokenizers)})")
        tokens = f["tokenizer.ggml.tokens"].contents()
        types = f["tokenizer.ggml.token_type"].contents()
        special = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)}  # control, user-defined
        vocab = {token_bytes(t): i for i, (t, ty) in enumerate(zip(tokens, types)) if ty not in (3, 4)}
        merges = [tuple(map(token_bytes, m.split(" "))) for m in f["tokenizer.ggml.merges"].contents()]
        eos = f["tokenizer.ggml.eos_token_id"].contents() if "tokenizer.ggml.eos_token_id" in f else None
        return cls(vocab, merges, special, pre_tokenizers[pre], None, eos, where=where)

    # --- use
    def encode(self, text: str) -> list[int]:
        if self.normalizer:
            text = unicodedata.normalize("NFC", text)
        if self.missing_bytes:
            raw = text.encode("utf-8", "surrogatepass")
            if len(raw.translate(None, self.missing_bytes)) != len(raw):  # rare: take the slow path
                text = "".join(c for c in text if not any(b in self.missing_bytes for b in c.encode("utf-8", "surrogatepass")))
        return self._enc.encode(text, allowed_special="all")

    def decode(self, ids) -> str:
        return self._enc.decode_bytes(list(ids)).decode("utf-8", errors="replace")

    def token_id(self, token: str) -> int:
        if token in self.special:
            return self.special[token]
        if token.encode() in self.vocab:
            return self.vocab[token.encode()]
        raise KeyError(f"token {token!r} is not in the vocabulary (add it with add_special_tokens)")

    def add_special_tokens(self, tokens: list[str]) -> None:
        """Append new special tokens after the current vocab (ids vocab_size, vocab_size+1, ...); idempotent."""
        for t in tokens:
            if t not in self.special:
                self.special[t] = self.vocab_size
                self.vocab_size += 1
        self._build()

    def save(self, path):
        Path(path).write_text(self.to_json(), encoding="utf-8")

    def to_json(self) -> str:
        """A HF-compatible tokenizer.json. `ignore_merges` is true because tiktoken, too, emits a
        pre-token that is itself in the vocab as one token."""
        vocab = {token_str(t): i for t, i in self.vocab.items()}
        vocab.update({token_str(t.encode()): i for t, i in self.special.items()})
        d = {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for t, i in sorted(self.special.items(), key=lambda x: x[1])],
            "normalizer": self.normalizer, "pre_tokenizer": self.pre_tokenizer, "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                      "vocab": dict(sorted(vocab.items(), key=lambda x: x[1])),
                      "merges": [[token_str(a), token_str(b)] for a, b in self.merges]},
        }
        return json.dumps(d, ensure_ascii=False, indent=1)


def train_bpe(texts: list[str], vocab_size: int, special_tokens: list[str]) -> Tokenizer:
    """Train a byte-level BPE: ids 0..255 are the bytes, each merge of the most frequent adjacent
    pair (counted over GPT-2-style pre-tokenized words, where a whole number is one word, so no
    token ever spans a number boundary) adds the next id, and the special tokens come last.

    A pair whose concatenation already is a token (e.g. "ab"+"c" after "a"+"bc") is merged into
    that token without a new merge entry, keeping one id per byte string as tiktoken requires.
    """
    n_merges = vocab_size - 256 - len(special_tokens)
    if n_merges < 0:
        raise ValueError(f"train_bpe: vocab_size {vocab_size} < 256 bytes + {len(special_tokens)} special tokens")
    pat = regex.compile(GPT2_PATTERN)
    counts = Counter(w for t in texts for w in pat.findall(t))
    words = [[bytes([b]) for b in w.encode("utf-8")] for w in counts]
    freqs = list(counts.values())
    vocab = {bytes([b]): b for b in range(256)}
    merges = []
    while len(merges) < n_merges:
        pairs = Counter()
        for w, f in zip(words, freqs):
            for p in zip(w, w[1:]):
                pairs[p] += f
        if not pairs:
            break  # every word is a single token already
        a, b = max(pairs, key=pairs.get)
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
            merges.append((a, b))
        for w in words:  # apply the merge left to right in every word
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i:i + 2] = [a + b]
                i += 1
    special = {t: len(vocab) + i for i, t in enumerate(special_tokens)}
    return Tokenizer(vocab, merges, special, BYTE_LEVEL)


def format_chat(tokenizer: Tokenizer, user_text: str) -> str:
    """ChatML prompt for instruct models that have <|im_start|> (SmolLM2, Qwen); plain text otherwise."""
    if "<|im_start|>" not in tokenizer.special:
        return user_text
    return f"<|im_start|>user\n{user_text}<|im_end|>\n<|im_start|>assistant\n"


