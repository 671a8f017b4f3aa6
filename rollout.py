"""rollout.py — the chunk-by-chunk rollout loop: B problems × G samples, one batched forward a step.

Every row reads its stream chunk by chunk. The environment feeds a chunk's tokens as
observations; the model writes a thought until it emits ``<EOT>`` (just ``<EOT>`` is a skip); then
the next chunk comes. After ``<EOI>`` the model writes the deep phase and the row stops at
``<EOA>`` (or the model's own end token), or at the token budget (then it is *truncated*).
Read-then-think runs in the same loop: its stream is a single block, so all thinking comes after
the last chunk (see ``adasr.Protocol.blocks``).

Design decisions
----------------
* One token per row per step. At every step each active row either *consumes* the next queued
  observation token (forced) or *samples* one (policy). Rows therefore never wait for each other:
  one row can be reading chunk 3 while its neighbour is thinking about chunk 1, and the loop is a
  single (rows, 1) forward per step. The price: a chunk of n tokens costs n decode steps instead of
  one prefill. Chunks are sentences (10–30 tokens), about as long as the thoughts they trigger, so
  this at most doubles the stream-phase steps, while the batch keeps every step wide; a
  multi-token chunk prefill would force rows into lockstep or ragged multi-token steps.
* The shared prompt (observation block 0) is prefilled once per problem — right-padded in one
  (B, T) forward, then each row's cache position is rewound to its true length (the padding's
  K/V is overwritten by later writes) — and copied into the G rows of its group with
  ``cache.select``.
* Finished rows stop costing compute, lazily: they are dropped from the batch (``cache.select``)
  once they make up a quarter of it. Compacting copies the whole cache, so doing it at every
  finished row would cost more than the few wasted row-steps it saves.
* Log-probabilities are recorded under the sampling temperature with plain temperature sampling
  (the rollout offers no top-k/top-p), so they are exactly the ones the training forward computes: the
  first PPO ratio is exactly 1.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

import torch

from adasr import DEEP, STREAM, Episode, Protocol
from data import Problem
from model import sample


@torch.inference_mode()
def rollout(model, protocol: Protocol, problems: list[Problem], *, group_size: int = 1,
            layout: str = "stream", budget: int = 256, temperature: float = 1.0,
            generator: torch.Generator | None = None,
            on_token: Callable[[Episode], None] | None = None) -> list[Episode]:
    """Roll out ``group_size`` samples of each problem; returns B*G finished episodes.

    Episodes come grouped: rows b*G … b*G+G-1 are the samples of ``problems[b]``. ``budget`` caps
    the policy tokens of each row. ``temperature=0`` is greedy. ``on_token(episode)`` is called
    after every token a row receives after its prompt (``adasr.LiveView`` prints the stream).
    """
    device = next(model.parameters()).device
    B, G = len(problems), group_size
    blocks = [protocol.blocks(p, layout) for p in problems]

    # Prefill block 0 of every problem in one right-padded forward.
    lens = [len(b[0][0]) for b in blocks]
    rest = [sum(len(ids) for ids, _ in b[1:]) + budget for b in blocks]
    cache = model.new_cache(B, max(lens) + max(rest))   # a finished row may run on until compaction
    ids = torch.zeros(B, max(lens), dtype=torch.long, device=device)
    for b, blk in enumerate(blocks):
        ids[b, :lens[b]] = torch.tensor(blk[0][0])
    lens_t = torch.tensor(lens, device=device)
    hidden = model(ids, cache=cache, return_hidden=True)       # (B, T, D): project only the last
    logits = model.logits(hidden[torch.arange(B, device=device), lens_t - 1])       # (B, V)
    cache.pos.copy_(lens_t)

    # Copy each prompt into its G rows.
    group = torch.arange(B, device=device).repeat_interleave(G)
    cache.select(group)
    logits = logits[group]
    streams = []
    for b in group.tolist():
        s = _Stream(Episode(problems[b], layout), blocks[b])
        first_ids, first_chunks = blocks[b][0]
        s.ep.append(first_ids, policy=False, phase=s.phase, chunk=first_chunks)
        streams.append(s)

    active = list(streams)              # the stream of each row of the cache, in cache order
    n_done = 0                          # finished rows still in the cache
    while active:
        tokens, logps = sample(logits, temperature, generator=generator)
        feed = []
        for s, tok, logp in zip(active, tokens.tolist(), logps.tolist()):
            if s.done:                                      # waiting for compaction
                feed.append(protocol.eoa)
                continue
            if s.queue:                                   # the environment speaks
                tok, ch = s.queue.popleft()
                s.ep.append([tok], policy=False, phase=s.phase, chunk=ch)
                feed.append(tok)
            else:                                           # the model writes
                deep = s.phase == DEEP
                s.ep.append([tok], policy=True, phase=s.phase,
                            chunk=len(s.ep.problem.chunks) if deep else s.block, logprobs=[logp])
                s.n_policy += 1
                feed.append(tok)
                if not deep and tok == protocol.eot:        # thought done: next block arrives
                    s.block += 1
                    s.queue.extend(zip(*s.blocks[s.block]))
                elif tok in protocol.stop_ids or s.n_policy >= budget:
                    s.ep.truncated = tok not in protocol.stop_ids
                    protocol.finish(s.ep)
                    n_done += 1
            if on_token is not None:
                on_token(s.ep)
        if 4 * n_done >= len(active):                       # compact: drop finished rows
            keep = [r for r, s in enumerate(active) if not s.done]
            active, feed, n_done = [active[r] for r in keep], [feed[r] for r in keep], 0
            if not active:
                break
            cache.select(torch.tensor(keep, device=device))
        logits = model(torch.tensor(feed, device=device)[:, None], cache=cache)[:, -1]
    return [s.ep for s in streams]


class _Stream:
    """Bookkeeping of one row: its episode, its observation blocks, the index of the last block
    fed, the observation tokens still queued (id, chunk), and how many tokens the policy wrote."""

    def __init__(self, ep: Episode, blocks: list[tuple[list[int], list[int]]]):
        self.ep, self.blocks, self.block = ep, blocks, 0
        self.queue: deque[tuple[int, int]] = deque()
        self.n_policy = 0

    @property
    def phase(self) -> int:
        """After the last block the model is in the deep phase; before it, streaming."""
        return DEEP if self.block == len(self.blocks) - 1 else STREAM

    @property
    def done(self) -> bool:
        return self.ep.parsed is not None
