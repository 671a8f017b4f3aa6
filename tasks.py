"""tasks.py — the synthetic streaming tasks [ours]: problems whose relevant chunks are known.

One-sentence events about people's counts of items ("You buy 3 apples.", "Ann loses 2 pens.",
"It starts to rain."); only some chunks matter for the question. The generator knows which, and
the count a right stream carries past every chunk, so *when* the model thinks (skip rates) and
what state it carries (``Problem.states``) can be measured. Tasks (``TASKS``): you (the default),
named, long, recover (HRPO's positive control), silent (a streaming mistake that costs nothing).

Design decisions
* The default target is "you": whether a chunk matters is visible in the chunk itself, so a ~1M
  parameter model spends its CPU minutes on when to think rather than on binding names (named is
  for pretrained models).
* The gold thinks on every chunk and recaps in the deep phase (StreamingThinker style), except a
  share ``terse`` of decisions written tersely, so that SFT already shows now and then what RL
  should reward: RL re-weights what it samples, it cannot invent it in a few hundred CPU steps.
* Every random draw uses its own random.Random seeded by a string: a seed gives the same
  problems on every machine; train and held-out splits share no problem.
"""
from __future__ import annotations

import random

from adasr import Problem

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
         "long": "your count over 8-12 chunks up to 20, then one more change in the deep phase",
         "recover": "your count; the gold stream misses half of your 'find' events and the deep "
                    "phase re-reads to recover (HRPO's positive control)",
         "silent": "your count; the gold stream slips on half of your events and the deep phase "
                   "always re-reads: a streaming mistake that costs neither accuracy nor latency"}
# Per task: chunks per problem (inclusive range), largest count, largest change of one event.
_TASK_SIZES = {"you": ((4, 7), 12, 4), "named": ((4, 7), 12, 4), "long": ((8, 12), 20, 5),
               "recover": ((5, 8), 12, 4), "silent": ((5, 8), 12, 4)}


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
    relevant, states = [True], [str(count)]
    thoughts = [f"{target} start{'s' if target != 'You' else ''} with {count}."]
    recap = [f"{target} started with {count}."]
    for _ in range(rng.randint(*n_chunks) - 1):
        if rng.random() < irrelevant:
            chunks.append(others(rng))
            relevant.append(False)
            # Drawn even when terse is 0 or 1, so that terse changes thoughts, never problems.
            skip = rng.random() < terse
            thoughts.append("" if skip else f"No change, still {count}.")
            states.append(str(count))
            continue
        verb, k = _change(rng, count, max_value, max_delta)
        sign, past = VERBS[verb]
        step = f"{count} {'+' if sign > 0 else '-'} {k} = {count + sign * k}."
        chunks.append(_event(rng, target, verb, k, item))
        relevant.append(True)
        thoughts.append(step)
        recap.append(f"{target} {past} {k}, so {step}")
        count += sign * k
        states.append(str(count))
    answer, last = count, []
    if then:
        sign = 1 if count == 0 or rng.random() < 0.5 else -1
        k = rng.randint(1, 9) if sign > 0 else rng.randint(1, count)
        answer = count + sign * k
        # The deep phase first restates the question's change in the question's own words, so
        # that reading the number off the question is a copy (the same words, then the number)
        # rather than a search for it from "Then 12 +"; docs/results.md.
        change = f"buy {k} more" if sign > 0 else f"give {k} away"
        last = [f"If you then {change}, {count} {'+' if sign > 0 else '-'} {k} = {answer}."]
    final = f"The answer is {answer}."
    # "Recap:" makes the full recap's first token the same for every problem, so that the SFT
    # model's most likely deep phase is the majority (full) one and the terse one stays the
    # minority alternative that sampling explores.
    rederive = " ".join(["Recap:"] + recap + last + [final])
    # [ours, measured] After a long stream the full recap re-derives 8-12 events from memory,
    # which the tiny model garbles (docs/results.md); the long task's recap restates the
    # tracked state instead. Read-then-think has no tracked state: it always re-derives.
    full = " ".join(["Recap:", f"You have {count}."] + last + [final]) if then else rederive
    deep = " ".join(last + [final]) if rng.random() < terse else full
    question = (f"How many {item[1]} does {target} have at the end?" if target != "You" else
                f"How many {item[1]} do you have at the end, if you then {change}?" if then else
                f"How many {item[1]} do you have at the end?")
    return Problem(id=f"synthetic/{key}", question=question, chunks=chunks, answer=str(answer),
                   relevant=relevant, thoughts=thoughts, deep=deep, rtt_deep=rederive,
                   states=states)


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


def _distractor(rng: random.Random, item: tuple[str, str], max_delta: int) -> str:
    """A chunk that does not matter to your count (tasks recover and silent): a filler (a
    third), or another person's event with your item."""
    if rng.randrange(3) == 2:
        return rng.choice(FILLERS).format(name=rng.choice(NAMES))
    return _event(rng, rng.choice(NAMES), rng.choice(("have", *VERBS)), rng.randint(1, max_delta), item)


def _recover(rng, key, sizes, irrelevant, terse, miss) -> Problem:
    """The positive control for HRPO [ours]: a stream whose quality varies on its own, and a
    deep phase that can make up for it at a price.

    The gold stream misses each "find" event with probability ``miss`` (it skips it, "" as for
    a chunk that does not matter) and tracks on from the count it believes, so the state it
    carries out is wrong; the deep phase then re-reads the whole stream ("Recap: ...")
    and answers right, but slowly — the user waits for the recap. When the stream missed
    nothing, the deep phase answers from it at once ("The answer is N."). Irrelevant chunks are
    always skipped, so the one streaming decision is whether to track a relevant event.

    An SFT model then samples, per group, streams that miss and streams that do not, largely
    independently of how its deep phase goes, and whether a stream was right is checkable
    (``Problem.state``): the case where a reward per phase should let the streaming tokens
    learn "never miss" faster than one verdict per rollout. ``terse`` is not used."""
    item = rng.choice(ITEMS)
    _, max_value, max_delta = sizes
    start = count = rng.randint(1, max_value)
    chunks, relevant, states = [_event(rng, "You", "have", count, item)], [True], [str(count)]
    events = []                              # (chunk index, verb, k, count before) of your events
    for _ in range(rng.randint(*sizes[0]) - 1):
        if rng.random() < irrelevant:
            chunks.append(_distractor(rng, item, max_delta))
            relevant.append(False)
            states.append(str(count))
            continue
        verb, k = _change(rng, count, max_value, max_delta)
        events.append((len(chunks), verb, k, count))
        chunks.append(_event(rng, "You", verb, k, item))
        relevant.append(True)
        count += VERBS[verb][0] * k
        states.append(str(count))
    # Each "find" event is missed with probability ``miss``, on its own: the SFT model then
    # learns a coin flip at every such chunk, so sampled streams miss often and the miss is
    # tied to a chunk the stream can learn to read (a miss at a random event was too rare to
    # sample: the first design, docs/positive_control.md).
    missed = {i for i, verb, _, _ in events if verb == "find" and rng.random() < miss}
    believed, thoughts, recap = start, [f"You start with {start}."], [f"You started with {start}."]
    by_chunk = {i: (verb, k, before) for i, verb, k, before in events}
    for i in range(1, len(chunks)):
        if i not in by_chunk:
            thoughts.append("")
            continue
        verb, k, before = by_chunk[i]
        sign, past = VERBS[verb]
        recap.append(f"You {past} {k}, so {before} {'+' if sign > 0 else '-'} {k} = {before + sign * k}.")
        if i in missed:
            thoughts.append("")
            continue
        thoughts.append(f"{believed} {'+' if sign > 0 else '-'} {k} = {believed + sign * k}.")
        believed += sign * k
    final = f"The answer is {count}."
    rederive = " ".join(["Recap:"] + recap + [final])
    return Problem(id=f"synthetic/{key}", question=f"How many {item[1]} do you have at the end?",
                   chunks=chunks, answer=str(count), relevant=relevant, thoughts=thoughts,
                   deep=rederive if missed else final, rtt_deep=rederive, states=states)


def _silent(rng, key, sizes, irrelevant, terse, slip) -> Problem:
    """[ours] A streaming mistake that costs neither correctness nor latency, which only a reward
    per phase or per chunk can see.

    The gold stream tracks your count but slips on each of your events with probability
    ``slip``: it writes one too many ("5 + 3 = 9.") and tracks on from there, so the state it
    carries out is wrong. Irrelevant chunks are always skipped. The deep phase always re-reads
    the stream ("Recap: ...", every event from the chunks, never from the thoughts) and answers
    right, in the same words whether the stream slipped or not: a slipped rollout has the same
    answer and the same latency (up to a digit's token) as a clean one, so the global reward,
    and GRPO, cannot tell them apart; R^s with the carried state (--stream-credit state) and the
    per-chunk rewards (--credit chunk) can. ``terse`` is not used."""
    item = rng.choice(ITEMS)
    _, max_value, max_delta = sizes
    count = believed = rng.randint(1, max_value)
    chunks, relevant, states = [_event(rng, "You", "have", count, item)], [True], [str(count)]
    thoughts, recap = [f"You start with {count}."], [f"You started with {count}."]
    for _ in range(rng.randint(*sizes[0]) - 1):
        if rng.random() < irrelevant:
            chunks.append(_distractor(rng, item, max_delta))
            relevant.append(False)
            thoughts.append("")
            states.append(str(count))
            continue
        verb, k = _change(rng, count, max_value, max_delta)
        sign, past = VERBS[verb]
        op = "+" if sign > 0 else "-"
        chunks.append(_event(rng, "You", verb, k, item))
        relevant.append(True)
        recap.append(f"You {past} {k}, so {count} {op} {k} = {count + sign * k}.")
        written = believed + sign * k + (rng.random() < slip)           # a slip: one too many
        thoughts.append(f"{believed} {op} {k} = {written}.")
        believed, count = written, count + sign * k
        states.append(str(count))
    rederive = " ".join(["Recap:"] + recap + [f"The answer is {count}."])
    return Problem(id=f"synthetic/{key}", question=f"How many {item[1]} do you have at the end?",
                   chunks=chunks, answer=str(count), relevant=relevant, thoughts=thoughts,
                   deep=rederive, rtt_deep=rederive, states=states)


_TASK_MAKERS = {"you": _you, "named": _named, "long": _long, "recover": _recover, "silent": _silent}


def make_synthetic(n: int, seed: int | str, *, task: str = "you", irrelevant: float = 0.4,
                   terse: float = 0.4, miss: float = 0.5) -> list[Problem]:
    """n synthetic problems of ``task`` (TASKS); problem i depends only on (seed, i) and the
    options.

    irrelevant: probability that an event (a chunk after the opening counts) does not matter.
    terse: probability, drawn independently per irrelevant chunk, that its gold thought is ""
        (skip), and per problem that the gold deep reasoning is only what the answer needs
        ("The answer is N.", or the difference for pair) instead of a full recap.
    miss: probability that the gold stream misses a "find" event (task recover) or slips on
        one of your events (task silent), each one on its own.

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
    if not (0 <= irrelevant <= 1 and 0 <= terse <= 1 and 0 <= miss <= 1):
        raise ValueError(f"irrelevant, terse and miss are probabilities, got {irrelevant}, {terse}, {miss}")
    # The task's name is not part of the key for "you", so that its problems stay those of
    # every earlier version of this file.
    prefix = "" if task == "you" else f"{task}/"
    extra = (miss,) if task in ("recover", "silent") else ()
    return [_TASK_MAKERS[task](random.Random(f"{prefix}{seed}/{i}"), f"{prefix}{seed}/{i}",
                               _TASK_SIZES[task], irrelevant, terse, *extra) for i in range(n)]


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


