"""kvcache.py — rows of different lengths: the KV cache and the ragged layouts of a forward.

model.py's ``Transformer`` is a plain causal decoder; this file is the engine that lets one
forward serve rows that are not the same length, which is what a streaming rollout is made of
(one row reads a whole chunk while its neighbours write one token each) and what a training
batch of episodes is (every episode its own length, all sharing the instruction prompt).

* ``Ragged``    — rows given right-padded as (B, T) with their lengths. The projections and the
                  MLP run on the N real tokens only, flattened into one sequence (1, N, dim); a
                  prefix every row shares is computed once. Only attention sees the rows padded
                  (``Ragged.attend``).
* ``KVCache``   — preallocated per-row keys/values; rows sit at different positions and take
                  different numbers of new tokens per step. ``plan`` makes the step's bookkeeping;
                  ``select`` drops or duplicates rows in place (a group's G copies of a prompt).
* ``CacheStep`` — one ragged step through the cache: where each token is written, and its
                  attention split so that one long row does not pad every row's queries.

Design decisions
* No wasted matmuls. Padding costs only inside attention, where it cannot be avoided without a
  varlen kernel; everything else sees the real tokens.
* The shared prefix (the instruction of every prompt) is computed once in a training forward:
  causal attention makes its hidden states the same in every row, so one copy whose gradient is
  the sum of the rows' is the same function with fewer matmuls. ``pad`` is a gather
  (index_select), whose backward is index_add, much faster on a CPU than indexing's.
* The cache buffers start as zeros, not empty: masked scores are added as -inf, and a NaN from
  uninitialised memory would poison them.
* ``select`` moves rows inside buffers that have room for B*G rows and never allocates: on a CPU
  the page faults of a fresh buffer cost more than the copy.
* The cache holds the weights' dtype, or bf16 under autocast on a GPU. On a CPU under bf16
  autocast the cache and the decode step's attention stay fp32: PyTorch's CPU attention kernel
  is many times slower in bf16 than in fp32 at a decode step's shapes (docs/speed.md).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F


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

    def attend(self, layer: int, q, k, v) -> torch.Tensor:
        """Causal attention of a training forward: q, k, v (N, H(kv), hd) of the computed tokens
        -> (N, H, hd). Padded to (B, H, T, hd) for the attention alone: right padding comes
        after every real token, so the causal mask already keeps it out."""
        y = F.scaled_dot_product_attention(*(self.pad(t).transpose(1, 2) for t in (q, k, v)),
                                           is_causal=True, enable_gqa=True)
        return self.flat(y.transpose(1, 2))

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, T, ...), zeros at the padding. A gather, so that the backward pass sums
        the gradients of every row's copy of the shared prefix into its one computed token
        (index_select: its backward is index_add, faster on a CPU than indexing's)."""
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
        k, v (B, Hkv, length, hd). k and v take the cache's dtype."""
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

    def attend(self, layer: int, q, k, v) -> torch.Tensor:
        """Write the step's keys/values into the cache, then attend: q, k, v (N, H(kv), hd) of
        the step's new tokens -> (N, H, hd).

        Two attention calls, so that one row reading a whole chunk does not pad every row's
        queries to the chunk's length: the first new token of every row (B, H, 1, hd) against
        the whole cache, then the later tokens of the rows that got several (R2, H, T2, hd)
        against those rows' keys alone."""
        keys, values = self.cache.write(layer, k, v, self.rows, self.positions, self.length)
        q = q.to(keys.dtype)
        # attention in the cache's dtype: autocast would cast an fp32 cache (a CPU's) to bf16
        with torch.autocast(q.device.type, enabled=False) if keys.dtype == torch.float32 \
                else nullcontext():
            first = F.scaled_dot_product_attention(q[self.first][:, :, None], keys, values,
                                                   attn_mask=self.first_mask, enable_gqa=True)
            y = first.new_empty(q.shape)
            y[self.first[self.lengths > 0]] = first[self.lengths > 0, :, 0]
            if len(self.more):
                later = F.scaled_dot_product_attention(
                    q[self.more_idx].transpose(1, 2), keys[self.more], values[self.more],
                    attn_mask=self.more_mask, enable_gqa=True).transpose(1, 2)    # (R2, T2, H, hd)
                y[self.more_idx[self.more_valid]] = later[self.more_valid]
        return y
