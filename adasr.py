"""adasr.py — the AdaSR streaming protocol, in one place.

A problem arrives as a stream: the question, then one chunk (sentence) at a time. The model
*thinks while reading* — a short thought or a skip after each chunk — and after <EOI> reasons
and answers (docs/method.md §1):

    <instruction> Question: How many apples do you have at the end?<EOQ>     observation
    You have 5 apples.<EOS>                                                  observation, chunk 0
     You start with 5.<EOT>                                                  policy, stream, chunk 0
    It is a sunny day.<EOS> <EOT>                                            observation; a *skip*
    You buy 3 apples.<EOS> 5 + 3 = 8.<EOT>                                   chunk 2 and its thought
    <EOI> The answer is 8.<EOR> \\boxed{8}<EOA>                               end of input; deep phase

Owns: ``Problem``; the markers and the instruction; what a correct answer is (once, for rewards,
traces and programs); ``Episode``, THE record that flows rollout → rewards → hrpo → loss; and
``Protocol``: problem → observation blocks, gold episodes, parsing, the latency clock, traces.
It imports nothing of the project.

Design decisions
* [ours] One interleaved sequence and one KV cache for observations and policy tokens (not
  StreamingThinker's two): training then sees exactly the rollout's context, and the first PPO
  ratio is exactly 1. Read-then-think is the same machinery with a single observation block.
* The end of the stream is an observation (<EOI>); the model never guesses it.
* The clock (§2) runs as tokens are appended: chunk k arrives when its words have been spoken at
  ``wpm``; the model writes ``decode_tps`` tokens/s and starts on a chunk once it arrived and its
  previous thought is done; residual latency = last token − last arrival.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction


MARKERS = ["<EOQ>", "<EOS>", "<EOT>", "<EOI>", "<EOR>", "<EOA>"]
"""End of question, end of sentence (chunk), end of thought, end of input (the stream is over),
end of reasoning, end of answer. Added to every tokenizer as special tokens."""

STREAM, DEEP = 0, 1            # the phase of a token
LAYOUTS = ("stream", "read_then_think")
BUDGET = 160                   # policy tokens a rollout may write (T in the rewards)

INSTRUCTION = ("Read the problem as it arrives. After each sentence think briefly, or skip. "
               "When the input ends, reason and give the answer in \\boxed{}.")


@dataclass
class Problem:
    """One streaming problem: the question arrives first, then the chunks one at a time.

    The gold fields are None where the source does not know them: only the synthetic task knows
    which chunks matter (GSM8K's thoughts are built from its worked solutions, data.py).
    """

    id: str
    question: str  # the asking sentence; arrives first, before any chunk
    chunks: list[str]  # context sentences in arrival order (no marker tokens inside)
    answer: str  # reference answer as a plain string ("285", "0.5", "3/4")
    relevant: list[bool] | None = None  # per chunk: does it matter for the answer (when known)
    thoughts: list[str] | None = None  # gold streaming thought per chunk ("" = skip), when known
    deep: str | None = None  # gold deep reasoning of the streaming layout (text before <EOR>)
    rtt_deep: str | None = None  # gold read-then-think reasoning (all thinking after the stream)
    states: list[str] | None = None  # per chunk, the state a right stream carries past it (synthetic)

    @property
    def state(self) -> str | None:
        """What a right stream carries out: the state after the last chunk (when known)."""
        return self.states[-1] if self.states else None


# ---------------------------------------------------------------------------------------------
# Answers: extraction, normalisation, correctness
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
_ANSWER_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+(?:\.\d+)?)?")


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
    numbers = _ANSWER_NUMBER.findall(t)
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
# The episode
# ---------------------------------------------------------------------------------------------

@dataclass
class Parsed:
    """An episode read back through the protocol.

    thoughts:      per chunk, the streaming thought text ("" = skip; None = never reached).
    deep:          the deep reasoning text (before <EOR>).
    answer:        content of the boxed answer, or None.
    stream_errors / deep_errors: why each phase breaks the protocol (empty = valid).
    """
    thoughts: list[str | None]
    deep: str
    answer: str | None
    stream_errors: list[str]
    deep_errors: list[str]

    @property
    def valid(self) -> bool:
        return not self.stream_errors and not self.deep_errors

    @property
    def skips(self) -> list[bool]:
        return [t == "" for t in self.thoughts]


@dataclass
class Episode:
    """One trajectory, token by token — the record that flows rollout → rewards → hrpo → loss.

    Made by ``Protocol.episode`` (which sets the clock: ``arrivals``, the second at which each
    chunk has been spoken, and ``token_s``, the seconds the model takes per token) and grown with
    ``append``. Per token (all lists have the same length):
      tokens:   token id (prompt, observations and policy tokens in sequence order).
      is_policy: True where the model wrote the token (only these enter the loss).
      phase:    STREAM or DEEP (observations carry the phase in which they were fed).
      chunk:    chunk index; -1 for the prompt/question, K (= number of chunks) for <EOI> and the
                deep phase.
      logprobs: log-probability of the token under the sampling policy at its temperature
                (0.0 for observations and for gold tokens).
      times:    second at which the token arrived (observation) or was finished (policy token).
    Every count and latency below is therefore right at every moment. ``parsed`` is set once the
    episode is complete (``Protocol.finish``); ``correct`` needs it.
    """
    problem: Problem
    layout: str
    arrivals: list[float]
    token_s: float
    tokens: list[int] = field(default_factory=list)
    is_policy: list[bool] = field(default_factory=list)
    phase: list[int] = field(default_factory=list)
    chunk: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    truncated: bool = False
    parsed: Parsed | None = None
    _clock: float = field(default=0.0, init=False, repr=False)   # when the model is next free

    def append(self, ids: list[int], *, policy: bool, phase: int, chunk: int | list[int],
               logprobs: list[float] | None = None) -> None:
        """Append tokens that share ``policy`` and ``phase``; ``chunk`` is one index or one per id.

        The clock: an observation arrives when its chunk has been spoken (the question at 0,
        <EOI> and the deep phase with the last chunk), and the model cannot start before it; each
        policy token takes ``token_s`` seconds of the model's time."""
        chunks = chunk if isinstance(chunk, list) else [chunk] * len(ids)
        for c in chunks:
            if policy:
                self._clock += self.token_s
                self.times.append(self._clock)
            else:
                arrival = 0.0 if c < 0 else self.arrivals[min(c, len(self.arrivals) - 1)]
                self._clock = max(self._clock, arrival)
                self.times.append(arrival)
        self.tokens += ids
        self.is_policy += [policy] * len(ids)
        self.phase += [phase] * len(ids)
        self.chunk += chunks
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)

    def _count(self, phase: int | None = None, after: float | None = None) -> int:
        return sum(1 for p, ph, t in zip(self.is_policy, self.phase, self.times)
                   if p and (phase is None or ph == phase) and (after is None or t > after))

    @property
    def prompt_len(self) -> int:
        """Tokens of observation block 0, prefilled at once; the model's first token follows it."""
        return self.is_policy.index(True) if True in self.is_policy else len(self.tokens)

    @property
    def stream_tokens(self) -> int:
        return self._count(STREAM)

    @property
    def deep_tokens(self) -> int:
        return self._count(DEEP)

    @property
    def residual_tokens(self) -> int:
        """Policy tokens the user waits for: finished after the last chunk arrived."""
        return self._count(after=self.arrivals[-1])

    @property
    def spill_tokens(self) -> int:
        """Streaming tokens that spill past the last arrival (part of the residual)."""
        return self._count(STREAM, after=self.arrivals[-1])

    @property
    def residual_s(self) -> float:
        """Seconds between the last chunk's arrival and the model's last token."""
        return max(0.0, self.times[-1] - self.arrivals[-1]) if self.times else 0.0

    @property
    def correct(self) -> bool:
        """The one definition of a correct episode: it keeps the protocol and its boxed answer
        equals the reference. Needs the parse (``Protocol.finish``)."""
        if self.parsed is None:
            raise RuntimeError(f"episode of problem {self.problem.id} is not finished: "
                               "call Protocol.finish before asking whether it is correct")
        return self.parsed.valid and answers_match(self.parsed.answer, self.problem.answer)


# ---------------------------------------------------------------------------------------------
# The protocol
# ---------------------------------------------------------------------------------------------

class Protocol:
    """Token-level protocol for one tokenizer and one clock.

    ``tokenizer`` must already hold ``MARKERS`` as special tokens (``checkpoint.add_markers`` does it).
    ``wpm`` is the reading speed of the stream (words per minute, 150 as in the paper) and
    ``decode_tps`` the model's writing speed (tokens per second) of the simulated clock.
    """

    WPM = 150.0            # the defaults of the clock, for every program that offers the options
    DECODE_TPS = 20.0

    def __init__(self, tokenizer, wpm: float = WPM, decode_tps: float = DECODE_TPS):
        self.tok, self.wpm, self.decode_tps = tokenizer, wpm, decode_tps
        self.eoq, self.eos, self.eot, self.eoi, self.eor, self.eoa = \
            (tokenizer.token_id(m) for m in MARKERS)
        self.markers = {tokenizer.token_id(m): m for m in MARKERS}
        self.stop_ids = {self.eoa} | ({tokenizer.eos_id} if tokenizer.eos_id is not None else set())

    # -- from problem to tokens --------------------------------------------------------------
    def text(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def arrivals(self, problem: Problem) -> list[float]:
        """Second at which each chunk has been fully spoken: words so far / (wpm / 60).
        A problem without chunks (a one-sentence question) has its "last arrival" at 0."""
        words, out = 0, []
        for c in problem.chunks:
            words += len(c.split())
            out.append(words * 60.0 / self.wpm)
        return out or [0.0]

    def episode(self, problem: Problem, layout: str) -> Episode:
        """An empty episode of ``problem`` with this protocol's clock."""
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        return Episode(problem, layout, self.arrivals(problem), 1.0 / self.decode_tps)

    def blocks(self, problem: Problem, layout: str) -> list[tuple[list[int], list[int]]]:
        """The observation blocks of a problem: a list of (token ids, chunk index per token).

        After every block but the last the model writes one streaming thought; after the last it
        writes the deep phase. Block 0 is identical for all samples of a problem (the rollout
        prefills it once and copies it into the group).
        """
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        prompt = self.tok.encode(f"{INSTRUCTION}\nQuestion: {problem.question}") + [self.eoq]
        # A leading space, as inside the question, so "Tom" is the same token in both places.
        chunks = [self.tok.encode(f" {c}") + [self.eos] for c in problem.chunks]
        K = len(chunks)
        labelled = [(ids, [k] * len(ids)) for k, ids in enumerate(chunks)] + [([self.eoi], [K])]
        head = (prompt, [-1] * len(prompt))
        if layout == "read_then_think":
            labelled = [head] + labelled
            return [(sum((ids for ids, _ in labelled), []), sum((c for _, c in labelled), []))]
        first = (head[0] + labelled[0][0], head[1] + labelled[0][1])
        return [first] + labelled[1:]

    def thought_ids(self, text: str) -> list[int]:
        """A streaming thought as the model writes it: text then <EOT>; "" is the skip."""
        return (self.tok.encode(" " + text.strip()) if text.strip() else []) + [self.eot]

    def deep_ids(self, reasoning: str, answer: str) -> list[int]:
        """The deep phase as the model writes it: reasoning <EOR> \\boxed{answer}<EOA>."""
        return (self.tok.encode(" " + reasoning.strip()) + [self.eor]
                + self.tok.encode(f" \\boxed{{{answer}}}") + [self.eoa])

    def gold(self, problem: Problem, layout: str) -> Episode:
        """The gold trajectory of a problem in a layout (for SFT), finished (parsed).

        Streaming layout: the record's thoughts (a skip for each chunk when it has none) and deep
        reasoning. Read-then-think: all thinking (``rtt_deep``) after the stream.
        """
        reasoning = problem.deep if layout == "stream" else problem.rtt_deep
        if reasoning is None:
            raise ValueError(f"problem {problem.id}: no gold {'deep' if layout == 'stream' else 'rtt_deep'}"
                             f" reasoning for the {layout} layout")
        ep = self.episode(problem, layout)
        blocks = self.blocks(problem, layout)
        thoughts = problem.thoughts or [""] * len(problem.chunks)
        for j, (ids, chunks) in enumerate(blocks):
            ep.append(ids, policy=False, phase=STREAM if j < len(blocks) - 1 else DEEP,
                      chunk=chunks)
            if j < len(blocks) - 1:
                ep.append(self.thought_ids(thoughts[j]), policy=True, phase=STREAM, chunk=j)
        ep.append(self.deep_ids(reasoning, problem.answer), policy=True, phase=DEEP,
                  chunk=len(problem.chunks))
        return self.finish(ep)

    # -- from tokens back to meaning ----------------------------------------------------------
    def finish(self, ep: Episode) -> Episode:
        """Parse a complete episode (in place); returns it for chaining."""
        ep.parsed = self.parse(ep)
        return ep

    def parse(self, ep: Episode) -> Parsed:
        """Read an episode back into per-chunk thoughts, skips, deep reasoning and answer, and
        list every way in which it breaks the protocol (per phase, for the phase rewards)."""
        K = len(ep.problem.chunks)
        per_chunk: list[list[int]] = [[] for _ in range(K)]
        deep: list[int] = []
        for tok, pol, ph, ch in zip(ep.tokens, ep.is_policy, ep.phase, ep.chunk):
            if pol:
                (per_chunk[ch] if ph == STREAM else deep).append(tok)
        stream_errors, deep_errors = [], []
        # Read-then-think writes no streaming thought: every chunk counts as skipped.
        thoughts: list[str | None] = [] if ep.layout == "stream" else [""] * K
        for k, ids in enumerate(per_chunk if ep.layout == "stream" else []):
            if not ids or ids[-1] != self.eot:
                stream_errors.append(f"chunk {k}: thought " +
                                     ("never written" if not ids else "does not end with <EOT>"))
                thoughts.append(None)
                continue
            stray = [self.markers[t] for t in ids[:-1] if t in self.markers]
            if stray:
                stream_errors.append(f"chunk {k}: marker {stray[0]} inside the thought")
            thoughts.append(self.text(ids[:-1]).strip())
        if ep.truncated:
            (deep_errors if deep or ep.layout != "stream" else stream_errors).append(
                "truncated at the token budget")
        answer, reasoning = None, ""
        if not deep:
            deep_errors.append("no deep phase")
        else:
            if deep[-1] != self.eoa:
                deep_errors.append("does not end with <EOA>")
            body = deep[:-1] if deep[-1] in self.stop_ids else deep
            n_eor = body.count(self.eor)
            if n_eor != 1:
                deep_errors.append(f"{n_eor} <EOR> markers (expected 1)")
            cut = body.index(self.eor) if n_eor else len(body)
            stray = [self.markers[t] for t in body if t in self.markers and t != self.eor]
            if stray:
                deep_errors.append(f"marker {stray[0]} inside the deep phase")
            reasoning = self.text(body[:cut]).strip()
            answer_text = self.text(body[cut + 1:]) if n_eor else ""
            n_box = len(boxed_contents(answer_text))
            if n_box != 1:
                deep_errors.append(f"{n_box} boxed answers after <EOR> (expected 1)")
            answer = extract_answer(answer_text)
        return Parsed(thoughts, reasoning, answer, stream_errors, deep_errors)

    # -- showing an episode --------------------------------------------------------------------
    def chunk_line(self, problem: Problem, k: int) -> str:
        return f"[{self.arrivals(problem)[k]:6.1f}s] {problem.chunks[k]}"

    @staticmethod
    def thought_line(thought: str | None) -> str:
        return ("          (skip)" if thought == "" else
                "          (never reached)" if thought is None else f"          💭 {thought}")

    def ending_lines(self, ep: Episode) -> list[str]:
        """End of input, deep reasoning, answer and verdict of a finished episode."""
        p, ref = ep.parsed, ep.problem.answer
        verdict = "" if not ref else ("  ✓ correct" if ep.correct else f"  ✗ (reference {ref})")
        end = f"[{ep.arrivals[-1]:6.1f}s] <end of input>" if self.eoi in ep.tokens else \
            "          (stopped before the end of the input)"
        return [end,
                f"          🧠 {p.deep}",
                f"          answer: {p.answer}{verdict}",
                f"          residual latency {ep.residual_s:.2f}s ({ep.residual_tokens} tokens); "
                f"stream {ep.stream_tokens} / deep {ep.deep_tokens} tokens"
                + ("" if p.valid else f"; format errors: {'; '.join(p.stream_errors + p.deep_errors)}")]

    def render(self, ep: Episode) -> str:
        """A finished episode as a readable trace: each chunk with its arrival time and the
        thought or skip it triggered, then the deep reasoning, the answer and the latency."""
        lines = [f"Question: {ep.problem.question}"]
        for k in range(len(ep.problem.chunks)):
            lines.append(self.chunk_line(ep.problem, k))
            if ep.layout == "stream":
                lines.append(self.thought_line(ep.parsed.thoughts[k]))
        return "\n".join(lines + self.ending_lines(ep))


if __name__ == "__main__":      # a library: say where the programs are rather than do nothing
    import sys
    print("error: adasr.py is the protocol library, not a program; stream a problem with "
          "python live.py --model DIR --problem TEXT, train with python train.py", file=sys.stderr)
    sys.exit(2)
