"""Tests of data.py (to be merged into test_adasr.py under a "data.py" section)."""

import json
import re
from pathlib import Path

import pytest

from data import (DataError, load_gsm8k, load_problems, load_streamingthinker, make_synthetic,
                  split_question, split_sentences, synthetic_splits)

DATA = Path(__file__).parent.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA}")


# --- sentences ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, sentences", [
    ("Tom has 3.5 kg. He eats 1.", ["Tom has 3.5 kg.", "He eats 1."]),
    ("A pen costs $1.50. A book costs $12.25. What is the total?",
     ["A pen costs $1.50.", "A book costs $12.25.", "What is the total?"]),
    ("Mr. Smith met Dr. Jones on Main St. Then they left.",
     ["Mr. Smith met Dr. Jones on Main St. Then they left."]),
    ("She left at 5 p.m. and came back. Wow! Is it late?",
     ["She left at 5 p.m. and came back.", "Wow!", "Is it late?"]),
    ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
    ("A.\n\n  B  has 2.", ["A.", "B has 2."]),
    ("Tom has 5 apples", ["Tom has 5 apples"]),
    ("   ", []),
])
def test_split_sentences(text, sentences):
    assert split_sentences(text) == sentences


@pytest.mark.parametrize("text, question, chunks", [
    ("Tom has 5 apples. He eats 2. How many are left?",
     "How many are left?", ["Tom has 5 apples.", "He eats 2."]),
    ("How many are left? Tom had 5. He ate 2.", "How many are left?", ["Tom had 5.", "He ate 2."]),
    ("Tom has 5. How many if he eats 2? Assume he eats all.",
     "How many if he eats 2?", ["Tom has 5.", "Assume he eats all."]),
    ("Tom has 5 pens. Find the number of pens left.", "Find the number of pens left.",
     ["Tom has 5 pens."]),
    ("What is 2+2? What is 3+3?", "What is 3+3?", ["What is 2+2?"]),
    ("Tom has 5 apples. He eats 2.", "He eats 2.", ["Tom has 5 apples."]),
    ("How many?", "How many?", []),
])
def test_split_question(text, question, chunks):
    assert split_question(text) == (question, chunks)


def test_split_question_rejects_empty_text():
    with pytest.raises(DataError, match="no sentences"):
        split_question(" \n ")


# --- loaders on the shared files ---------------------------------------------------------------

@needs_data
def test_gsm8k_first_records():
    problems = load_gsm8k(DATA / "gsm8k" / "train.jsonl")
    first, second = problems[:2]
    assert first.id == "train.jsonl:1"
    assert first.question == "How many clips did Natalia sell altogether in April and May?"
    assert first.chunks == ["Natalia sold clips to 48 of her friends in April, "
                            "and then she sold half as many clips in May."]
    assert first.answer == "72"
    assert first.deep == first.rtt_deep == (
        "Natalia sold 48/2 = 24 clips in May. "
        "Natalia sold 48+24 = 72 clips altogether in April and May.")
    assert first.thoughts is None and first.relevant is None
    assert second.question == "How much did she earn?"
    assert second.chunks == ["Weng earns $12 an hour for babysitting.",
                             "Yesterday, she just did 50 minutes of babysitting."]
    assert second.answer == "10"


@needs_data
@pytest.mark.parametrize("name, count", [("train.jsonl", 7473), ("test.jsonl", 1319)])
def test_gsm8k_loads_whole_files(name, count):
    problems = load_problems(DATA / "gsm8k" / name)
    assert len(problems) == count
    assert all(p.question and re.fullmatch(r"-?\d+(\.\d+)?", p.answer) for p in problems)


@needs_data
@pytest.mark.parametrize("name", ["example_D2.json", "example_D3.json"])
def test_streamingthinker_samples(name):
    problems = load_streamingthinker(DATA / "streamingthinker" / name)
    assert [p.answer for p in problems] == ["285", "5"]
    assert load_problems(DATA / "streamingthinker" / name) == problems
    for p in problems:
        assert len(p.thoughts) == len(p.chunks) == 3 and all(p.thoughts)
        assert p.relevant is None
        assert p.rtt_deep == " ".join(p.thoughts + [p.deep])
        for text in [p.question, p.deep, *p.chunks, *p.thoughts]:
            assert "<EO" not in text
    goblins = problems[0]
    assert goblins.question == "How many goblins each person have slew on average?"
    assert goblins.chunks[1] == ("Using a rusty iron axe, "
                                 "Andre slew nine times as many goblins as Diego.")
    assert goblins.thoughts[1].endswith("so 80 × 9 = 720 goblins.")  # the question-thought is gone
    assert goblins.deep.endswith("sums to the total before dividing.")  # text after <EOR> is not


# --- loaders on broken files -------------------------------------------------------------------

GOOD_GSM8K = {"question": "Tom has 5 apples. How many?", "answer": "5 apples.\n#### 5"}
GOOD_ST = {"Instruct_Context": {"context": "Tom has 5.<EOS> He eats 2.<EOS>",
                                "instruct": "How many are left?"},
           "streaming_reasoning": "The question asks how many.<EOQ> Start 5.<EOT> 5 - 2 = 3.<EOT>",
           "deep_reasoning": "5 - 2 = 3. <EOR> The answer is \\box{3}.<EOA>",
           "answer": "\\boxed{3}"}


def write_jsonl(path, lines):
    """Write records (dicts, or raw strings written as they are) one per line."""
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


@pytest.mark.parametrize("lines, substrings", [
    ([GOOD_GSM8K, '{"question": "x", '], [":2:", "malformed JSON"]),
    ([GOOD_GSM8K, {"answer": "#### 3"}], [":2:", "missing field 'question'"]),
    ([GOOD_GSM8K, {"question": "  ", "answer": "#### 3"}], [":2:", "field 'question' is empty"]),
    ([GOOD_GSM8K, {"question": "How many?", "answer": ""}], [":2:", "field 'answer' is empty"]),
    ([GOOD_GSM8K, GOOD_GSM8K, {"question": "How many?", "answer": "It is 3."}],
     [":3:", "field 'answer' does not end with '#### N'"]),
    ([GOOD_GSM8K, {"question": "How many?", "answer": "#### three"}],
     [":2:", "field 'answer' does not end with '#### N'"]),
    ([GOOD_GSM8K, {"question": "How many?", "answer": 3}],
     [":2:", "field 'answer' is not a string"]),
    ([GOOD_GSM8K, [1, 2]], [":2:", "expected a JSON object"]),
])
def test_gsm8k_errors_name_file_line_field(tmp_path, lines, substrings):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as error:
        load_gsm8k(path)
    for s in [str(path)] + substrings:
        assert s in str(error.value)


def st_record(**changes):
    """GOOD_ST with top-level fields replaced (None deletes) and "context"/"instruct" changed."""
    record = json.loads(json.dumps(GOOD_ST))
    for key, value in changes.items():
        target = record["Instruct_Context"] if key in ("context", "instruct") else record
        if value is None:
            del target[key]
        else:
            target[key] = value
    return record


@pytest.mark.parametrize("record, substrings", [
    (st_record(streaming_reasoning="Q.<EOQ> Start 5.<EOT>"),
     ["record 1", "field 'streaming_reasoning'", "1 thoughts", "2 context sentences"]),
    (st_record(instruct=""), ["record 1", "field 'Instruct_Context.instruct' is empty"]),
    (st_record(context=None), ["record 1", "missing field 'Instruct_Context.context'"]),
    (st_record(answer="\\boxed{3"), ["record 1", "field 'answer'", "unclosed"]),
    (st_record(deep_reasoning="5 - 2 = 3. The answer is 3."),
     ["record 1", "field 'deep_reasoning'", "no <EOR>"]),
    (st_record(deep_reasoning="5 <EOF> 3. <EOR>"), ["record 1", "<EOF>", "deep"]),
])
def test_streamingthinker_errors_name_file_record_field(tmp_path, record, substrings):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([GOOD_ST, record]))
    with pytest.raises(DataError) as error:
        load_problems(path)
    for s in [str(path)] + substrings:
        assert s in str(error.value)


def test_streamingthinker_json_lines_and_boxes(tmp_path):
    path = write_jsonl(tmp_path / "st.jsonl", [GOOD_ST, st_record(answer="\\boxed{\\frac{3}{4}}"),
                                               st_record(answer="12")])
    problems = load_problems(path)
    assert [p.answer for p in problems] == ["3", "\\frac{3}{4}", "12"]
    assert [p.id for p in problems] == ["st.jsonl:1", "st.jsonl:2", "st.jsonl:3"]
    assert problems[0].thoughts == ["Start 5.", "5 - 2 = 3."]
    assert problems[0].deep == "5 - 2 = 3."
    assert problems[0].rtt_deep == "Start 5. 5 - 2 = 3. 5 - 2 = 3."


def test_missing_file_and_unrecognised_format(tmp_path):
    with pytest.raises(DataError, match="no such file") as error:
        load_problems(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(error.value)
    path = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "x", "label": 1}])
    with pytest.raises(DataError) as error:
        load_problems(path)
    for s in ["other.jsonl:1", "unrecognised", "Instruct_Context", "question", "#### N"]:
        assert s in str(error.value)
    with pytest.raises(DataError, match="no records"):
        load_problems(write_jsonl(tmp_path / "empty.jsonl", []))


def test_skip_bad_reports_the_count(tmp_path):
    no_hashes = {"question": "How many?", "answer": "3"}
    path = write_jsonl(tmp_path / "mixed.jsonl", [GOOD_GSM8K, "not json", no_hashes, GOOD_GSM8K])
    with pytest.warns(UserWarning) as caught:
        problems = load_gsm8k(path, skip_bad=True)
    assert [p.id for p in problems] == ["mixed.jsonl:1", "mixed.jsonl:4"]
    message = str(caught[0].message)
    assert f"skipped 2 of 4 records in {path}: first error" in message and ":2:" in message


# --- the synthetic task ------------------------------------------------------------------------

EVENT = re.compile(r"(\w+) (has|buys|finds|loses|gives) (\d+) (\w+)(?: to (\w+))?\.")


def simulate(problem):
    """Re-derive (answer, relevant flags) from the sentences alone, independently of data.py."""
    asked = re.fullmatch(r"How many (\w+) does (\w+) have at the end\?", problem.question)
    item, target = asked.groups()
    count, relevant = None, []
    for i, chunk in enumerate(problem.chunks):
        m = EVENT.fullmatch(chunk)
        mine = bool(m) and m[1] == target and m[4].rstrip("s") == item.rstrip("s")
        assert m is None or m[5] != target, "nobody gives to the target"
        assert mine or i > 0, "the first chunk states the target's count"
        if mine:
            k = int(m[3])
            count = k if m[2] == "has" else count + (k if m[2] in ("buys", "finds") else -k)
            assert 0 <= count <= 20
        relevant.append(mine)
    return str(count), relevant


def test_synthetic_is_deterministic_and_seed_dependent():
    assert make_synthetic(50, 3) == make_synthetic(50, 3)
    assert make_synthetic(5, 3) == make_synthetic(50, 3)[:5]  # problem i depends on (seed, i) only
    assert make_synthetic(50, 3) != make_synthetic(50, 4)


def test_synthetic_answers_and_flags_match_a_resimulation():
    for p in make_synthetic(500, 0):
        assert (p.answer, p.relevant) == simulate(p)
        assert 4 <= len(p.chunks) <= 7
        assert len(p.thoughts) == len(p.relevant) == len(p.chunks)
        for thought, relevant in zip(p.thoughts[1:], p.relevant[1:]):
            running = re.fullmatch(r"\d+ [+-] \d+ = (\d+)\.|No change, still (\d+)\.|", thought)
            assert running and (relevant == (running[1] is not None))
        assert [t for t in p.thoughts if t][-1].endswith(f" {p.answer}.")  # copyable state
        assert p.rtt_deep.endswith(f"The answer is {p.answer}.")
        assert p.deep in (p.rtt_deep, f"The answer is {p.answer}.")


@pytest.mark.parametrize("share", [0.0, 0.4, 0.8])
def test_synthetic_irrelevant_share(share):
    events = [r for p in make_synthetic(1000, 1, irrelevant=share) for r in p.relevant[1:]]
    assert abs(events.count(False) / len(events) - share) < 0.03


def test_synthetic_terse_changes_thoughts_only():
    full, terse = make_synthetic(300, 2, terse=0.0), make_synthetic(300, 2, terse=0.5)
    assert [(p.question, p.chunks, p.answer) for p in full] == \
           [(p.question, p.chunks, p.answer) for p in terse]
    assert all(all(p.thoughts) and p.deep == p.rtt_deep for p in full)
    skips = [t == "" for p in terse for t, r in zip(p.thoughts, p.relevant) if not r]
    assert 0.4 < sum(skips) / len(skips) < 0.6
    assert all(t for p in terse for t, r in zip(p.thoughts, p.relevant) if r)  # relevant: always
    assert 0.4 < sum(p.deep != p.rtt_deep for p in terse) / len(terse) < 0.6


def test_synthetic_splits_are_disjoint():
    train, test = synthetic_splits(2000, 300, seed=0)
    assert len(train) == 2000 and len(test) == 300
    keys = {(p.question, tuple(p.chunks)) for p in train}
    assert not any((p.question, tuple(p.chunks)) in keys for p in test)
    assert {p.id.split("/")[2] for p in train} == {"train"}
    assert {p.id.split("/")[2] for p in test} == {"test"}
    # With a tiny problem space the overlap is real and must be filtered out.
    small = dict(n_chunks=(1, 2), max_value=3, irrelevant=0.0)
    train, test = synthetic_splits(300, 50, seed=0, **small)
    keys = {(p.question, tuple(p.chunks)) for p in train}
    assert len(test) == 50 and not any((p.question, tuple(p.chunks)) in keys for p in test)
    assert test != make_synthetic(50, "0/test", **small)  # some candidates were passed over
