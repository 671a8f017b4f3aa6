"""model.py — the decoder: a causal transformer from token ids to logits, with a KV cache.

One architecture covers the pretrained families we load (checkpoint.py): Llama (SmolLM2,
Llama-3.x), Qwen2 (q/k/v biases) and Qwen3 (per-head RMSNorm on q and k), and the tiny model
the main job trains from scratch (``tiny_config``, ``init_weights``).

Read it top-down: ``ModelConfig`` (read from / written to a Hugging Face config.json), the
layers (RMSNorm, RoPE, attention, SwiGLU MLP, block), then ``Transformer.forward``, whose first
branch is the textbook forward — every row T tokens, causal attention, no cache. Its second
branch hands the same layers a *layout* from kvcache.py for rows of different lengths, with or
without a KV cache; that is what a rollout (one row reads a chunk while the others write a
token) and a training batch of episodes need. The layout decides only how the N real tokens
attend (``layout.attend``); every other layer is the same code on a (1, N, dim) sequence.

Design decisions
* Module attribute names are the HF ones (``layers.3.self_attn.q_proj``, ...), so a state-dict
  key maps to its HF tensor name by prefixing "model." (except ``lm_head``); no rename table.
* RoPE uses the HF rotate-half layout and is computed per forward from the positions in fp32,
  so there is no position table to outgrow and no fp32 buffer that ``.to(bfloat16)`` would round.
* GQA goes through ``F.scaled_dot_product_attention(..., enable_gqa=True)`` instead of repeating
  the KV heads: no copy of the keys per query head.
* Logits are always float32: the RL ratio exp(logp_new - logp_old) is sensitive to bf16 rounding
  of the softmax input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kvcache import KVCache, Ragged, shared_prefix


# -----------------------------------------------------------------------------
# config

@dataclass
class ModelConfig:
    """The hyper-parameters of one decoder, in our names (checkpoint.py translates a Hugging
    Face config.json to and from it)."""
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


class Linear(nn.Linear):
    """nn.Linear, except for a CPU forward without autograd (a rollout's decode steps): there the
    product is computed as W @ xᵀ instead of x @ Wᵀ.

    Why: a decode step multiplies a few rows (B·G = 32) by every weight matrix, so it is bound by
    reading the weights, not by arithmetic. Given x @ Wᵀ, the CPU BLAS repacks the transposed
    weight on every call, which reads and writes it once more; as W @ xᵀ, the weight is the left
    operand in its stored row-major order and only the small xᵀ is repacked (measured in
    docs/speed.md). The result is the transpose of a contiguous (out, N) product, a strided view
    the next ops read as they are. With autograd (the training forward, compute-bound) and on
    CUDA, plain F.linear."""

    def forward(self, x):
        if torch.is_grad_enabled() or x.device.type != "cpu":
            return super().forward(x)
        rows = x.reshape(-1, x.shape[-1]).T                       # (in, N)
        # addmm/mm are on autocast's bf16 list, like F.linear: the bias is cast with the weight
        y = torch.mm(self.weight, rows) if self.bias is None else torch.addmm(self.bias[:, None], self.weight, rows)
        return y.T.view(*x.shape[:-1], -1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads, self.head_dim = layer, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x, cos, sin, layout: Ragged | None = None):
        """x (B, T, dim) -> (B, T, dim), causal. With a ``layout`` (kvcache.py) x is (1, N, dim):
        the N real tokens of rows of different lengths, flattened, and the layout makes each
        attend to its own row — the row so far (``Ragged``) or the row's cache (``CacheStep``,
        which writes the new keys/values there first)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm:  # qwen3 normalises each head before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if layout is None:      # the textbook path: T tokens a row, causal
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        # (1, H, N, hd) -> (N, H, hd): one row of heads per real token
        y = layout.attend(self.layer, *(t[0].transpose(0, 1) for t in (q, k, v)))
        return self.o_proj(y.reshape(1, -1, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = Linear(cfg.ffn_dim, cfg.dim, bias=False)

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



class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = Linear(cfg.dim, cfg.vocab_size, bias=False)
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
        max_len tokens, in the weights' dtype, or on a GPU under autocast in the autocast dtype
        (kvcache.py says why a CPU keeps fp32)."""
        c, kind = self.cfg, self.device.type
        autocast = kind != "cpu" and torch.is_autocast_enabled(kind)
        dtype = torch.get_autocast_dtype(kind) if autocast else self.dtype
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
        else:                   # rows of different lengths, or through a cache (kvcache.py)
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


# ---------------------------------------------------------------------------------------------
# The policy's distribution: sampling and scoring share one definition
# ---------------------------------------------------------------------------------------------

def log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits (..., V) -> log softmax(logits / temperature) (..., V) in fp32: the one definition of
    the policy's distribution, shared by sampling (the rollout) and scoring (training), so that a
    rollout's log-probs are exactly the training forward's. Temperature 0 (greedy) is scored at 1."""
    logits = logits.float()
    if temperature not in (0, 1):       # skip a pass over (tokens × vocab) when it changes nothing
        logits = logits / temperature
    return logits.log_softmax(-1)


def sample(logits: torch.Tensor, temperature: float, uniform: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (N, V), uniform (N,) numbers in [0, 1), one a row -> tokens (N,) long, their
    log-probs (N,) float32. Temperature 0 is greedy (and needs no ``uniform``). Plain temperature
    sampling (no top-k/top-p): the recorded log-prob is then exactly that of the distribution the
    token was drawn from, as the PPO importance ratio requires.

    Sampling inverts the cumulative distribution with the row's uniform number (the first token
    whose cumulative probability reaches it): exact, and on a CPU much cheaper than
    torch.multinomial, which draws an exponential per vocabulary entry (49k for SmolLM2). The
    caller draws the numbers so that each row can have its own random stream (``rollout``)."""
    logp = log_probs(logits, temperature)
    if temperature == 0:
        tokens = logp.argmax(-1)
    else:
        cdf = logp.exp().cumsum(-1)                                             # (N, V)
        # u in (0, total]: a token of probability 0 is never the first to reach it
        u = (1 - uniform.to(cdf.device, cdf.dtype)[:, None]) * cdf[:, -1:]
        tokens = torch.searchsorted(cdf, u).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


@torch.inference_mode()
def generate(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy completion of one prompt with the KV cache, to the tokenizer's eos. For sanity
    checks (does a loaded checkpoint still answer?)."""
    ids = torch.tensor([tokenizer.encode(prompt)], device=model.device)
    cache = model.new_cache(1, ids.shape[1] + max_new_tokens)
    logits = model(ids, cache)[:, -1]
    out = []
    for _ in range(max_new_tokens):
        tok = logits.argmax(-1)
        if tok.item() == tokenizer.eos_id:
            break
        out.append(tok.item())
        logits = model(tok[:, None], cache)[:, -1]
    return tokenizer.decode(out)


def token_logprobs(model, h: torch.Tensor, targets: torch.Tensor, temperature: float,
                   max_logits: int = 2 ** 24, entropy: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states h (P, dim) and the tokens that followed them (P,) -> their log-probs (P,)
    and, if asked, the distribution's entropies (P,), detached: a metric, never a loss term.

    The output head is the memory peak of training ((P × vocab) fp32 logits, 49k wide for
    SmolLM2): above ``max_logits`` logits it runs in chunks, each under activation checkpointing,
    so no chunk's logits are kept for the backward pass. A small vocabulary takes one pass."""
    def head(h_chunk, t_chunk):
        lsm = log_probs(model.logits(h_chunk), temperature)                     # (c, V) fp32
        logp = lsm.gather(-1, t_chunk[:, None]).squeeze(-1)
        if not entropy:
            return logp, None
        with torch.no_grad():
            return logp, -(lsm.exp() * lsm).sum(-1)

    chunk = max(1, max_logits // model.cfg.vocab_size)
    if h.shape[0] <= chunk:
        return head(h, targets)
    outs = [checkpoint(head, h[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
            if torch.is_grad_enabled() else head(h[i:i + chunk], targets[i:i + chunk])
            for i in range(0, h.shape[0], chunk)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]) if entropy else None
