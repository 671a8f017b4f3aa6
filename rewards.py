"""rewards.py — the rewards of AdaSR: pure functions of a finished Episode (docs/method.md §3).

Format, accuracy and adaptive thinking make the global reward R; HRPO's phase rewards R^s and R^d
and, for the per-chunk credit, a reward per streaming unit, are normalised separately (hrpo.py).

Design decisions
* Rewards read only the Episode (tokens, parse, clock), never the model, so the same functions
  score rollouts, gold trajectories and the evaluation.
* Costs are tokens divided by the budget T, not seconds: rewards keep their scale whatever
  --wpm or --decode-tps; a token the user waits for costs ``alpha`` ≫ ``beta``, the cost of one
  written while the input still arrives ("think early, keep the final deliberation short").
* [ours] Each phase pays for the latency it causes: R^s for its tokens that spill past the last
  arrival, R^d for the deep tokens (the paper's notes charge all residual tokens to R^d, which
  blames the deep phase for the stream's overrun). Their sum is the residual either way.
* [ours] Both phase rewards carry the accuracy: with R^s of format and length alone, group
  normalisation made any length difference a full advantage and HRPO learned to skip the chunks
  that matter (docs/results.md). ``stream_credit="state"`` gives R^s the carried state's
  correctness instead (synthetic tasks): the separation HRPO is meant to make.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from adasr import BUDGET, STREAM, Episode

# ---------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RewardConfig:
    """Weights of the adaptive-thinking reward (docs/method.md §3).

    alpha:  cost of a token the user waits for (written after the last chunk arrived), per budget.
    beta:   cost of a streaming token written while input is still arriving, per budget.
    budget: T, the generation budget in policy tokens; costs are token counts divided by T.
    stream_credit: what R^s counts as success: "answer" (r_acc) or "state" (``state_right``).
    terms: which rewards count: "all" (the paper's), "acc+fmt" or "acc" (its reward ablation).
    """
    alpha: float = 0.3
    beta: float = 0.05
    budget: int = BUDGET
    stream_credit: str = "answer"
    terms: str = "all"


STREAM_CREDITS = ("answer", "state")
REWARD_TERMS = ("all", "acc+fmt", "acc")
_INTEGER = re.compile(r"-?\d+")


def last_number(text: str) -> int | None:
    found = _INTEGER.findall(text)
    return int(found[-1]) if found else None


def state_right(ep: Episode) -> bool:
    """Whether the stream carried the right state out of a finished episode: the last number of
    its streaming thoughts equals the problem's ``state`` (synthetic tasks: the tracked count
    when the stream ends, as in "18 - 5 = 13." or "No change, still 13.")."""
    written = " ".join(t for t in ep.parsed.thoughts if t)
    return ep.problem.state is not None and last_number(written) == int(ep.problem.state)


@dataclass(frozen=True)
class Rewards:
    """All rewards of one episode. ``total`` is the global R; ``stream`` and ``deep`` are HRPO's
    phase rewards R^s and R^d."""
    fmt: float
    acc: float
    ada: float
    total: float
    stream: float
    deep: float
    chunks: list[float] | None = None      # per streaming unit (chunk_rewards); synthetic tasks


def score(ep: Episode, cfg: RewardConfig) -> Rewards:
    """Score one finished episode (parsed and clocked by ``adasr.Protocol.finish``).

    r_fmt = 0 if the protocol is valid else -1
    r_acc = 1 if valid and the boxed answer equals the reference else 0
    r_ada = -alpha * residual_tokens / T - beta * stream_tokens / T
    R     = r_acc + r_fmt + r_ada
    R^s   = r_acc + (0 if streaming phase valid else -1) - beta * stream_tokens / T
            - alpha * spill / T          (r_state instead of r_acc with stream_credit "state")
    R^d   = r_acc + (0 if deep phase valid else -1) - alpha * deep_tokens / T

    With ``terms`` "acc+fmt" the token costs are left out of R, R^s and R^d; with "acc" the
    validity terms too (the paper's reward ablation).
    """
    p, T = ep.parsed, cfg.budget
    fmt_on, ada_on = cfg.terms != "acc", cfg.terms == "all"
    fmt = -1.0 if fmt_on and not p.valid else 0.0
    acc = 1.0 if ep.correct else 0.0
    ada = -cfg.alpha * ep.residual_tokens / T - cfg.beta * ep.stream_tokens / T if ada_on else 0.0
    credit = acc if cfg.stream_credit == "answer" else float(p.valid and state_right(ep))
    stream = credit - float(fmt_on and bool(p.stream_errors)) \
        - ada_on * (cfg.beta * ep.stream_tokens / T + cfg.alpha * ep.spill_tokens / T)
    deep = acc - float(fmt_on and bool(p.deep_errors)) - ada_on * cfg.alpha * ep.deep_tokens / T
    units = chunk_rewards(ep, cfg) if ep.problem.relevant and ep.problem.states else None
    return Rewards(fmt=fmt, acc=acc, ada=ada, total=acc + fmt + ada, stream=stream, deep=deep,
                   chunks=units)


def chunk_rewards(ep: Episode, cfg: RewardConfig) -> list[float]:
    """[ours] A reward per streaming unit k (the thought, or skip, after chunk k), from what a
    synthetic task knows — which chunks matter and the count the gold thoughts carry:

        r_k = tracked_k + (skipped_k if chunk k does not matter) − beta·n_k/T − alpha·spill_k/T

    tracked_k: the last number written in thoughts 0..k equals the problem's state after chunk
    k (``Problem.states``: the stream carried the right count past it); n_k: the unit's tokens; spill_k: those
    finished after the last arrival. With ``terms`` other than "all" only tracked_k counts.
    A unit the rollout never reached gets the reward of writing nothing right (0)."""
    p, T = ep.parsed, cfg.budget
    written = []
    counts = [[0, 0] for _ in ep.problem.chunks]          # per unit: tokens, spilled tokens
    for pol, ph, k, t in zip(ep.is_policy, ep.phase, ep.chunk, ep.times):
        if pol and ph == STREAM:
            counts[k][0] += 1
            counts[k][1] += t > ep.arrivals[-1]
    out = []
    for k, thought in enumerate(p.thoughts):
        if thought is None:
            out.append(0.0)
            continue
        written.append(thought)
        r = float(last_number(" ".join(written)) == int(ep.problem.states[k]))
        if cfg.terms == "all":
            r += float(thought == "" and not ep.problem.relevant[k])
            r -= cfg.beta * counts[k][0] / T + cfg.alpha * counts[k][1] / T
        out.append(r)
    return out


def summarize(episodes: list[Episode], rewards: list[Rewards]) -> dict[str, float]:
    """Averages over episodes: the columns of the evaluation table (docs/method.md §6) and the reward
    terms. ``skip_rate_irrelevant`` counts skipped chunks among those known not to matter
    (read-then-think skips every chunk by construction), ``skip_rate_relevant`` among those
    that matter (streaming layout), ``state_accuracy`` the share of valid streams that carried
    the right state out; NaN where relevance or the state is unknown."""
    n = len(episodes)
    irrelevant = [skip for ep in episodes if ep.problem.relevant is not None
                  for skip, rel in zip(ep.parsed.skips, ep.problem.relevant) if not rel]
    relevant = [skip for ep in episodes if ep.problem.relevant is not None and ep.layout == "stream"
                for skip, rel in zip(ep.parsed.skips, ep.problem.relevant) if rel]
    known = [ep for ep in episodes if ep.problem.state is not None and ep.layout == "stream"]
    all_chunks = [skip for ep in episodes for skip in ep.parsed.skips]

    def mean(xs):
        xs = list(xs)
        return sum(xs) / len(xs) if xs else float("nan")
    return {
        "accuracy": mean(r.acc for r in rewards),
        "format_rate": mean(ep.parsed.valid for ep in episodes),
        "stream_tokens": mean(ep.stream_tokens for ep in episodes),
        "deep_tokens": mean(ep.deep_tokens for ep in episodes),
        "total_tokens": mean(ep.stream_tokens + ep.deep_tokens for ep in episodes),
        "residual_tokens": mean(ep.residual_tokens for ep in episodes),
        "residual_latency_s": mean(ep.residual_s for ep in episodes),
        "skip_rate_irrelevant": mean(irrelevant),
        "skip_rate_relevant": mean(relevant),
        "state_accuracy": mean(ep.parsed.valid and state_right(ep) for ep in known),
        "skip_rate": mean(all_chunks),
        "truncation_rate": mean(ep.truncated for ep in episodes),
        "reward": mean(r.total for r in rewards),
        "r_fmt": mean(r.fmt for r in rewards),
        "r_acc": mean(r.acc for r in rewards),
        "r_ada": mean(r.ada for r in rewards),
        "r_stream": mean(r.stream for r in rewards),
        "r_deep": mean(r.deep for r in rewards),
        "n": n,
    }
