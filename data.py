"""Problems for streaming reasoning: the file loaders and the synthetic task (the Problem record
itself is the protocol's, in adasr.py).

This file owns *what* the model reads and what the gold trajectories say. How a problem becomes a
token sequence (marker tokens, the interleaved stream, the read-then-think layout) belongs to
adasr.py, so no marker token (<EOQ>, <EOS>, <EOT>, <EOR>, <EOA>, ...) ever appears inside a
Problem's text: loaders split on the markers and check that none is left.

Three sources, one record (method.md section 7):
- StreamingThinker / StreamingCoT JSON: context sentences, gold streaming thoughts, gold deep
  reasoning. load_streamingthinker.
- GSM8K JSON lines: real word problems with worked solutions but no per-sentence thoughts.
  The question text is split into sentences; the asking sentence arrives first, the others stream
  in as chunks. The streaming gold is built from the worked solution (below). load_gsm8k.
- A synthetic counting task generated from a seed, small and regular enough for a ~1M-parameter
  model trained on a CPU in minutes, with chunks that matter and chunks that do not, so that
  skipping can be learned and measured. make_synthetic, synthetic_splits.
load_problems recognises the file format by content and dispatches.

Design decisions [ours]:
- The question arrives first, before any chunk (StreamingThinker's order), and the model thinks
  only after chunks: our protocol has no thought on the question, so StreamingThinker's thought on
  the question (the one ending <EOQ>) is dropped.
- Bad input raises DataError naming the file, the line (JSON lines, counted from 1) or the record
  (JSON list, indexed from 0) and the field. Loaders are strict; with skip_bad=True they skip bad
  records and warn "skipped K of N records in FILE: first error ...", never silently.
- The synthetic gold trajectories think on every chunk and recap everything in the deep phase
  (StreamingThinker style, method.md section 5), except that a share `terse` of independent
  decisions is written tersely (skip an irrelevant chunk, answer without a recap). Sampling from
  the SFT model then already shows the behaviours RL is meant to reward; RL re-weights behaviours
  it sees, it cannot invent them in a few hundred CPU steps.
- Everything random uses its own random.Random seeded by a string, never the global RNG, so a
  seed gives the same problems on every machine and Python run.

Streaming gold from worked solutions [ours] (method.md section 7)
------------------------------------------------------------------
StreamingThinker writes its streaming thoughts with a teacher LLM. A GSM8K solution already has
them, in the wrong place: each line of it is a step that uses some numbers, and the stream tells
when each number arrives. align_steps moves every step to the earliest chunk after which all the
numbers it uses are known:
- known from the start: the numbers of the question sentence (it arrives first) and a short
  table of world constants (WORLD_CONSTANTS: 0, 1, 7, 10, 12, 24, 52, 60, 100, 365, 1000, each
  with its reason, and their reciprocals), unless a chunk states that number, in which case it is
  the problem's own and the step waits for that chunk;
- known after chunk k: the numbers said in chunks 0..k, in digits ("$1,200.50", ".5", "3/4",
  "20%", "20 percent") or in words ("twenty-five", "two hundred and five", "one and a half",
  "half" = 2 or 1/2, "two thirds", "a quarter", "third".."tenth", "twice"/"double"/"pair" = 2,
  "triple"/"thrice" = 3, "dozen" = 12); a fraction or percentage counts under each reading;
- the results of earlier steps, from the chunk of the step that computed them.
What a step uses: the operands of its calculator annotations (<<48/2=24>>: 48 and 2) and every
number its text says, in digits or words, except its own results (the annotation results and
the numbers right after "=" that end an expression). Numbers are compared by value as exact
Fractions (0.50 == .5 == 1/2); a numeral with 2 or more decimals also matches a known value that
it rounds or cuts (0.33 for 1/3).
Rules: steps keep their order; the steps at one chunk join into its thought (annotations
removed, whitespace normalised), a chunk without a step is a skip (""); the first step that uses
a number never known goes to the deep phase with every step after it (the conservative choice:
causality holds even when a number was said in a form the parser does not read); the deep
reasoning is what is left, then "The answer is N."; read-then-think gets every step, then
"The answer is N.". No thought uses a number before it arrives (causality_errors checks it).
`python data.py FILE...` reports how much of each file streams and checks every gold episode.
Limits: numbers are matched by value, so a value that two quantities share (5 blocks tall, 5
blocks shorter) is known when the first is said; a step that needs unstated world knowledge
(a car has 4 wheels, a month has 30 days) goes to the deep phase with all that follows.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import re
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

from adasr import MARKERS, Problem, Protocol, extract_answer
from model import ArgumentParser, UserError, run_cli, train_bpe


class DataError(UserError):
    """Bad input data. The message says where (FILE:LINE or FILE: record I) and which field."""


# ---------------------------------------------------------------------------------------------
# Sentences

# Words whose period does not end a sentence ("Mr. Smith"). Deliberately short: a missed split
# only makes one chunk longer, a wrong split cuts a sentence in two.
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "mt", "vs"}
# Sentence-ending punctuation, optional closing quotes or brackets, then the single space left
# after whitespace is collapsed. "3.5" and "$1.50" never match: no space follows their period.
_BOUNDARY = re.compile(r"[.?!]+[\"')\]]* ")
# First words of a sentence that asks even without a "?" ("Find the total cost.").
_ASKING_WORDS = {"how", "what", "which", "who", "whom", "whose", "why",
                 "find", "calculate", "compute", "determine"}


def split_sentences(text: str) -> list[str]:
    """Split text into sentences, keeping their punctuation; whitespace runs become one space.

    A sentence ends at ".", "?" or "!" followed by a space, except after an abbreviation
    ("Mr.", "Dr.", "St.") and when the next word starts in lower case ("5 p.m. and then"), which
    does not begin a new sentence.
    """
    text = " ".join(text.split())
    sentences, start = [], 0
    for m in _BOUNDARY.finditer(text):
        next_char = text[m.end()]  # the collapsed text never ends with a space
        word = text[start:m.start()].rsplit(" ", 1)[-1].lstrip("\"'([").lower()
        if next_char.islower() or (text[m.start()] == "." and word in _ABBREVIATIONS):
            continue
        sentences.append(text[start:m.end() - 1])
        start = m.end()
    if start < len(text):
        sentences.append(text[start:])
    return sentences


def _asks(sentence: str) -> bool:
    """Whether a sentence asks: it ends with "?" or starts with an asking word."""
    first_word = sentence.split(" ", 1)[0].strip(",").lower()
    return sentence.rstrip("\"')]").endswith("?") or first_word in _ASKING_WORDS


def split_question(text: str) -> tuple[str, list[str]]:
    """Split a word problem into (question, chunks).

    The last sentence that asks becomes the question (it arrives first); the other sentences,
    in their order, become the chunks. If no sentence asks, the last sentence is the question.
    """
    sentences = split_sentences(text)
    if not sentences:
        raise DataError("the text has no sentences")
    asking = [i for i, s in enumerate(sentences) if _asks(s)]
    q = asking[-1] if asking else len(sentences) - 1
    return sentences[q], sentences[:q] + sentences[q + 1:]


# ---------------------------------------------------------------------------------------------
# Streaming gold from worked solutions (GSM8K)
#
# A worked solution says which numbers each step uses; the stream says when each number
# arrives. align_steps places every step right after the earliest chunk at which all of its
# numbers are known. Numbers are compared as exact Fractions, by value: "0.50", ".5", "1/2" and
# "half" all say 1/2.

# A numeral in digits: thousands commas ("1,200", never the list "1, 2"), decimals ("3.5", ".5").
# Signs are not read: "-" is a hyphen ("3-page") or a minus far more often than a sign, and the
# question is only whether a number was heard.
_DIGITS = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
# A numeral, maybe the fraction "a/b", maybe the percentage "20%" or "20 percent".
_NUMERAL = re.compile(rf"(?<![\d.])(?P<a>{_DIGITS})(?:\s*/\s*(?P<b>{_DIGITS}))?"
                      r"(?P<percent>\s*%|\s*percent\b)?", re.IGNORECASE)
# A result: the number right after "=" that ends the expression: "= $24 clips", the 40 of
# "= 4*10 = 40" (its 4 is an operand), not the 8 of "= 8S" (a coefficient).
_RESULT = re.compile(rf"=\s*-?\s*\$?\s*(?P<n>{_DIGITS})(?P<percent>\s*%)?"
                     r"(?![\d.,]*\d|\s*[-+*/×÷^(]|\s*x\s*[\d(]|[A-Za-z]\b)")
# GSM8K calculator annotations, "<<48/2=24>>": the operands left of "=", the result right of it.
_CALCULATOR = re.compile(r"<<(?P<lhs>[^>=]*)(?:=(?P<rhs>[^>]*))?>>")

# Number words. A run of cardinal words is one number: "twenty-five", "two hundred and five".
_CARDINALS = {w: n for n, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen".split())}
_CARDINALS |= {w: 10 * n for n, w in enumerate(
    "twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)}
_SCALES = {"hundred": 100, "thousand": 1000, "million": 10**6}
# Parts, read both ways: "half" says 2 and 1/2 (one solution writes "48/2", another "48*0.5"),
# "a quarter" 4 and 1/4, "two thirds" 2, 3 and 2/3. As ordinals they still say their number
# ("the third day": 3). "first" and "second" are left out: they order things, and a second is a
# unit of time, far more often than they count.
_PARTS = {"half": 2, "halves": 2, "third": 3, "thirds": 3, "quarter": 4, "quarters": 4,
          "fourth": 4, "fourths": 4, "fifth": 5, "fifths": 5, "sixth": 6, "sixths": 6,
          "seventh": 7, "sevenths": 7, "eighth": 8, "eighths": 8, "ninth": 9, "ninths": 9,
          "tenth": 10, "tenths": 10}
# Words that say a multiple or a count without any digit.
_MULTIPLES = {"twice": 2, "double": 2, "doubled": 2, "doubles": 2, "pair": 2, "pairs": 2,
              "couple": 2, "triple": 3, "tripled": 3, "triples": 3, "thrice": 3,
              "quadruple": 4, "quadrupled": 4, "dozen": 12, "dozens": 12}

WORLD_CONSTANTS: dict[Fraction, str] = {Fraction(n): why for n, why in [
    (0, "nothing: the day it did not rain, the day he rested"),
    (1, "one whole: 1 - 0.2 of a price, 1/2 of a group, one more or one less"),
    (7, "days in a week"),
    (10, "the decimal base: tenths, tens"),
    (12, "months in a year, inches in a foot"),
    (24, "hours in a day"),
    (52, "weeks in a year"),
    (60, "minutes in an hour, seconds in a minute"),
    (100, "per cent, cents in a dollar, centimetres in a metre"),
    (365, "days in a year"),
    (1000, "grams in a kilogram, metres in a kilometre, millilitres in a litre"),
]}
"""Numbers a solution may use without the problem saying them, each with its reason, and with
its reciprocal (the calculator writes 20% as "20*.01"). Deliberately small: a constant lets a
step that uses it go before the chunk that says it, so for a problem whose chunks state the
number (in digits or words) it is no constant, and the step waits for that chunk. Measured on
GSM8K train (share of solution steps that stream: 86.3% with all of them), 1 matters most
(82.4% without it), then 60 (84.4%), 7 (84.7%) and 12 (85.1%). 2 is no constant: "half",
"twice", "double" and "pair" say it where a problem means it."""


# Each constant with its reciprocal: the calculator writes 20% as "20*.01".
_CONSTANT_VALUES = {c: {c, 1 / c} if c else {c} for c in WORLD_CONSTANTS}


@dataclass(frozen=True)
class Numeral:
    """A number as written: its exact value and the count of decimals it was written with (a
    solution that writes 0.33 for a known 1/3 has rounded it; see _matches)."""

    value: Fraction
    decimals: int = 0


@dataclass(frozen=True)
class Use:
    """One number that a sentence says or a step uses, with its readings: it is known when every
    numeral of one reading is known. "20%" reads as 20 or as 0.2, "1/2" as the pair 1 and 2 or
    as 0.5, "half" as 2 or as 0.5, "two thirds" as 2/3 or as the pair 2 and 3."""

    readings: tuple[tuple[Numeral, ...], ...]

    @property
    def values(self) -> set[Fraction]:
        return {n.value for reading in self.readings for n in reading}


@functools.lru_cache(maxsize=1 << 14)  # Fraction("...") is slow, and numerals repeat a lot
def _numeral(digits: str) -> Numeral:
    """The Numeral of a digit string such as "1,200.50" or ".5"."""
    digits = digits.replace(",", "")
    return Numeral(Fraction(digits), len(digits.partition(".")[2]))


def _reading(*values: Fraction | int) -> tuple[Numeral, ...]:
    return tuple(Numeral(Fraction(v)) for v in values)


def _digit_uses(text: str) -> list[Use]:
    """The numbers a text writes in digits, in order."""
    uses = []
    for m in _NUMERAL.finditer(text):
        a = _numeral(m["a"])
        if m["b"] is not None:
            b = _numeral(m["b"])
            # A proper fraction of whole numbers ("1/2", "3/4", "20/100") names a part, which a
            # problem may say in words ("half", "75%"). Any other "a/b" ("48/2") is a division
            # whose value is its result, so both of its operands must be known.
            if a.decimals == b.decimals == 0 and 0 < a.value < b.value:
                uses.append(Use(((a, b), _reading(a.value / b.value))))
            else:
                uses += [Use(((a,),)), Use(((b,),))]
        elif m["percent"]:
            uses.append(Use(((a,), (Numeral(a.value / 100, a.decimals + 2),))))
        else:
            uses.append(Use(((a,),)))
    return uses


def _cardinal(words: list[str], i: int) -> tuple[int, int]:
    """(value, end) of the run of cardinal words starting at words[i]: "two hundred and five"."""
    total, group, j = 0, 0, i
    while j < len(words):
        w, before = words[j], words[j - 1]
        if w in _CARDINALS:
            # A cardinal continues the run only after a scale ("hundred five") or as the unit of
            # a tens word ("twenty-five"): "five six" is two numbers.
            if j > i and not (before in _SCALES or before == "and" or
                              (_CARDINALS.get(before, 0) >= 20 and _CARDINALS[w] < 10)):
                break
            group += _CARDINALS[w]
        elif w == "hundred":
            group = (group or 1) * 100  # "a hundred" is 100
        elif w in _SCALES:
            total, group = total + (group or 1) * _SCALES[w], 0
        elif not (w == "and" and before in _SCALES and j + 1 < len(words)
                  and words[j + 1] in _CARDINALS):
            break
        j += 1
    return total + group, j


def _word_uses(text: str) -> list[Use]:
    """The numbers a text writes in words, in order: cardinals ("twenty-five"), parts ("half",
    "two thirds"), multiples ("twice", "a dozen"), "N and a half", "N percent"."""
    words = re.findall(r"[a-z]+", text.lower())
    uses, i = [], 0
    while i < len(words):
        word = words[i]
        if word in _CARDINALS or word in _SCALES:
            n, i = _cardinal(words, i)
            readings = [_reading(n)]
            after = words[i:i + 3]
            if after[:1] and after[0] in _PARTS:  # "two thirds": 2/3, or 2 and 3
                readings = [_reading(Fraction(n, _PARTS[after[0]])), _reading(n, _PARTS[after[0]])]
                i += 1
            elif after[:1] == ["percent"]:
                readings.append(_reading(Fraction(n, 100)))
                i += 1
            elif after == ["and", "a", "half"]:  # "one and a half": 1.5
                readings.append(_reading(n + Fraction(1, 2)))
                i += 3
            uses.append(Use(tuple(readings)))
            continue
        if word in _PARTS:
            uses.append(Use((_reading(_PARTS[word]), _reading(Fraction(1, _PARTS[word])))))
        elif word in _MULTIPLES:
            uses.append(Use((_reading(_MULTIPLES[word]),)))
        i += 1
    return uses


def said_numbers(text: str) -> set[Fraction]:
    """Every value a sentence says, in digits or in words, under every reading:
    "She sold half of her 1,200 pens at $2.50, 20% of them on Monday."
    -> {1200, 5/2, 20, 1/5, 2, 1/2}."""
    return {v for use in _digit_uses(text) + _word_uses(text) for v in use.values}


@dataclass(frozen=True)
class Step:
    """One line of a worked solution.

    text:    the line as a thought: calculator annotations removed, whitespace normalised.
    uses:    the numbers it needs known: the operands of its calculator annotations and every
             number its text says (in digits or words), except its own results.
    results: the values it computes, known from its chunk on: the results of its calculator
             annotations and the numbers right after "=" that end an expression.
    """

    text: str
    uses: tuple[Use, ...]
    results: frozenset[Fraction]


def parse_step(line: str) -> Step:
    """A solution line as a Step.

    "Natalia sold 48/2 = <<48/2=24>>24 clips in May." -> text "Natalia sold 48/2 = 24 clips in
    May.", uses 48 and 2, results {24}.

    The text counts, not only the annotation's operands: a thought must not *say* a number
    before it was heard either, and lines without annotations have only their text. A line
    without "=" has no results, so every number it says is a use: "Justine colored on 245 pieces
    of paper." states what it computed without showing how, and its 245 is unknown unless the
    problem or an earlier step said it (then the rule for unknown numbers applies).
    """
    operands, results = [], set()
    for m in _CALCULATOR.finditer(line):
        operands += _digit_uses(m["lhs"])
        if m["rhs"] is not None:
            results |= {v for use in _digit_uses(m["rhs"]) for v in use.values}
    text = " ".join(_CALCULATOR.sub("", line).split())
    for m in _RESULT.finditer(text):
        results |= {v for use in _digit_uses(m["n"] + (m["percent"] or "")) for v in use.values}
    # An own result is no use ("He eats 32 slices because 2 x 16 = 32"). A numeral written
    # alone can be one, and so can a number word under any reading ("half" for a result .5),
    # but not a division written out: the value of "12/60" is the result, 12 and 60 are uses.
    def own_result(reading: tuple[Numeral, ...]) -> bool:
        return len(reading) == 1 and reading[0].value in results

    uses = [use for use in operands + _digit_uses(text) if not own_result(use.readings[0])]
    uses += [use for use in _word_uses(text) if not any(map(own_result, use.readings))]
    return Step(text, tuple(dict.fromkeys(uses)), frozenset(results))


def solution_steps(solution: str) -> list[Step]:
    """The Steps of a worked solution (its text before "####"): one per non-empty line."""
    return [parse_step(line) for line in solution.split("\n") if line.strip()]


def _matches(written: Numeral, value: Fraction) -> bool:
    """Whether a written numeral stands for a value: equal, or written with 2 or more decimals
    and equal to the value rounded or cut there (0.33 or 0.67 for 1/3 and 2/3). One decimal is
    too coarse to tell a rounding from another number (0.5 and 0.46)."""
    if written.value == value:
        return True
    if written.decimals < 2:
        return False
    scale = 10 ** written.decimals
    return written.value in (Fraction(round(value * scale), scale),
                             Fraction(int(value * scale), scale))


def known_at(use: Use, known: dict[Fraction, int]) -> int | None:
    """The first chunk after which a use is known (-1: from the start), or None if never.
    known maps each known value to the chunk after which it is known."""
    def numeral_at(n: Numeral) -> int | None:
        if n.value in known:
            return known[n.value]
        times = [k for v, k in known.items() if _matches(n, v)]
        return min(times, default=None)

    times = [[numeral_at(n) for n in reading] for reading in use.readings]
    return min((max(t) for t in times if None not in t), default=None)


def initial_knowledge(question: str, chunks: list[str]) -> dict[Fraction, int]:
    """When each number a problem says becomes known: -1 (before the first chunk) for the
    question's numbers and the world constants that no chunk states, k for a number first said
    in chunk k."""
    said = [said_numbers(c) for c in chunks]
    stated = set().union(*said)
    known = {v: -1 for c, values in _CONSTANT_VALUES.items() if c not in stated for v in values}
    known |= {v: -1 for v in said_numbers(question)}
    for k, values in enumerate(said):
        for v in values:
            known.setdefault(v, k)
    return known


def align_steps(question: str, chunks: list[str], steps: list[Step]) -> list[int | None]:
    """The chunk after which each step is thought, or None for the deep phase.

    A step goes to the earliest chunk after which every number it uses is known (from the
    question, the world constants, the chunks so far, or the results of the steps before it),
    and never before the step before it: the steps keep their order. Its results are known from
    its chunk on. Numbers known before the first chunk still wait for it: the protocol has no
    thought on the question.

    A step that uses a number that is never known goes to the deep phase, and so do all the
    steps after it. This is the conservative choice that keeps causality even when a number was
    said in a form the parser does not read: the later steps may build on that number through
    this step's result, and only once the whole stream has arrived is every form of it surely
    heard.

    A step that uses no number ("Let x be the price of a pen.") introduces the step after it and
    goes where that step goes; at the end of the solution it goes with the step before it; alone
    it goes to the deep phase. A problem without chunks has no stream: every step goes deep.
    """
    known = initial_knowledge(question, chunks)
    placed: list[int | None] = []
    last = 0  # the chunk of the step before: no step goes earlier (this also lifts -1 to 0)
    deep = not chunks  # once True, every step goes to the deep phase
    for step in steps:
        times = [known_at(use, known) for use in step.uses]
        deep = deep or None in times
        if deep:
            placed.append(None)
            continue
        last = max([last, *times])
        placed.append(last)
        for v in step.results:
            known[v] = min(known.get(v, last), last)
    for i in reversed(range(len(steps))):  # steps without numbers: with the next step
        if not steps[i].uses:
            placed[i] = (placed[i + 1] if i + 1 < len(steps)
                         else placed[i - 1] if i > 0 else None)
    return placed


def causality_errors(question: str, chunks: list[str], steps: list[Step],
                     placed: list[int | None]) -> list[str]:
    """Why a placement of steps breaks the rules (empty: it keeps them), checked afresh, without
    align_steps's search: the steps keep their order, the deep phase is a tail, and every step
    at chunk k uses only numbers known after chunk k (the question, the world constants, chunks
    0..k, the results of the steps before it)."""
    errors = []
    stream = [k for k in placed if k is not None]
    if stream != sorted(stream) or None in placed[:len(stream)]:
        errors.append(f"steps out of order: {placed}")
    initial = initial_knowledge(question, chunks)
    for i, (step, k) in enumerate(zip(steps, placed)):
        if k is None:
            break
        known = {v: 0 for v, t in initial.items() if t <= k}
        known |= {v: 0 for j in range(i) for v in steps[j].results}
        for use in step.uses:
            if known_at(use, known) is None:
                values = " or ".join("&".join(str(n.value) for n in r) for r in use.readings)
                errors.append(f"step {i} at chunk {k} uses {values} before it is known: "
                              f"{step.text!r}")
    return errors


def streaming_gold(question: str, chunks: list[str], solution: str,
                   answer: str) -> tuple[list[str], str, str]:
    """(thoughts, deep, rtt_deep) of a problem from its worked solution (the text before "####").

    The steps placed at a chunk join into its thought ("" is a skip); the others, followed by
    "The answer is N.", are the deep reasoning; read-then-think gets every step, then the answer.
    """
    steps = solution_steps(solution)
    placed = align_steps(question, chunks, steps)
    thoughts = [" ".join(s.text for s, k in zip(steps, placed) if k == c)
                for c in range(len(chunks))]
    final = f"The answer is {answer}."
    deep = " ".join([s.text for s, k in zip(steps, placed) if k is None] + [final])
    rtt_deep = " ".join([s.text for s in steps] + [final])
    return thoughts, deep, rtt_deep


# ---------------------------------------------------------------------------------------------
# Loaders


@dataclass
class _Record:
    """One JSON object of an input file and where it came from (for ids and error messages)."""

    n: int  # line number (JSON lines, from 1) or record index (JSON list, from 0)
    where: str  # prefix of error messages: "FILE:LINE" or "FILE: record I"
    fields: dict


def _reject(error: DataError, skip_bad: bool, errors: list[DataError]) -> None:
    """Raise the error, or with skip_bad collect it so that the caller can report it."""
    if not skip_bad:
        raise error
    errors.append(error)


def _read_records(path: Path, skip_bad: bool, errors: list[DataError]) -> list[_Record]:
    """The JSON objects of a file that holds one JSON list or JSON lines (blank lines ignored)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    located = []  # (n, where, decoded value)
    if text.lstrip().startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:  # one broken list: nothing to skip to
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        located = [(i, f"{path}: record {i}", v) for i, v in enumerate(values)]
    else:
        # split("\n"), not splitlines(): JSON strings may hold U+2028, which splitlines breaks on.
        for n, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                located.append((n, f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                _reject(DataError(f"{path}:{n}: malformed JSON line ({e.msg}, column {e.colno})"),
                        skip_bad, errors)
    records = []
    for n, where, value in located:
        if isinstance(value, dict):
            records.append(_Record(n, where, value))
        else:
            _reject(DataError(f"{where}: expected a JSON object, got {type(value).__name__}"),
                    skip_bad, errors)
    return records


def _field(record: _Record, *keys: str) -> str:
    """The non-empty string at record.fields[keys[0]][keys[1]]...; DataError names the field."""
    name = ".".join(keys)
    value = record.fields
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            raise DataError(f"{record.where}: missing field '{name}'")
        value = value[key]
    if not isinstance(value, str):
        raise DataError(f"{record.where}: field '{name}' is not a string")
    if not value.strip():
        raise DataError(f"{record.where}: field '{name}' is empty")
    return value


# A GSM8K final answer: integer or decimal, maybe negative (commas already removed).
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _parse_gsm8k(name: str, record: _Record) -> Problem:
    """A GSM8K record: question text, and a solution ending "#### N" (other fields ignored).
    The streaming gold comes from the solution's steps (streaming_gold)."""
    question, chunks = split_question(_field(record, "question"))
    solution, sep, final = _field(record, "answer").rpartition("####")
    final = final.strip().replace(",", "")
    if not sep or not _NUMBER.fullmatch(final):
        raise DataError(f"{record.where}: field 'answer' does not end with '#### N'")
    thoughts, deep, rtt_deep = streaming_gold(question, chunks, solution, final)
    return Problem(id=f"{name}:{record.n}", question=question, chunks=chunks, answer=final,
                   thoughts=thoughts, deep=deep, rtt_deep=rtt_deep)


def _split_marked(text: str, marker: str) -> list[str]:
    """Pieces of text each ending with marker, stripped. Trailing text without the marker is a
    piece too, so that a forgotten marker shows up as a wrong count rather than vanishing."""
    pieces = [p.strip() for p in text.split(marker)]
    return pieces[:-1] if not pieces[-1] else pieces


def _unbox(record: _Record, text: str) -> str:
    """The content of the last \\boxed{...} / \\box{...} in text (braces may nest), or the whole
    text when it is plain. Uses the protocol's extraction (adasr.py), as the accuracy reward does."""
    if "\\box" not in text:
        return text.strip()
    content = extract_answer(text)
    if content is None:
        raise DataError(f"{record.where}: field 'answer' has an unclosed \\boxed{{")
    if not content:
        raise DataError(f"{record.where}: field 'answer' is empty")
    return content


def _parse_streamingthinker(name: str, record: _Record) -> Problem:
    """A StreamingThinker / StreamingCoT record (method.md section 7)."""
    question = _field(record, "Instruct_Context", "instruct").strip()
    chunks = _split_marked(_field(record, "Instruct_Context", "context"), "<EOS>")
    if not all(chunks):
        raise DataError(f"{record.where}: field 'Instruct_Context.context' has an empty sentence")
    # The thought on the question (ending <EOQ>) is dropped: in our protocol the model first
    # thinks after the first chunk. A record without <EOQ> has no question-thought to drop.
    stream = _field(record, "streaming_reasoning").split("<EOQ>", 1)[-1]
    thoughts = _split_marked(stream, "<EOT>")
    if len(thoughts) != len(chunks):
        raise DataError(f"{record.where}: field 'streaming_reasoning' has {len(thoughts)} "
                        f"thoughts ending <EOT> for {len(chunks)} context sentences")
    # Only the reasoning before <EOR> is kept; what follows (a check ending <EOF>, the boxed
    # answer, <EOA>) is rebuilt by adasr.py from `answer`.
    deep, sep, _ = _field(record, "deep_reasoning").partition("<EOR>")
    if not sep:
        raise DataError(f"{record.where}: field 'deep_reasoning' has no <EOR>")
    deep = deep.strip()
    answer = _unbox(record, _field(record, "answer"))
    # Read-then-think: the same content, all of it written after the stream.
    rtt_deep = " ".join([t for t in thoughts if t] + [deep])
    return Problem(id=f"{name}:{record.n}", question=question, chunks=chunks, answer=answer,
                   thoughts=thoughts, deep=deep, rtt_deep=rtt_deep)


_MARKER = re.compile(r"<EO[A-Z]>")


def _check_markers(record: _Record, problem: Problem) -> Problem:
    """The problem, once no text in it holds a marker token (adasr.py owns the markers)."""
    texts = {"question": problem.question, "deep": problem.deep, "rtt_deep": problem.rtt_deep}
    texts |= {f"chunks[{i}]": c for i, c in enumerate(problem.chunks)}
    texts |= {f"thoughts[{i}]": t for i, t in enumerate(problem.thoughts or [])}
    for field, text in texts.items():
        if text and (m := _MARKER.search(text)):
            raise DataError(f"{record.where}: marker {m.group()} left inside {field}: {text!r}")
    return problem


def _recognise(record: _Record) -> Callable[[str, _Record], Problem]:
    """The record parser for a file, chosen from the fields of its first record."""
    if "Instruct_Context" in record.fields:
        return _parse_streamingthinker
    if "question" in record.fields and "answer" in record.fields:
        return _parse_gsm8k
    raise DataError(f"{record.where}: unrecognised record with fields {sorted(record.fields)}; "
                    "expected StreamingThinker records (Instruct_Context, streaming_reasoning, "
                    "deep_reasoning, answer) or GSM8K records (question, answer ending '#### N'), "
                    "as a JSON list or JSON lines")


def _load(path: str | Path, parse: Callable[[str, _Record], Problem] | None,
          skip_bad: bool) -> list[Problem]:
    """Read the records of a file and parse each (parse None: recognise the format)."""
    path = Path(path)
    errors: list[DataError] = []
    records = _read_records(path, skip_bad, errors)
    if not records:
        raise DataError(f"{path}: no records" + (f"; first error: {errors[0]}" if errors else ""))
    parse = parse or _recognise(records[0])
    total = len(records) + len(errors)  # errors so far: lines that were not JSON objects
    problems = []
    for record in records:
        try:
            problems.append(_check_markers(record, parse(path.name, record)))
        except DataError as e:
            _reject(e, skip_bad, errors)
    if errors:
        warnings.warn(f"skipped {len(errors)} of {total} records in {path}: "
                      f"first error {errors[0]}", stacklevel=3)
    return problems


def load_gsm8k(path: str | Path, *, skip_bad: bool = False) -> list[Problem]:
    """GSM8K JSON lines: "question", "answer" ending "#### N". id = "FILE:LINE".

    question/chunks come from split_question; answer is N without commas. The solution lines
    before "####" (calculator annotations removed) become the streaming gold (streaming_gold):
    thoughts holds the steps placed at each chunk ("" = skip), deep the steps left for the deep
    phase and "The answer is N.", rtt_deep every step and "The answer is N.".
    """
    return _load(path, _parse_gsm8k, skip_bad)


def load_streamingthinker(path: str | Path, *, skip_bad: bool = False) -> list[Problem]:
    """StreamingThinker / StreamingCoT records, as a JSON list or JSON lines. id = "FILE:N".

    One gold thought per context sentence (the question-thought dropped), deep = deep reasoning
    before <EOR>, answer = the content of \\boxed{...} (or the plain answer field),
    rtt_deep = the thoughts and then the deep reasoning. Which chunks matter is unknown.
    """
    return _load(path, _parse_streamingthinker, skip_bad)


def load_problems(path: str | Path, *, skip_bad: bool = False) -> list[Problem]:
    """Problems from a StreamingThinker or GSM8K file, recognised by the first record's fields."""
    return _load(path, None, skip_bad)


# ---------------------------------------------------------------------------------------------
# The synthetic streaming tasks
#
# A stream of one-sentence events about people's counts of items ("You buy 3 apples.", "Ann
# loses 2 pens.", "It starts to rain."). Only some chunks matter for the question; the others are
# other people's events, other items, or filler. A small fixed vocabulary and a handful of
# sentence shapes keep the BPE vocabulary tiny and the tasks learnable on a CPU.
#
#   you    Track your count of one item ("How many pens do you have at the end?"). The default.
#          [ours] The target is "you", not a named person: a ~1M-parameter model did not learn,
#          within the default job's CPU budget, to match each chunk's name against the
#          question's (README, "Things we measured"). With "you", whether a chunk matters is
#          visible in the chunk, and the minutes go to what AdaSR is about: when to think.
#   named  Track a named person's count of one item among several people and items ("How many
#          pens does Ann have at the end?"): whether a chunk matters depends on the question.
#          For pretrained models (the smollm2 preset), which bind names as they read.
#   long   Track your count over 8-12 chunks with counts up to 20 and changes up to 5, and the
#          question adds one change after the stream ("How many pens do you have at the end, if
#          you then buy 6 more?"). Thinking on the relevant chunks carries the state the answer
#          needs (re-deriving a long stream at the end is slow and error-prone), and the deep
#          phase has necessary work of its own (the last change), so a rollout can be good in
#          one phase and bad in the other — the case phase-wise advantages (HRPO) are for.
#          [ours, measured] A first design tracked two items and asked their difference; the
#          ~1M-parameter model confused which count an event changes (README).

NAMES = ("Tom", "Ann", "Ben", "Eva", "Sam", "Mia", "Leo", "Zoe")     # the other people
ITEMS = (("apple", "apples"), ("pear", "pears"), ("pen", "pens"),
         ("card", "cards"), ("book", "books"), ("coin", "coins"))
# Event verb -> (sign of the change for its subject, past tense used in the recap).
VERBS = {"buy": (1, "bought"), "find": (1, "found"), "lose": (-1, "lost"), "give": (-1, "gave")}
# Sentences that change nobody's count.
FILLERS = ("It is a sunny day.", "It starts to rain.", "The shop is busy.",
           "{name} walks to the park.", "{name} sings a song.")
TASKS = {"you": "your count of one item",
         "named": "a named person's count of one item among several people and items",
         "long": "your count over 8-12 chunks up to 20, then one more change in the deep phase"}
# Per task: chunks per problem (inclusive range), largest count, largest change of one event.
_TASK_SIZES = {"you": ((4, 7), 12, 4), "named": ((4, 7), 12, 4), "long": ((8, 12), 20, 5)}


def _event(rng: random.Random, subject: str, verb: str, k: int, item: tuple[str, str],
           target: str = "You") -> str:
    """One event sentence: "You give 4 apples to Ann.", "Ann buys 1 apple." (a gift always goes
    to another person, never to the subject or to the question's target: only the target's own
    events change the target's count)."""
    what = f"{k} {item[0] if k == 1 else item[1]}"
    form = verb if subject == "You" else {"have": "has"}.get(verb, verb + "s")
    if verb == "give":
        return f"{subject} {form} {what} to {rng.choice([n for n in NAMES if n not in (subject, target)])}."
    return f"{subject} {form} {what}."


def _change(rng: random.Random, count: int, max_value: int, max_delta: int) -> tuple[str, int]:
    """A relevant event's (verb, k) that keeps the count within [0, max_value]: never take more
    than is held."""
    verb = rng.choice([v for v, (sign, _) in VERBS.items()
                       if (count < max_value if sign > 0 else count > 0)])
    sign = VERBS[verb][0]
    return verb, rng.randint(1, min(max_delta, max_value - count if sign > 0 else count))


def _track(rng, key, target, item, others, n_chunks, max_value, max_delta, irrelevant, terse,
           then: bool = False):
    """A one-count problem: ``target`` ("You" or a name) starts with some ``item``s; each later
    chunk is a relevant event of the target's, or (probability ``irrelevant``) a distractor drawn
    by ``others(rng)``. With ``then`` (task long) the question adds one more change after the
    stream ("..., if you then buy 6 more?"), which only the deep phase can compute."""
    count = rng.randint(1, max_value)
    chunks = [_event(rng, target, "have", count, item)]
    relevant = [True]
    thoughts = [f"{target} start{'s' if target != 'You' else ''} with {count}."]
    recap = [f"{target} started with {count}."]
    for _ in range(rng.randint(*n_chunks) - 1):
        if rng.random() < irrelevant:
            chunks.append(others(rng))
            relevant.append(False)
            # Drawn even when terse is 0 or 1, so that terse changes thoughts, never problems.
            skip = rng.random() < terse
            thoughts.append("" if skip else f"No change, still {count}.")
            continue
        verb, k = _change(rng, count, max_value, max_delta)
        sign, past = VERBS[verb]
        step = f"{count} {'+' if sign > 0 else '-'} {k} = {count + sign * k}."
        chunks.append(_event(rng, target, verb, k, item))
        relevant.append(True)
        thoughts.append(step)
        recap.append(f"{target} {past} {k}, so {step}")
        count += sign * k
    answer, last = count, []
    if then:
        sign = 1 if count == 0 or rng.random() < 0.5 else -1
        k = rng.randint(1, 9) if sign > 0 else rng.randint(1, count)
        answer = count + sign * k
        # The deep phase first restates the question's change in the question's own words, so
        # that reading the number off the question is a copy (the same words, then the number)
        # rather than a search for it from "Then 12 +"; measured: README, "The synthetic tasks".
        change = f"buy {k} more" if sign > 0 else f"give {k} away"
        last = [f"If you then {change}, {count} {'+' if sign > 0 else '-'} {k} = {answer}."]
    final = f"The answer is {answer}."
    # "Recap:" makes the full recap's first token the same for every problem, so that the SFT
    # model's most likely deep phase is the majority (full) one and the terse one stays the
    # minority alternative that sampling explores.
    rederive = " ".join(["Recap:"] + recap + last + [final])
    # [ours, measured] After a long stream the full recap re-derives 8-12 events from memory,
    # which the tiny model garbles (README, measured); the long task's recap restates the
    # tracked state instead. Read-then-think has no tracked state: it always re-derives.
    full = " ".join(["Recap:", f"You have {count}."] + last + [final]) if then else rederive
    deep = " ".join(last + [final]) if rng.random() < terse else full
    question = (f"How many {item[1]} does {target} have at the end?" if target != "You" else
                f"How many {item[1]} do you have at the end, if you then {change}?" if then else
                f"How many {item[1]} do you have at the end?")
    return Problem(id=f"synthetic/{key}", question=question, chunks=chunks, answer=str(answer),
                   relevant=relevant, thoughts=thoughts, deep=deep, rtt_deep=rederive)


def _you(rng, key, sizes, irrelevant, terse, then=False) -> Problem:
    item = rng.choice(ITEMS)

    def others(rng):          # another person's event with your item (two thirds), or a filler
        if rng.randrange(3) == 2:
            return rng.choice(FILLERS).format(name=rng.choice(NAMES))
        verb = rng.choice(("have", *VERBS))
        return _event(rng, rng.choice(NAMES), verb, rng.randint(1, sizes[2]), item)
    return _track(rng, key, "You", item, others, *sizes, irrelevant, terse, then)


def _long(rng, key, sizes, irrelevant, terse) -> Problem:
    return _you(rng, key, sizes, irrelevant, terse, then=True)


def _named(rng, key, sizes, irrelevant, terse) -> Problem:
    target, item = rng.choice(NAMES), rng.choice(ITEMS)
    people = [n for n in NAMES if n != target]

    def others(rng):          # someone else with the item, the target with another item, filler
        kind = rng.randrange(3)
        if kind == 2:
            return rng.choice(FILLERS).format(name=rng.choice(people))
        who, what = (rng.choice(people), item) if kind == 0 else \
            (target, rng.choice([i for i in ITEMS if i != item]))
        return _event(rng, who, rng.choice(("have", *VERBS)), rng.randint(1, sizes[2]), what, target)
    return _track(rng, key, target, item, others, *sizes, irrelevant, terse)


_TASK_MAKERS = {"you": _you, "named": _named, "long": _long}


def make_synthetic(n: int, seed: int | str, *, task: str = "you", irrelevant: float = 0.4,
                   terse: float = 0.4) -> list[Problem]:
    """n synthetic problems of ``task`` (TASKS); problem i depends only on (seed, i) and the
    options.

    irrelevant: probability that an event (a chunk after the opening counts) does not matter.
    terse: probability, drawn independently per irrelevant chunk, that its gold thought is ""
        (skip), and per problem that the gold deep reasoning is only what the answer needs
        ("The answer is N.", or the difference for pair) instead of a full recap.

    Example, make_synthetic(1, 0)[0]:
        question  "How many pens do you have at the end?"
        chunks    ["You have 8 pens.", "You give 4 pens to Zoe.", "You find 2 pens.",
                   "Ann loses 4 pens.", "You lose 1 pen.", "You lose 1 pen.", "The shop is busy."]
        relevant  [True, True, True, False, True, True, False]
        thoughts  ["You start with 8.", "8 - 4 = 4.", "4 + 2 = 6.", "No change, still 6.",
                   "6 - 1 = 5.", "5 - 1 = 4.", "No change, still 4."]
        deep      "Recap: You started with 8. You gave 4, so 8 - 4 = 4. You found 2, so 4 + 2 = 6.
                   You lost 1, so 6 - 1 = 5. You lost 1, so 5 - 1 = 4. The answer is 4."
        rtt_deep  the same full recap (rtt_deep is never terse)
        answer    "4"
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    if not (0 <= irrelevant <= 1 and 0 <= terse <= 1):
        raise ValueError(f"irrelevant and terse are probabilities, got {irrelevant}, {terse}")
    # The task's name is not part of the key for "you", so that its problems stay those of
    # every earlier version of this file.
    prefix = "" if task == "you" else f"{task}/"
    return [_TASK_MAKERS[task](random.Random(f"{prefix}{seed}/{i}"), f"{prefix}{seed}/{i}",
                               _TASK_SIZES[task], irrelevant, terse) for i in range(n)]


def synthetic_splits(n_train: int, n_test: int, seed: int,
                     **options) -> tuple[list[Problem], list[Problem]]:
    """Training and held-out synthetic problems that share no problem.

    They come from disjoint seed streams ("SEED/train/I" and "SEED/test/I"), and a test candidate
    whose (question, chunks) equals a training problem's is passed over for the next candidate.
    options go to make_synthetic.
    """
    train = make_synthetic(n_train, f"{seed}/train", **options)
    seen = {(p.question, tuple(p.chunks)) for p in train}
    # Collisions are rare with the default options; the slack only runs out when the options
    # leave so few distinct problems that training already covers most of them.
    candidates = make_synthetic(2 * n_test + 100, f"{seed}/test", **options)
    test = [p for p in candidates if (p.question, tuple(p.chunks)) not in seen][:n_test]
    if len(test) < n_test:
        raise ValueError(f"only {len(test)} of {len(candidates)} test candidates are not training "
                         f"problems; these options allow too few distinct problems")
    return train, test


# ---------------------------------------------------------------------------------------------
# python data.py FILE...: how much of a GSM8K file streams, and a check of every gold episode


@dataclass
class GoldReport:
    """How the streaming gold of one GSM8K file came out, and what is wrong with it."""

    problems: int = 0
    steps: int = 0
    streamed_steps: int = 0  # steps placed in the stream (not left to the deep phase)
    chunks: int = 0
    thought_chunks: int = 0  # chunks whose gold thought is not a skip
    problems_with_thought: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)  # one line per bad problem

    def lines(self, name: str) -> list[str]:
        def share(part: int, whole: int) -> str:
            return f"{part / max(whole, 1):6.1%}  ({part} of {whole})"
        return [f"{name}: {self.problems} problems",
                f"  solution steps placed in the stream  {share(self.streamed_steps, self.steps)}",
                f"  chunks with a thought                {share(self.thought_chunks, self.chunks)}",
                f"  problems with at least one thought   "
                f"{share(self.problems_with_thought, self.problems)}",
                f"  failures (episode not valid with its own answer, or causality broken): "
                f"{len(self.failures)}"] + [f"    {f}" for f in self.failures[:10]]


def gold_report(path: str | Path, protocol) -> GoldReport:
    """Statistics of the streaming gold of a GSM8K file, and a check of every problem: its
    placement keeps the rules (causality_errors), and its gold episode in both layouts
    (protocol.gold, an adasr.Protocol) parses valid, with the problem's thoughts and answer."""
    problems = load_gsm8k(path)
    records = _read_records(Path(path), False, [])  # the same records, for the solution steps
    report = GoldReport()
    for problem, record in zip(problems, records, strict=True):
        steps = solution_steps(_field(record, "answer").rpartition("####")[0])
        placed = align_steps(problem.question, problem.chunks, steps)
        report.problems += 1
        report.steps += len(steps)
        report.streamed_steps += sum(k is not None for k in placed)
        report.chunks += len(problem.chunks)
        report.thought_chunks += sum(bool(t) for t in problem.thoughts)
        report.problems_with_thought += any(problem.thoughts)
        errors = causality_errors(problem.question, problem.chunks, steps, placed)
        for layout in ("stream", "read_then_think"):
            ep = protocol.gold(problem, layout)
            parsed = ep.parsed
            if not ep.correct:
                errors.append(f"{layout}: answer {parsed.answer!r}, reference {problem.answer!r}, "
                              f"format errors {parsed.stream_errors + parsed.deep_errors}")
            if layout == "stream" and parsed.thoughts != problem.thoughts:
                errors.append("stream: the episode's thoughts are not the problem's")
        if errors:
            report.failures.append(f"{problem.id}: {errors[0]}")
    return report


def main(argv: list[str] | None = None) -> None:
    """`python data.py FILE [FILE...]`: the streaming gold report of GSM8K files; exit status 1
    when a problem fails its checks."""
    ap = ArgumentParser(description="How much of the gold reasoning of GSM8K files streams, and "
                                    "whether every gold episode is valid and causal.")
    ap.add_argument("files", nargs="+", help="GSM8K JSON lines files")
    args = ap.parse_args(argv)
    # Bytes and the markers are all a tokenizer needs to build and parse gold episodes.
    protocol = Protocol(train_bpe([], 256 + len(MARKERS), special_tokens=MARKERS))
    failed = False
    for name in args.files:
        report = gold_report(name, protocol)
        print("\n".join(report.lines(name)))
        failed |= bool(report.failures)
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    run_cli(main)
