"""rollout.py — the chunk-by-chunk rollout loop: B problems × G samples, one batched forward a step.

This file owns the rollout loop that turns problems into finished Episodes (``rollout``; it
samples with ``model.sample``, the one definition of the policy's distribution), and streaming
inference from the command line (``python rollout.py --model DIR --problem "..."``, ``LiveView``).

Every row reads its stream chunk by chunk. The environment feeds a chunk's tokens as
observations; the model writes a thought until it emits ``<EOT>`` (just ``<EOT>`` is a skip); then
the next chunk comes. After ``<EOI>`` the model writes the deep phase and the row stops at
``<EOA>`` (or the model's own end token), or at the token budget (then it is *truncated*).
Read-then-think runs in the same loop: its stream is a single block, so all thinking comes after
the last chunk (see ``adasr.Protocol.blocks``).

Design decisions
----------------
* One ragged forward per step (``model(ids, cache, lengths=...)``). At every step each row feeds
  what it has: the token it just sampled, or — when that token closed a thought — the ``<EOT>``
  followed by the whole next chunk, so that a chunk costs one step, not one step per token. Rows
  never wait for each other: one row can be reading chunk 3 while its neighbour is thinking about
  chunk 1. The projections and MLP run on the real tokens only; only the attention is padded to
  the longest row of the step (kvcache.CacheStep).
* The shared prompt (observation block 0) is prefilled once per problem, in the same ragged
  forward, and copied into the G rows of its group with ``cache.select``.
* Finished rows feed nothing, and are dropped from the batch (``cache.select``) once they make
  up a quarter of it: compacting copies the whole cache, so doing it at every finished row would
  cost more than the few padded attention rows it saves.
* Each row draws its random numbers from its own stream, seeded by (seed, problem index, sample):
  its samples do not depend on its neighbours, so the same row in two jobs (GRPO and HRPO,
  paired) sees the same random numbers however the other rows of the batch went.
* Log-probabilities are recorded under the sampling temperature with plain temperature sampling
  (the rollout offers no top-k/top-p), so they are exactly the ones the training forward
  computes: the first PPO ratio is exactly 1.
"""
from __future__ import annotations

import json
import random
from typing import Callable

import torch

from adasr import BUDGET, DEEP, LAYOUTS, STREAM, Episode, Problem, Protocol
from checkpoint import add_markers, load_pretrained
from cli import ArgumentParser, UserError, check_device, check_options, run_cli
from data import load_problems, marker_in, split_question
from model import sample

# ---------------------------------------------------------------------------------------------
# The rollout
# ---------------------------------------------------------------------------------------------



def _forward(model, feeds: list[list[int]], cache) -> torch.Tensor:
    """One ragged step: row r of the cache gets the tokens feeds[r] (possibly none). Returns the
    logits (rows, V) after each row's last token (garbage for a row fed nothing)."""
    device = cache.pos.device
    lengths = torch.tensor([len(f) for f in feeds], device=device)
    ids = torch.zeros(len(feeds), max(1, int(lengths.max())), dtype=torch.long)
    for r, f in enumerate(feeds):
        ids[r, :len(f)] = torch.tensor(f, dtype=torch.long)
    hidden = model(ids.to(device), cache=cache, return_hidden=True, lengths=lengths)
    last = (lengths - 1).clamp(min=0)
    return model.logits(hidden[torch.arange(len(feeds), device=device), last])


# no_grad, not inference_mode: under bf16 autocast, the casts of the weights are cached for the
# whole rollout only outside inference mode; inside it every decode step casts every weight again
# (which doubled SmolLM2's decode step on an AMX CPU; docs/speed.md).
@torch.no_grad()
def rollout(model, protocol: Protocol, problems: list[Problem], *, group_size: int = 1,
            layout: str = "stream", budget: int, temperature: float, seed: int | str = 0,
            first: int = 0, on_token: Callable[[Episode], None] | None = None) -> list[Episode]:
    """Roll out ``group_size`` samples of each problem; returns B*G finished episodes.

    Episodes come grouped: rows b*G … b*G+G-1 are the samples of ``problems[b]``. ``budget`` caps
    the policy tokens of each row. ``temperature=0`` is greedy. Sample g of problem b draws its
    random numbers from its own stream, seeded by (``seed``, ``first`` + b, g): its tokens do not
    depend on which other rows share the batch (``first``: where ``problems`` start in a longer
    list, so that a share of it samples as the whole would). ``on_token(episode)`` is called whenever a row's episode
    grows after its prompt (``LiveView`` prints the stream).
    """
    device = next(model.parameters()).device
    B, G = len(problems), group_size
    blocks = [protocol.blocks(p, layout) for p in problems]
    longest = max(sum(len(ids) for ids, _ in b) for b in blocks) + budget
    cache = model.new_cache(B, longest, capacity=B * G)
    logits = _forward(model, [b[0][0] for b in blocks], cache)      # prefill every prompt

    # Copy each prompt into its G rows.
    group = torch.arange(B, device=device).repeat_interleave(G)
    cache.select(group)
    logits = logits[group]
    rows = [_Row(protocol.episode(problems[b], layout), blocks[b],
                       random.Random(f"{seed}/{first + b}/{g}")) for b in range(B) for g in range(G)]

    active = list(rows)                 # the row state of each row of the cache, in cache order
    while active:
        # one number a row from the row's own stream (finished rows draw none)
        uniform = (torch.tensor([0.0 if row.done else row.rng.random() for row in active])
                   if temperature > 0 else None)
        tokens, logps = sample(logits, temperature, uniform)
        feeds = []
        for row, tok, logp in zip(active, tokens.tolist(), logps.tolist()):
            if row.done:                            # finished, waiting for compaction
                feeds.append([])
                continue
            feeds.append(row.write(tok, logp, protocol, budget))
            if on_token is not None:
                on_token(row.ep)
        if 4 * sum(row.done for row in active) >= len(active):   # compact: drop finished rows
            keep = [r for r, row in enumerate(active) if not row.done]
            if not keep:
                break
            active, feeds = [active[r] for r in keep], [feeds[r] for r in keep]
            cache.select(torch.tensor(keep, device=device))
        logits = _forward(model, feeds, cache)
    return [row.ep for row in rows]


def check_context(model, protocol: Protocol, problems: list[Problem], budget: int) -> None:
    """Every problem's observations plus ``budget`` policy tokens must fit the model's context
    (``max_seq_len``, the positions it was trained on): past it RoPE extrapolates and the logits
    are quietly wrong, and the KV cache would be sized for it. A UserError names the problem."""
    limit = model.cfg.max_seq_len
    for p in problems:
        n = sum(len(ids) for ids, _ in protocol.blocks(p, "stream"))
        if n + budget > limit:
            raise UserError(f"problem {p.id}: {n} observation tokens + --budget {budget} policy "
                            f"tokens exceed the model's context of {limit} tokens "
                            "(max_position_embeddings); lower --budget or shorten the problem")


class _Row:
    """Bookkeeping of one row: its episode (given its prompt), its observation blocks, the index
    of the last block fed, how many tokens the policy wrote, and its random stream."""

    def __init__(self, ep: Episode, blocks: list[tuple[list[int], list[int]]], rng: random.Random):
        self.ep, self.blocks, self.block = ep, blocks, 0
        self.n_policy, self.rng = 0, rng
        first_ids, first_chunks = blocks[0]
        ep.append(first_ids, policy=False, phase=self.phase, chunk=first_chunks)

    @property
    def phase(self) -> int:
        """After the last block the model is in the deep phase; before it, streaming."""
        return DEEP if self.block == len(self.blocks) - 1 else STREAM

    @property
    def done(self) -> bool:
        return self.ep.parsed is not None

    def write(self, tok: int, logp: float, protocol: Protocol, budget: int) -> list[int]:
        """The model wrote ``tok``: record it, and return what the row feeds next — the token,
        followed by the next observation block when it closed a thought; nothing once the row is
        finished (stop token, or the budget: checked first, so a row whose budget-th token is
        <EOT> stops there)."""
        deep = self.phase == DEEP
        self.ep.append([tok], policy=True, phase=self.phase,
                       chunk=len(self.ep.problem.chunks) if deep else self.block, logprobs=[logp])
        self.n_policy += 1
        if tok in protocol.stop_ids or self.n_policy >= budget:
            self.ep.truncated = tok not in protocol.stop_ids
            protocol.finish(self.ep)
            return []
        if not deep and tok == protocol.eot:            # thought done: the next block arrives
            self.block += 1
            ids, chunks = self.blocks[self.block]
            self.ep.append(ids, policy=False, phase=self.phase, chunk=chunks)
            return [tok] + ids
        return [tok]


# ---------------------------------------------------------------------------------------------
# Streaming inference from the command line: python rollout.py --model ... --problem "..."
# ---------------------------------------------------------------------------------------------

class LiveView:
    """Prints episodes while they are rolled out (``rollout(..., on_token=LiveView(protocol))``):
    the question, each chunk once it has been fed, each thought (or skip) once the model closes it
    with <EOT>, and the ending when the episode stops."""

    def __init__(self, protocol: Protocol):
        self.protocol = protocol
        self.shown: dict[int, list[int]] = {}   # id(episode) -> [chunks printed, thoughts printed]

    def __call__(self, ep: Episode) -> None:
        pr = self.protocol
        if id(ep) not in self.shown:
            print(f"Question: {ep.problem.question}", flush=True)
            self.shown[id(ep)] = [0, 0]
        shown = self.shown[id(ep)]
        fed = sum(1 for t, pol in zip(ep.tokens, ep.is_policy) if not pol and t == pr.eos)
        closed = [c for t, pol, ph, c in zip(ep.tokens, ep.is_policy, ep.phase, ep.chunk)
                  if pol and ph == STREAM and t == pr.eot]
        # a thought closes before the next chunk is fed: interleave chunk k, thought k, ...
        for k in range(len(ep.problem.chunks)):
            if shown[0] <= k < fed:
                print(pr.chunk_line(ep.problem, k), flush=True)
                shown[0] += 1
            if shown[1] <= k < len(closed):
                ids = [t for t, pol, c in zip(ep.tokens, ep.is_policy, ep.chunk) if pol and c == k]
                print(pr.thought_line(pr.text(ids[:-1]).strip()), flush=True)
                shown[1] += 1
        if ep.parsed is not None:
            print("\n".join(pr.ending_lines(ep)) + "\n", flush=True)


def episode_record(ep: Episode) -> dict:
    """One machine-readable record of a finished episode (``python rollout.py --json``)."""
    p, ref = ep.parsed, ep.problem.answer
    return {"id": ep.problem.id, "question": ep.problem.question, "chunks": ep.problem.chunks,
            "thoughts": p.thoughts, "skips": p.skips, "deep": p.deep, "answer": p.answer,
            "reference": ref or None, "correct": ep.correct if ref else None,
            "format_valid": p.valid, "format_errors": p.stream_errors + p.deep_errors,
            "stream_tokens": ep.stream_tokens, "deep_tokens": ep.deep_tokens,
            "residual_tokens": ep.residual_tokens, "residual_s": round(ep.residual_s, 3),
            "truncated": ep.truncated}


def main(argv=None) -> None:
    ap = ArgumentParser(description="Run a model on a stream and show it as it happens.")
    ap.add_argument("--model", required=True, help="checkpoint directory, .gguf file or 'smollm2'")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--problem", help="free text; the asking sentence becomes the question")
    src.add_argument("--data", help="StreamingThinker JSON or GSM8K JSONL file")
    ap.add_argument("--limit", type=int, default=None, help="first N problems of --data")
    ap.add_argument("--layout", default="stream", choices=LAYOUTS)
    ap.add_argument("--wpm", type=float, default=Protocol.WPM, help="words per minute of the stream")
    ap.add_argument("--decode-tps", type=float, default=Protocol.DECODE_TPS,
                    help="model tokens per second")
    ap.add_argument("--budget", type=int, default=BUDGET, help="policy tokens per problem")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 is greedy decoding")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true", help="one JSON record per problem")
    args = ap.parse_args(argv)
    check_options(args, [("--limit", args.limit is None or args.limit >= 1, "at least 1"),
                         ("--wpm", args.wpm > 0, "positive"),
                         ("--decode-tps", args.decode_tps > 0, "positive"),
                         ("--budget", args.budget >= 1, "at least 1"),
                         ("--temperature", args.temperature >= 0, "0 (greedy) or positive")])
    check_device(args.device)

    if args.problem is not None:
        if marker := marker_in(args.problem):
            raise UserError(f"option --problem holds the protocol marker {marker}: the markers are "
                            "written by the protocol, never by the user")
        question, chunks = split_question(args.problem)
        problems = [Problem(id="cli", question=question, chunks=chunks, answer="")]
    else:
        problems = load_problems(args.data)[:args.limit]
    model, tok = load_pretrained(args.model, device=args.device)
    add_markers(model, tok)
    protocol = Protocol(tok, wpm=args.wpm, decode_tps=args.decode_tps)
    check_context(model, protocol, problems, args.budget)
    for i, problem in enumerate(problems):
        [ep] = rollout(model, protocol, [problem], layout=args.layout, budget=args.budget,
                       temperature=args.temperature, seed=f"{args.seed}/{i}",
                       on_token=None if args.json else LiveView(protocol))
        if args.json:
            print(json.dumps(episode_record(ep)), flush=True)


if __name__ == "__main__":
    run_cli(main)
