"""rollout.py — the engine: rows of one KV cache, each reading its stream chunk by chunk, stepped
by one ragged forward at a time; the RL rollout is the engine with every chunk already there.

A row is fed a chunk's tokens as observations; the model writes a thought until ``<EOT>`` (just
``<EOT>`` is a skip); then the next chunk comes — at once if it is there, else when it arrives.
After ``<EOI>`` the model writes the deep phase and the row stops at ``<EOA>`` (or the model's
end token) or at the token budget (*truncated*). Read-then-think is one block (Protocol.blocks).

* ``_Row``    — the protocol as one row lives it, written once: what a token does, what the row
                feeds next, when it waits, when it stops. A live stream's chunks arrive into it.
* ``Engine``  — a pool of rows (slots of one KVCache) that join and leave between steps. A step
                samples a token for every row fed in the last one, then ONE ragged forward over
                the rows with something to feed: the sampled token, or a closed thought's <EOT>
                with the whole next chunk (a chunk costs one step). A row waiting for its chunk
                is in no forward; a chunk that arrives mid-thought waits for the <EOT>.
* ``rollout`` — B problems × G samples through an Engine; live streams: live.py, serve.py.

Decisions: a group's prompt is prefilled once and its cache row copied into the G rows; each row
draws from its own random stream, seeded by (seed, problem, sample), so its tokens do not depend
on its neighbours (paired GRPO and HRPO see the same numbers); log-probs are recorded under the
sampling temperature with plain sampling (``model.sample``): exactly the training forward's.
"""
from __future__ import annotations

import random
from typing import Callable

import torch

from adasr import DEEP, STREAM, Episode, Problem, Protocol
from cli import UserError
from kvcache import KVCache
from model import sample

# ---------------------------------------------------------------------------------------------
# One row: the protocol, once
# ---------------------------------------------------------------------------------------------

class _Row:
    """One stream being read: its episode, its observation blocks so far, the index of the last
    block fed, how many tokens the policy wrote, its random stream, and what it holds back for
    the next block (``hold``: nothing at the start, the closing <EOT> after a thought; None while
    the model writes). ``final`` says the stream is complete: the last block ends with <EOI>.

    The RL rollout makes rows of whole problems (every block there from the start); a live
    stream starts with the question alone and grows with ``arrive`` and ``end``."""

    def __init__(self, protocol: Protocol, problem: Problem, layout: str, rng: random.Random,
                 final: bool = True):
        self.protocol, self.layout, self.rng = protocol, layout, rng
        self.ep = protocol.episode(problem, layout)
        self.final, self.block, self.n_policy = final, -1, 0
        self.hold: list[int] | None = []
        self.slot: int | None = None                  # its row of the Engine's cache, while in it
        self.blocks = self._blocks()

    def _blocks(self) -> list[tuple[list[int], list[int]]]:
        """The blocks of the chunks that are there; the last one (<EOI>, or read-then-think's
        only block) once the stream is final. Earlier blocks never change as chunks arrive."""
        blocks = self.protocol.blocks(self.ep.problem, self.layout)
        return blocks if self.final else blocks[:-1]

    def arrive(self, chunk: str) -> None:
        """A chunk of a live stream has arrived: it is fed after the current thought's <EOT>."""
        self.ep.problem.chunks.append(chunk)
        self.ep.arrivals = self.protocol.arrivals(self.ep.problem)    # the simulated clock's
        self.blocks = self._blocks()

    def end(self) -> None:
        """The live stream is over: <EOI> is fed after the current thought."""
        self.final = True
        self.blocks = self._blocks()

    @property
    def phase(self) -> int:
        """After the last block the model is in the deep phase; before it, streaming."""
        return DEEP if self.final and self.block == len(self.blocks) - 1 else STREAM

    @property
    def done(self) -> bool:
        return self.ep.parsed is not None

    @property
    def ready(self) -> bool:
        """Its thought is closed (or it has not started) and its next block is there."""
        return self.hold is not None and self.block + 1 < len(self.blocks)

    @property
    def waiting(self) -> bool:
        """Its thought is closed (or it has not started) and its next block has not arrived."""
        return self.hold is not None and not self.ready and not self.done

    def advance(self) -> list[int]:
        """What the row feeds once its next block is there: the held tokens and the block
        (recorded in the episode); nothing while the model is writing or the block is missing."""
        if not self.ready:
            return []
        self.block += 1
        ids, chunks = self.blocks[self.block]
        self.ep.append(ids, policy=False, phase=self.phase, chunk=chunks)
        feed, self.hold = self.hold + ids, None
        return feed

    def write(self, tok: int, logp: float, budget: int) -> list[int]:
        """The model wrote ``tok``: record it, and return what the row feeds next — the token;
        the token and the next block when it closed a thought (nothing yet if that block has not
        arrived: the row waits); nothing once the row is finished (stop token, or the budget:
        checked first, so a row whose budget-th token is <EOT> stops there)."""
        protocol, deep = self.protocol, self.phase == DEEP
        self.ep.append([tok], policy=True, phase=self.phase,
                       chunk=len(self.ep.problem.chunks) if deep else self.block, logprobs=[logp])
        self.n_policy += 1
        if tok in protocol.stop_ids or self.n_policy >= budget:
            self.ep.truncated = tok not in protocol.stop_ids
            protocol.finish(self.ep)
            return []
        if not deep and tok == protocol.eot:            # thought done: on to the next block
            self.hold = [tok]
            return self.advance()
        return [tok]


# ---------------------------------------------------------------------------------------------
# The engine: a pool of rows, one ragged forward a step
# ---------------------------------------------------------------------------------------------

class _Slots(KVCache):
    """Some rows of the pool's cache, as a cache of their own for one forward. Adjacent rows are
    a view of the pool (the plain KVCache path); scattered rows write into the pool and attend
    over a copy of their filled prefix."""

    def __init__(self, pool: KVCache, slots: list[int]):
        self.adjacent = slots == list(range(slots[0], slots[0] + len(slots)))
        if self.adjacent:                             # views: the model's writes land in the pool
            span = slice(slots[0], slots[0] + len(slots))
            self.buffers, self.pos = tuple(buf[:, span] for buf in pool.buffers), pool.pos[span]
        else:                                         # pos is a copy: the Engine writes it back
            self.slots = torch.tensor(slots, device=pool.pos.device)
            self.buffers, self.pos = pool.buffers, pool.pos[self.slots]

    def write(self, layer: int, k, v, rows, positions, length: int):
        if self.adjacent:
            return super().write(layer, k, v, rows, positions, length)
        slots = self.slots[rows]
        for buf, new in zip(self.buffers, (k, v)):
            buf[layer][slots, :, positions] = new.to(buf.dtype)
        return tuple(buf[layer, :, :, :length].index_select(0, self.slots) for buf in self.buffers)


class Engine:
    """A pool of ``slots`` rows of up to ``max_len`` tokens each, in one KV cache, stepped by one
    ragged forward at a time (``step``). Rows ``join`` and ``leave`` between steps; a finished
    row leaves by itself. ``on_token(row)`` is called whenever a row's episode grows by a token
    it wrote (and the block that token let in).

    Which rows the forward sees: a row fed nothing is in no matmul. Attention needs the fed
    rows' keys side by side: when the fed rows fill at least half of the slots from the first to
    the last of them, attention runs over that span of the cache as it lies (a row fed nothing
    in it costs one masked query); when they are sparser, over a copy of the fed rows' keys,
    cheaper then. Live rows are moved down into freed slots once those are a quarter of the
    span in use, so that the span stays dense (a rollout's finished rows, a server's departed
    sessions); a move copies one row's filled prefix."""

    def __init__(self, model, protocol: Protocol, *, slots: int, max_len: int, budget: int,
                 temperature: float, on_token: Callable[[_Row], None] | None = None):
        self.model, self.protocol, self.budget, self.temperature = model, protocol, budget, temperature
        self.cache = model.new_cache(slots, max_len)
        self.rows: list[_Row | None] = [None] * slots         # the row in each slot
        self.on_token = on_token
        self.fed: list[tuple[_Row, int]] = []     # rows fed by the last forward, their logits row
        self.logits: torch.Tensor | None = None
        self.tokens = 0                           # tokens computed since the start (a meter)

    @property
    def live(self) -> list[_Row]:
        return [row for row in self.rows if row is not None]

    @property
    def busy(self) -> bool:
        """Whether a step would do anything: a row to sample, or a row with a block to feed."""
        return bool(self.fed) or any(row.ready for row in self.live)

    def join(self, row: _Row, slot: int | None = None, like: _Row | None = None) -> None:
        """Give ``row`` a free slot (the lowest, or ``slot``). With ``like`` — a row of the same
        prompt fed by the last step — its cache row is copied instead of prefilled again, and
        the new row samples from the same logits (a group's G samples of one prompt)."""
        slot = self.rows.index(None) if slot is None else slot
        if self.rows[slot] is not None:
            raise ValueError(f"slot {slot} is taken")
        self.rows[slot], row.slot = row, slot
        self.cache.pos[slot] = 0
        if like is not None:
            n = int(self.cache.pos[like.slot])
            for buf in self.cache.buffers:
                buf[:, slot, :, :n] = buf[:, like.slot, :, :n]
            self.cache.pos[slot] = n
            row.advance()                         # its episode gets the prompt just copied
            self.fed.append((row, next(i for r, i in self.fed if r is like)))

    def leave(self, row: _Row) -> None:
        """Free the row's slot at once (a finished row, or a client that went away)."""
        if row.slot is not None:
            self.cache.pos[row.slot] = 0          # keeps the longest row of a span honest
            self.rows[row.slot], row.slot = None, None

    def compact(self) -> None:
        """Move the live rows down into the free slots below them, in slot order."""
        live, pos = self.live, self.cache.pos.tolist()
        for i, row in enumerate(live):
            if row.slot != i:
                for buf in self.cache.buffers:
                    buf[:, i, :, :pos[row.slot]] = buf[:, row.slot, :, :pos[row.slot]]
                self.rows[i], self.rows[row.slot] = row, None
        self.cache.pos[:len(live)] = torch.tensor([pos[row.slot] for row in live])
        self.cache.pos[len(live):] = 0
        for i, row in enumerate(live):
            row.slot = i

    @torch.no_grad()
    def step(self) -> int:
        """Sample a token for every row the last forward fed, then one ragged forward over the
        rows that have something to feed. Returns the number of tokens fed."""
        live = self.live
        if live and 4 * (live[-1].slot + 1 - len(live)) >= live[-1].slot + 1:
            self.compact()
            live = self.live
        feeds: dict[int, list[int]] = {}
        fed = [(row, i) for row, i in self.fed if row.slot is not None]     # still in the pool
        if fed:
            index = [i for _, i in fed]
            logits = self.logits if index == list(range(len(self.logits))) else self.logits[index]
            # one number a row from the row's own stream
            uniform = (torch.tensor([row.rng.random() for row, _ in fed])
                       if self.temperature > 0 else None)
            tokens, logps = sample(logits, self.temperature, uniform)
            for (row, _), tok, logp in zip(fed, tokens.tolist(), logps.tolist()):
                feeds[row.slot] = row.write(tok, logp, self.budget)
                if self.on_token is not None:
                    self.on_token(row)
                if row.done:
                    self.leave(row)
        for row in live:                          # new rows, and rows whose next chunk came
            if row.slot is not None and row.slot not in feeds:
                feeds[row.slot] = row.advance()
        slots = sorted(s for s, f in feeds.items() if f and self.rows[s] is not None)
        self.fed, self.logits = [], None
        if not slots:
            return 0
        if 2 * len(slots) >= slots[-1] - slots[0] + 1:         # dense: the span as it lies
            slots = list(range(slots[0], slots[-1] + 1))
        view = _Slots(self.cache, slots)
        self.logits = _forward(self.model, [feeds.get(s, []) for s in slots], view)
        if not view.adjacent:
            self.cache.pos[view.slots] = view.pos
        self.fed = [(self.rows[s], i) for i, s in enumerate(slots) if feeds.get(s)]
        n = sum(len(feeds.get(s, [])) for s in slots)
        self.tokens += n
        return n


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


# ---------------------------------------------------------------------------------------------
# The RL rollout: the engine with every chunk already there
# ---------------------------------------------------------------------------------------------

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
    list, so that a share of it samples as the whole would). ``on_token(episode)`` is called
    whenever a row's episode grows after its prompt.
    """
    B, G = len(problems), group_size
    rows = [_Row(protocol, problems[b], layout, random.Random(f"{seed}/{first + b}/{g}"))
            for b in range(B) for g in range(G)]
    longest = max(sum(len(ids) for ids, _ in row.blocks) for row in rows) + budget
    engine = Engine(model, protocol, slots=B * G, max_len=longest, budget=budget,
                    temperature=temperature,
                    on_token=None if on_token is None else lambda row: on_token(row.ep))
    for b in range(B):                            # prefill each prompt once ...
        engine.join(rows[b * G])
    engine.step()
    for b in range(B):                            # ... and copy it into its group's other rows
        for g in range(1, G):
            engine.join(rows[b * G + g], like=rows[b * G])
    while engine.fed:
        engine.step()
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
