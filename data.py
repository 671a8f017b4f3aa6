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
  in as chunks. load_gsm8k.
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
"""

from __future__ import annotations

import json
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from adasr import Problem, extract_answer
from model import UserError


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
# GSM8K calculator annotations, "<<48/2=24>>": tool hints, not reasoning text.
_CALCULATOR = re.compile(r"<<[^>]*>>")


def _parse_gsm8k(name: str, record: _Record) -> Problem:
    """A GSM8K record: question text, and a solution ending "#### N" (other fields ignored)."""
    question, chunks = split_question(_field(record, "question"))
    solution, sep, final = _field(record, "answer").rpartition("####")
    final = final.strip().replace(",", "")
    if not sep or not _NUMBER.fullmatch(final):
        raise DataError(f"{record.where}: field 'answer' does not end with '#### N'")
    steps = (_CALCULATOR.sub("", line).strip() for line in solution.split("\n"))
    # The worked solution is the only gold reasoning; it serves both layouts.
    reasoning = " ".join(s for s in steps if s)
    return Problem(id=f"{name}:{record.n}", question=question, chunks=chunks, answer=final,
                   deep=reasoning, rtt_deep=reasoning)


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

    question/chunks come from split_question; answer is N without commas; deep and rtt_deep are
    the solution lines before "####" without calculator annotations, joined with spaces.
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
#   pair   Track your counts of two items over 8-12 chunks with counts up to 20, then answer
#          "How many more pens than apples do you have at the end?". Thinking on the relevant
#          chunks carries the state the answer needs (recomputing a long stream at the end is
#          slow and error-prone), and the deep phase has necessary work of its own (the
#          difference), so a rollout can be good in one phase and bad in the other — the case
#          phase-wise advantages (HRPO) are for.

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
         "pair": "your counts of two items over 8-12 chunks, answer their difference"}
# Per task: chunks per problem (inclusive range), largest count, largest change of one event.
_TASK_SIZES = {"you": ((4, 7), 12, 4), "named": ((4, 7), 12, 4), "pair": ((8, 12), 20, 5)}


def _event(rng: random.Random, subject: str, verb: str, k: int, item: tuple[str, str]) -> str:
    """One event sentence: "You give 4 apples to Ann.", "Ann buys 1 apple." (a gift always goes
    to another person, never to the subject or to a named target: only the target's own events
    change the target's count)."""
    what = f"{k} {item[0] if k == 1 else item[1]}"
    form = verb if subject == "You" else {"have": "has"}.get(verb, verb + "s")
    if verb == "give":
        return f"{subject} {form} {what} to {rng.choice([n for n in NAMES if n != subject])}."
    return f"{subject} {form} {what}."


def _change(rng: random.Random, count: int, max_value: int, max_delta: int) -> tuple[str, int]:
    """A relevant event's (verb, k) that keeps the count within [0, max_value]: never take more
    than is held."""
    verb = rng.choice([v for v, (sign, _) in VERBS.items()
                       if (count < max_value if sign > 0 else count > 0)])
    sign = VERBS[verb][0]
    return verb, rng.randint(1, min(max_delta, max_value - count if sign > 0 else count))


def _track(rng, key, target, item, others, n_chunks, max_value, max_delta, irrelevant, terse):
    """A one-count problem (tasks you, named): ``target`` ("You" or a name) starts with some
    ``item``s; each later chunk is a relevant event of the target's, or (probability
    ``irrelevant``) a distractor drawn by ``others(rng)``."""
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
    final = f"The answer is {count}."
    # "Recap:" makes the full recap's first token the same for every problem, so that the SFT
    # model's most likely deep phase is the majority (full) one and the terse one stays the
    # minority alternative that sampling explores.
    full = " ".join(["Recap:"] + recap + [final])
    deep = final if rng.random() < terse else full
    question = (f"How many {item[1]} do you have at the end?" if target == "You" else
                f"How many {item[1]} does {target} have at the end?")
    return Problem(id=f"synthetic/{key}", question=question, chunks=chunks, answer=str(count),
                   relevant=relevant, thoughts=thoughts, deep=deep, rtt_deep=full)


def _you(rng, key, sizes, irrelevant, terse) -> Problem:
    item = rng.choice(ITEMS)

    def others(rng):          # another person's event with your item (two thirds), or a filler
        if rng.randrange(3) == 2:
            return rng.choice(FILLERS).format(name=rng.choice(NAMES))
        verb = rng.choice(("have", *VERBS))
        return _event(rng, rng.choice(NAMES), verb, rng.randint(1, sizes[2]), item)
    return _track(rng, key, "You", item, others, *sizes, irrelevant, terse)


def _named(rng, key, sizes, irrelevant, terse) -> Problem:
    target, item = rng.choice(NAMES), rng.choice(ITEMS)
    people = [n for n in NAMES if n != target]

    def others(rng):          # someone else with the item, the target with another item, filler
        kind = rng.randrange(3)
        if kind == 2:
            return rng.choice(FILLERS).format(name=rng.choice(people))
        who, what = (rng.choice(people), item) if kind == 0 else \
            (target, rng.choice([i for i in ITEMS if i != item]))
        return _event(rng, who, rng.choice(("have", *VERBS)), rng.randint(1, sizes[2]), what)
    return _track(rng, key, target, item, others, *sizes, irrelevant, terse)


def _pair(rng, key, sizes, irrelevant, terse) -> Problem:
    """Two items a, b: "You have 7 pens." "You have 12 apples." then events on either; the
    question asks for the difference of the final counts, larger minus smaller."""
    (lo, hi), max_value, max_delta = sizes
    items = rng.sample(ITEMS, 2)
    counts = [rng.randint(1, max_value) for _ in items]
    chunks = [_event(rng, "You", "have", c, it) for c, it in zip(counts, items)]
    relevant = [True, True]
    thoughts = [f"You start with {c} {it[1]}." for c, it in zip(counts, items)]
    steps: list[list[str]] = [[], []]                  # per item, its arithmetic in order
    for _ in range(rng.randint(lo, hi) - 2):
        if rng.random() < irrelevant:
            if rng.randrange(3) == 2:
                chunks.append(rng.choice(FILLERS).format(name=rng.choice(NAMES)))
            else:
                chunks.append(_event(rng, rng.choice(NAMES), rng.choice(("have", *VERBS)),
                                     rng.randint(1, max_delta), rng.choice(items)))
            relevant.append(False)
            thoughts.append("" if rng.random() < terse else "No change.")
            continue
        i = rng.randrange(2)
        verb, k = _change(rng, counts[i], max_value, max_delta)
        sign = VERBS[verb][0]
        step = f"{counts[i]} {'+' if sign > 0 else '-'} {k} = {counts[i] + sign * k}"
        chunks.append(_event(rng, "You", verb, k, items[i]))
        relevant.append(True)
        thoughts.append(f"{step} {items[i][1]}.")
        steps[i].append(step)
        counts[i] += sign * k
    a, b = (0, 1) if counts[0] >= counts[1] else (1, 0)
    answer = counts[a] - counts[b]
    combine = f"{counts[a]} - {counts[b]} = {answer}. The answer is {answer}."
    recap = " ".join(f"{it[1].capitalize()}: start {start}" + "".join(f", {st}" for st in sts) + "."
                     for it, start, sts in zip(items, [int(c.split()[2]) for c in chunks[:2]], steps))
    full = f"Recap: {recap} {combine}"
    deep = combine if rng.random() < terse else full
    question = f"How many more {items[a][1]} than {items[b][1]} do you have at the end?"
    return Problem(id=f"synthetic/{key}", question=question, chunks=chunks, answer=str(answer),
                   relevant=relevant, thoughts=thoughts, deep=deep, rtt_deep=full)


_TASK_MAKERS = {"you": _you, "named": _named, "pair": _pair}


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
