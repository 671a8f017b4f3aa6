"""gsm8k_gold.py — streaming gold from worked solutions [ours] (docs/method.md §7).

What this file owns: ``streaming_gold``, which turns a GSM8K problem (question, chunks) and its
worked solution into gold streaming thoughts, gold deep reasoning and a read-then-think gold,
and the pieces it is made of (reading the numbers a sentence says, parsing solution steps,
placing each step at a chunk, checking causality). data.py's GSM8K loader calls it;
``python data.py FILE...`` reports how much of a file streams and checks every gold episode.

StreamingThinker writes its streaming thoughts with a teacher LLM. A GSM8K solution already has
them, in the wrong place: each line of it is a step that uses some numbers, and the stream tells
when each number arrives. align_steps moves every step to the earliest chunk after which all the
numbers it uses are known:
- known from the start: the numbers of the question sentence (it arrives first) and a short
  table of world constants (WORLD_CONSTANTS: 0, 1, 7, 10, 12, 24, 52, 60, 100, 365, 1000, each
  with its reason, and their reciprocals; what they add to the stream: docs/gsm8k.md), unless a
  chunk states that number, in which case it is the problem's own and the step waits for that
  chunk;
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
Limits: numbers are matched by value, so a value that two quantities share (5 blocks tall, 5
blocks shorter) is known when the first is said; a step that needs unstated world knowledge
(a car has 4 wheels, a month has 30 days) goes to the deep phase with all that follows.
# ---------------------------------------------------------------------------------------------
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from fractions import Fraction

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
number (in digits or words) it is no constant, and the step waits for that chunk. How much
each constant adds to what streams: docs/gsm8k.md. 2 is no constant: "half", "twice", "double"
and "pair" say it where a problem means it."""


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


