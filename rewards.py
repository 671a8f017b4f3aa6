"""rewards.py — the reward functions of AdaSR: pure functions over a finished Episode.

What this file owns
-------------------
* Answer extraction: the content of ``\\boxed{...}`` (or StreamingThinker's ``\\box{...}``), with
  nested braces, and a normalisation that makes "1,000", "$1000", "1000.0" and "1000" equal.
* The three rewards of the paper — format, accuracy, adaptive thinking — with our formulas
  (method.md §3), the global reward R and the two phase rewards R^s, R^d that HRPO normalises
  separately.

Design decisions
----------------
* Rewards read only the Episode (tokens, parse, clock), never the model: what the rollout recorded
  is all the evidence there is, so the same functions score rollouts, gold trajectories and the
  evaluation table.
* Costs are measured in *tokens* divided by the generation budget T, not in seconds, so rewards do
  not change scale when ``--wpm`` or ``--decode-tps`` change; the seconds appear in the metrics.
* The adaptive reward is asymmetric on purpose: a streaming token that is written while the user
  is still talking costs only ``beta``; a token the user waits for (written after the last chunk
  arrived) costs ``alpha`` (≫ beta). That asymmetry is what teaches "think early, skip what does
  not matter, keep the final deliberation short".
* [ours] The phase rewards charge each phase for its own latency: R^s pays for the streaming
  tokens that spill past the last arrival, R^d for the deep tokens; spill + deep = residual, so
  neither phase is blamed for the other's waiting time.
* [ours] Both phase rewards carry the accuracy. method.md's R^s counts only format and tokens;
  group normalisation then turns any difference in streaming length into a full-size advantage,
  blind to *which* thoughts were dropped, and on one of our three seeds HRPO learned to skip the
  chunks that matter (accuracy 0.985 → 0.15). The streaming phase builds the state the answer is
  read from, so it shares the answer's credit.

This module imports nothing from the project (it is the leaf of the import graph), so data.py can
reuse the answer extraction for reference answers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for type hints: rewards.py stays a leaf module
    from adasr import Episode

# ---------------------------------------------------------------------------------------------
# Answer extraction and normalisation
# ---------------------------------------------------------------------------------------------

_BOX = re.compile(r"\\box(?:ed)?\s*\{")


def boxed_contents(text: str) -> list[str]:
    r"""Contents of every ``\boxed{...}`` / ``\box{...}`` in ``text``, braces balanced.

    A box whose braces never close is ignored (it is not an answer).
    >>> boxed_contents(r"so \boxed{\frac{1}{2}} and \box{3}")
    ['\\frac{1}{2}', '3']
    """
    out = []
    for m in _BOX.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end(): i - 1])
    return out


def extract_answer(text: str) -> str | None:
    """The last boxed answer in ``text`` (models restate; the last one is the final word)."""
    boxes = boxed_contents(text)
    return boxes[-1].strip() if boxes else None


_FRAC = re.compile(r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+(?:\.\d+)?)?")


def normalize_answer(s: str) -> str:
    """Canonical string form of an answer, so that equal answers compare equal as strings.

    Removes ``$``, ``%``, ``\\text{..}`` wrappers, thousands commas and surrounding words; a lone
    number (integer, decimal or simple fraction, LaTeX ``\\frac`` included) becomes its exact
    reduced value: "1,000.0" → "1000", "3/6" → "1/2", "\\frac{2}{4}" → "1/2", "$5 apples" → "5".
    Text that holds no single number is compared lower-cased with spaces squeezed.
    """
    t = s.strip()
    t = re.sub(r"\\text\{([^{}]*)\}", r"\1", t)
    t = _FRAC.sub(r"\1/\2", t)
    t = t.replace("$", "").replace("%", "").replace("\\!", "")
    t = re.sub(r"(?<=\d),(?=\d{3}\b)", "", t)          # 1,000 -> 1000 (not "1, 2")
    numbers = _NUMBER.findall(t)
    if len(numbers) == 1:
        num, _, den = numbers[0].partition("/")
        try:
            value = Fraction(num) / Fraction(den) if den else Fraction(num)
        except ZeroDivisionError:
            return numbers[0]
        return str(value)                                 # Fraction prints "5", "1/2", "-7/4"
    return " ".join(t.lower().split()).rstrip(".")


def answers_match(predicted: str | None, reference: str) -> bool:
    """True when the predicted answer equals the reference after normalisation."""
    return predicted is not None and normalize_answer(predicted) == normalize_answer(reference)


# ---------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RewardConfig:
    """Weights of the adaptive-thinking reward (method.md §3).

    alpha:  cost of a token the user waits for (written after the last chunk arrived), per budget.
    beta:   cost of a streaming token written while input is still arriving, per budget.
    budget: T, the generation budget in policy tokens; costs are token counts divided by T.
    """
    alpha: float = 0.3
    beta: float = 0.05
    budget: int = 256


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


def score(ep: Episode, cfg: RewardConfig) -> Rewards:
    """Score one finished episode (parsed and clocked by ``adasr.Protocol.finish``).

    r_fmt = 0 if the protocol is valid else -1
    r_acc = 1 if valid and the boxed answer equals the reference else 0
    r_ada = -alpha * residual_tokens / T - beta * stream_tokens / T
    R     = r_acc + r_fmt + r_ada
    R^s   = r_acc + (0 if streaming phase valid else -1) - beta * stream_tokens / T
            - alpha * spill / T
    R^d   = r_acc + (0 if deep phase valid else -1) - alpha * deep_tokens / T
    """
    p, T = ep.parsed, cfg.budget
    fmt = 0.0 if p.valid else -1.0
    acc = 1.0 if p.valid and answers_match(p.answer, ep.problem.answer) else 0.0
    ada = -cfg.alpha * ep.residual_tokens / T - cfg.beta * ep.stream_tokens / T
    stream = acc + (0.0 if not p.stream_errors else -1.0) \
        - cfg.beta * ep.stream_tokens / T - cfg.alpha * ep.spill_tokens / T
    deep = acc + (0.0 if not p.deep_errors else -1.0) - cfg.alpha * ep.deep_tokens / T
    return Rewards(fmt=fmt, acc=acc, ada=ada, total=acc + fmt + ada, stream=stream, deep=deep)


def summarize(episodes: list[Episode], rewards: list[Rewards]) -> dict[str, float]:
    """Averages over episodes: the columns of the evaluation table (method.md §6) and the reward
    terms. ``skip_rate_irrelevant`` counts skipped chunks among those known not to matter
    (read-then-think skips every chunk by construction); NaN when relevance is unknown."""
    n = len(episodes)
    irrelevant = [skip for ep in episodes if ep.problem.relevant is not None
                  for skip, rel in zip(ep.parsed.skips, ep.problem.relevant) if not rel]
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
