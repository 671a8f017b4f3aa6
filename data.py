"""data.py — problems from files: StreamingThinker JSON and GSM8K JSON lines.

This file owns *what* the model reads from a file and what its gold trajectories say; how a
Problem (adasr.py) becomes tokens belongs to the protocol, so no marker token (<EOQ>, <EOS>,
<EOT>, <EOR>, <EOA>, ...) ever appears inside a Problem's text: loaders split on the markers and
check that none is left. The synthetic tasks are in tasks.py.

Two sources, one record (docs/method.md §7), recognised by content in ``load_problems``:
- StreamingThinker / StreamingCoT JSON: context sentences, gold streaming thoughts, gold deep
  reasoning (``load_streamingthinker``).
- GSM8K JSON lines: word problems with worked solutions but no per-sentence thoughts. The
  question text is split into sentences; the asking sentence arrives first, the others stream
  in as chunks; the streaming gold is built from the worked solution (gsm8k_gold.py,
  ``load_gsm8k``). ``python data.py FILE...`` reports how much of each file (GSM8K or
  StreamingThinker) streams and checks every gold episode.

Design decisions
- [ours] The question arrives first, before any chunk (StreamingThinker's order), and the model
  thinks only after chunks: our protocol has no thought on the question, so StreamingThinker's
  thought on the question (the one ending <EOQ>) is dropped.
- Bad input raises DataError naming the file, the line (JSON lines, counted from 1) or the record
  (JSON list, indexed from 0) and the field. Loaders are strict; with skip_bad=True they skip bad
  records and warn "skipped K of N records in FILE: first error ...", never silently.
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from adasr import MARKERS, Problem, Protocol, extract_answer
from cli import ArgumentParser, UserError, run_cli
from gsm8k_gold import align_steps, causality_errors, solution_steps, streaming_gold
from tokenizer import train_bpe


class DataError(UserError):
    """Bad input data. The message says where (FILE:LINE or FILE: record I) and which field."""


# ---------------------------------------------------------------------------------------------
# Sentences

# Words whose period does not end a sentence ("Mr. Smith"). Deliberately short: a missed split
# only makes one chunk longer, a wrong split cuts a sentence in two.
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "mt", "vs"}
# Sentence-ending punctuation, optional closing quotes or brackets, then the single space left
# after whitespace is collapsed. "3.5" and "$1.50" never match: no space follows their period.
# The full-width ends of Chinese and Japanese text (。？！) end a sentence with or without one.
_BOUNDARY = re.compile(r"[.?!]+[\"')\]]* |[。？！]+[」』）\"')\]]* ?")
# First words of a sentence that asks even without a "?" ("Find the total cost.").
_ASKING_WORDS = {"how", "what", "which", "who", "whom", "whose", "why",
                 "find", "calculate", "compute", "determine"}


def split_sentences(text: str) -> list[str]:
    """Split text into sentences, keeping their punctuation; whitespace runs become one space.

    A sentence ends at ".", "?" or "!" followed by a space, except after an abbreviation
    ("Mr.", "Dr.", "St.") and when the next word starts in lower case ("5 p.m. and then"), which
    does not begin a new sentence; and at "。", "？" or "！", space or not.
    """
    text = " ".join(text.split())
    sentences, start = [], 0
    for m in _BOUNDARY.finditer(text):
        if m.end() == len(text):   # a full-width end at the very end: the last sentence
            break
        next_char = text[m.end()]
        word = text[start:m.start()].rsplit(" ", 1)[-1].lstrip("\"'([").lower()
        if next_char.islower() or (text[m.start()] == "." and word in _ABBREVIATIONS):
            continue
        sentences.append(text[start:m.end()].rstrip(" "))
        start = m.end()
    if start < len(text):
        sentences.append(text[start:])
    return sentences


def _asks(sentence: str) -> bool:
    """Whether a sentence asks: it ends with "?" or starts with an asking word."""
    first_word = sentence.split(" ", 1)[0].strip(",").lower()
    return sentence.rstrip("\"')]」』）").endswith(("?", "？")) or first_word in _ASKING_WORDS


def split_question(text: str) -> tuple[str, list[str]]:
    """Split a word problem into (question, chunks).

    The last sentence that asks becomes the question (it arrives first); the other sentences,
    in their order, become the chunks. If no sentence asks, the last sentence is the question.
    """
    sentences = split_sentences(text)
    if not any(c.isalnum() for s in sentences for c in s):
        raise DataError(f"the text {text!r} has no sentence with a word in it")
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


def check_data_file(path, option: str | None = None) -> Path:
    """``path`` as a Path, once it is a regular file; else a DataError that says what it is (and
    names ``option``, when it came from one)."""
    path = Path(path)
    where = f"option {option}: {path}" if option else str(path)
    if not path.exists():
        raise DataError(f"{where}: no such file")
    if path.is_dir():
        raise DataError(f"{where}: is a directory, not a data file")
    if not path.is_file():
        raise DataError(f"{where}: not a regular file (a device, a pipe or a socket), not a data file")
    return path


def _read_records(path: Path, skip_bad: bool, errors: list[DataError]) -> list[_Record]:
    """The JSON objects of a file that holds one JSON list or JSON lines (blank lines ignored)."""
    check_data_file(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
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


# A GSM8K final answer: integer or decimal, maybe negative, thousands commas allowed
# ("1,200"; "1,2,3" is not a number).
_FINAL_ANSWER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def _parse_gsm8k(name: str, record: _Record) -> Problem:
    """A GSM8K record: question text, and a solution ending "#### N" (other fields ignored).
    The streaming gold comes from the solution's steps (streaming_gold)."""
    question, chunks = split_question(_field(record, "question"))
    solution, sep, final = _field(record, "answer").rpartition("####")
    final = final.strip()
    if not sep or not _FINAL_ANSWER.fullmatch(final):
        raise DataError(f"{record.where}: field 'answer' does not end with '#### N' (a number)")
    final = final.replace(",", "")
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
    """A StreamingThinker / StreamingCoT record (docs/method.md §7)."""
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


# StreamingThinker's own markers (<EOQ>, <EOS>, <EOT>, <EOR>, <EOF>, <EOA>, ...): a record splits on
# them, so one left inside a piece of text means the record's markers are out of place.
_SOURCE_MARKER = re.compile(r"<EO[A-Z]>")


def marker_in(text: str, special=()) -> str | None:
    """The first protocol marker (adasr.MARKERS) or other ``special`` token of a tokenizer written
    inside ``text``, or None. The tokenizer reads a special token in text as that token, so user
    text must hold none; any other text (StreamingThinker's ``<EOF>``, say) is text."""
    found = [(text.find(m), m) for m in [*MARKERS, *special] if m in text]
    return min(found)[1] if found else None


def _check_markers(record: _Record, problem: Problem) -> Problem:
    """The problem, once no text in it holds a marker token (adasr.py owns the markers)."""
    texts = {"question": problem.question, "deep": problem.deep, "rtt_deep": problem.rtt_deep}
    texts |= {f"chunks[{i}]": c for i, c in enumerate(problem.chunks)}
    texts |= {f"thoughts[{i}]": t for i, t in enumerate(problem.thoughts or [])}
    for field, text in texts.items():
        if text and (m := marker_in(text)):
            raise DataError(f"{record.where}: the protocol marker {m} is left inside {field}: {text!r}")
        if text and (m := _SOURCE_MARKER.search(text)):
            raise DataError(f"{record.where}: the record's marker {m.group()} is left inside "
                            f"{field} (out of place in the record): {text!r}")
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


def warn_overlap(train: list[Problem], held_out: list[Problem]) -> None:
    """Say how many held-out problems are also training problems, or repeat one another (the
    synthetic splits are disjoint by construction; files need not be)."""
    key = lambda p: (p.question, tuple(p.chunks))                      # noqa: E731
    seen = {key(p) for p in train}
    shared = sum(key(p) in seen for p in held_out)
    repeated = len(held_out) - len({key(p) for p in held_out})
    if shared or repeated:
        print(f"warning: of {len(held_out)} held-out problems, {shared} are also training problems "
              f"and {repeated} repeat another held-out one: the evaluation is not on unseen "
              "problems alone", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# python data.py FILE...: how much of a file's gold streams, and a check of every gold episode


@dataclass
class GoldReport:
    """How the streaming gold of one file came out, and what is wrong with it. A StreamingThinker
    file brings its gold thoughts; a GSM8K file's are placed from its solution steps."""

    source: str = "GSM8K"
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
        steps = [f"  solution steps placed in the stream  {share(self.streamed_steps, self.steps)}"]
        return [f"{name}: {self.problems} problems ({self.source})",
                *(steps if self.source == "GSM8K" else []),
                f"  chunks with a thought                {share(self.thought_chunks, self.chunks)}",
                f"  problems with at least one thought   "
                f"{share(self.problems_with_thought, self.problems)}",
                f"  failures (episode not valid with its own answer, or causality broken): "
                f"{len(self.failures)}"] + [f"    {f}" for f in self.failures[:10]]


def gold_report(path: str | Path, protocol) -> GoldReport:
    """Statistics of the streaming gold of a GSM8K or StreamingThinker file, and a check of every
    problem: its gold episode in both layouts (protocol.gold, an adasr.Protocol) parses valid,
    with the problem's thoughts and answer; for GSM8K also that the placement of its solution
    steps keeps the rules (causality_errors)."""
    path = Path(path)
    records = _read_records(path, False, [])  # the same records as the problems', for the steps
    gsm8k = not records or _recognise(records[0]) is _parse_gsm8k
    problems = load_gsm8k(path) if gsm8k else load_streamingthinker(path)
    report = GoldReport(source="GSM8K" if gsm8k else "StreamingThinker")
    for problem, record in zip(problems, records, strict=True):
        errors = []
        if gsm8k:
            steps = solution_steps(_field(record, "answer").rpartition("####")[0])
            placed = align_steps(problem.question, problem.chunks, steps)
            report.steps += len(steps)
            report.streamed_steps += sum(k is not None for k in placed)
            errors = causality_errors(problem.question, problem.chunks, steps, placed)
        report.problems += 1
        report.chunks += len(problem.chunks)
        report.thought_chunks += sum(bool(t) for t in problem.thoughts)
        report.problems_with_thought += any(problem.thoughts)
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
    """`python data.py FILE [FILE...]`: the streaming gold report of GSM8K or StreamingThinker
    files; exit status 1 when a problem fails its checks."""
    ap = ArgumentParser(description="How much of the gold reasoning of GSM8K or StreamingThinker "
                                    "files streams, and whether every gold episode is valid "
                                    "(and, for GSM8K, causal).")
    ap.add_argument("files", nargs="+", help="GSM8K JSON lines or StreamingThinker JSON files")
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
