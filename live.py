"""live.py — streams that arrive over time: sessions fed into the engine as their input comes, the
wall clock of each, and the terminal program.

* ``Session`` — one live stream: a ``rollout._Row`` whose chunks arrive from outside, the events it
  sends (the vocabulary of the server, after the realtime APIs: ``chunk.accepted``,
  ``input.committed``, ``thought.delta``, ``thought.done``/``thought.skip``, ``deep.delta``,
  ``deep.done``, ``answer.delta``, ``timings``, ``response.done``, ``error``) and the
  wall-clock second of every token.
* ``Live`` — the engine in a thread of its own. Other threads open sessions, append chunks, end
  the input and close sessions through a queue that the engine thread reads between steps; bad
  input is refused in the caller's thread, before it reaches the engine.
* ``timings`` — the wall clock of a finished session (residual latency = answer done − end of
  input, the paper's and LiveMind's definition; time to the first deep token; the decode rate the
  session saw) beside the simulated clock's figures for the same episode.
* ``main`` — ``python live.py --model DIR --stdin`` (a question, then one chunk a line, as the
  lines arrive), ``--replay FILE --wpm 150`` (a data file spoken at that rate), ``--problem``/
  ``--data`` (every chunk there at once: the simulated clock, as the RL rollout sees it).

Decisions: a session's events go to a queue of its own, so that one session never sees another's;
the engine thread never blocks on a client. Wall times are ``time.perf_counter()`` seconds since
the session opened.
"""
from __future__ import annotations

import json
import queue
import random
import secrets
import sys
import threading
import time
from dataclasses import dataclass

import torch

from adasr import BUDGET, DEEP, LAYOUTS, STREAM, Episode, Problem, Protocol
from checkpoint import add_markers, load_pretrained
from cli import THREADS, ArgumentParser, UserError, check_device, check_options, run_cli
from data import load_problems, marker_in, split_question
from rollout import Engine, _Row, check_context


class InputError(ValueError):
    """Input a session refuses (it is sent to the session as an ``error`` event too)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Full(Exception):
    """Every row of the engine is taken: retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


# ---------------------------------------------------------------------------------------------
# A session: one live stream
# ---------------------------------------------------------------------------------------------

class Session:
    """One live stream. The caller's thread appends input (under ``lock``); the engine thread
    grows the episode; both put events on ``events``, read by whoever serves the client."""

    def __init__(self, live: "Live", question: str, answer: str, rng: random.Random,
                 problem_id: str | None = None):
        self.id = secrets.token_urlsafe(16)           # unguessable: it is the session's key
        self.live, self.lock = live, threading.Lock()
        self.row = _Row(live.protocol, Problem(problem_id or "live", question, [], answer),
                        live.layout, rng, final=False)
        self.events: queue.Queue = queue.Queue()
        self.t0 = time.perf_counter()
        self.wall: list[float] = []                   # per token of the episode: fed / written
        self.arrived: list[float] = []                # per chunk: when it arrived
        self.closed: dict[int, float] = {}            # per chunk: when its thought closed
        self.end_s: float | None = None               # when the input ended
        self.final = False                            # input.commit final has come
        self.last_input = self.t0
        self.shown: list[int] = []                    # ids of the text being written
        self.text = ""                                # ... and what of it was sent
        self.answering = False                        # after <EOR>: the answer is being written
        self.sent: list[str] = []                     # the chunks accepted (the caller's copy)
        self.result: dict | None = None

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def emit(self, name: str, t: float | None = None, **data) -> None:
        """Send an event stamped ``t`` (now by default), seconds since the session opened."""
        self.events.put((name, {"t": round(self.now() if t is None else t, 4), **data}))

    def _delta(self, name: str, t: float, **data) -> None:
        """Send the text written since the last delta (whole characters only: a byte-level
        token may end inside one)."""
        text = self.live.protocol.text(self.shown)
        if not text.endswith("\ufffd") and len(text) > len(self.text):
            self.emit(name, t, delta=text[len(self.text):], **data)
            self.text = text

    def on_token(self) -> None:
        """The engine wrote a token (engine thread): stamp it and every token it let in, and
        send what it means — a thought's text, its end or a skip, the deep reasoning, its end
        (<EOR>), the answer; when the episode is finished, its timings and the result."""
        pr, ep, now = self.live.protocol, self.row.ep, self.now()
        for i in range(len(self.wall), len(ep.tokens)):
            self.wall.append(now)
            tok, chunk = ep.tokens[i], ep.chunk[i]
            if not ep.is_policy[i]:
                continue
            if ep.phase[i] == STREAM and tok == pr.eot:
                self.closed[chunk] = now
                thought = pr.text(self.shown).strip()
                self.emit("thought.done" if thought else "thought.skip", now, chunk=chunk,
                          **({"text": thought} if thought else {}))
                self.shown, self.text = [], ""
            elif tok == pr.eor and ep.phase[i] == DEEP:
                self.emit("deep.done", now, text=pr.text(self.shown).strip())
                self.shown, self.text, self.answering = [], "", True
            elif tok not in pr.markers and tok not in pr.stop_ids:
                self.shown.append(tok)
                if ep.phase[i] == STREAM:
                    self._delta("thought.delta", now, chunk=chunk)
                else:
                    self._delta("answer.delta" if self.answering else "deep.delta", now)
        if self.row.done:
            self.result = timings(self)
            p = ep.parsed
            self.emit("timings", now, **self.result)
            self.emit("response.done", now, answer=p.answer, deep=p.deep, thoughts=p.thoughts,
                      valid=p.valid, truncated=ep.truncated,
                      correct=ep.correct if ep.problem.answer else None)


def timings(s: Session) -> dict:
    """The wall clock of a finished session beside the simulated clock's figures for the same
    episode: at the protocol's decode rate, and at the rate the session saw."""
    ep = s.row.ep
    policy = [w for w, pol in zip(s.wall, ep.is_policy) if pol]
    deep = [w for w, pol, ph in zip(s.wall, ep.is_policy, ep.phase) if pol and ph == DEEP]
    # the decode rate: the gaps between consecutive tokens the model wrote, none of them a wait
    gaps = [b - a for a, b, p, q in zip(s.wall, s.wall[1:], ep.is_policy, ep.is_policy[1:])
            if p and q]
    tps = len(gaps) / sum(gaps) if gaps and sum(gaps) > 0 else None
    # a model that stops before the input ends (<EOA> inside a thought) kept no one waiting
    end = s.end_s if s.end_s is not None else (policy[-1] if policy else 0.0)
    at_measured = resimulate(ep, tps) if tps else None
    return {"residual_s": round(max(0.0, policy[-1] - end), 4) if policy else 0.0,
            "first_deep_token_s": round(deep[0] - end, 4) if deep else None,
            "end_of_input_s": round(s.end_s, 4) if s.end_s is not None else None,
            "answer_done_s": round(policy[-1], 4) if policy else None,
            "decode_tps": round(tps, 1) if tps else None,
            "chunks": [{"arrived_s": round(a, 4),
                        "thought_closed_s": round(s.closed[k], 4) if k in s.closed else None}
                       for k, a in enumerate(s.arrived)],
            "policy_tokens": len(policy), "residual_tokens": sum(1 for w in policy if w > end),
            "simulated": {"residual_s": round(ep.residual_s, 4), "residual_tokens": ep.residual_tokens,
                          "decode_tps": 1.0 / ep.token_s,
                          "residual_s_at_measured_tps": round(at_measured.residual_s, 4)
                          if at_measured else None}}


def resimulate(ep: Episode, decode_tps: float) -> Episode:
    """The same tokens on the simulated clock at another decode rate (adasr's clock, replayed)."""
    sim = Episode(ep.problem, ep.layout, ep.arrivals, 1.0 / decode_tps)
    for tok, pol, ph, ch in zip(ep.tokens, ep.is_policy, ep.phase, ep.chunk):
        sim.append([tok], policy=pol, phase=ph, chunk=ch)
    return sim


# ---------------------------------------------------------------------------------------------
# The engine in its own thread
# ---------------------------------------------------------------------------------------------

@dataclass
class Limits:
    """What protects the machine: rows (sessions at once), the tokens of a session (prompt,
    chunks, <EOI> and the policy's budget: the KV cache row), and the seconds a session may wait
    for its next input."""
    sessions: int = 64
    max_len: int = 1024
    budget: int = BUDGET
    idle_s: float = 60.0


class Live:
    """One Engine stepped by a thread of its own; sessions join and leave between its steps."""

    def __init__(self, model, protocol: Protocol, limits: Limits, *, layout: str = "stream",
                 temperature: float = 0.0, start: bool = True):
        self.protocol, self.limits, self.layout = protocol, limits, layout
        self.engine = Engine(model, protocol, slots=limits.sessions, max_len=limits.max_len,
                             budget=limits.budget, temperature=temperature, on_token=self._on_token)
        self.inbox: queue.Queue = queue.Queue()
        self.sessions: dict[str, Session] = {}        # every open session, by id
        self.by_row: dict[int, Session] = {}          # the sessions in the engine, by id(row)
        self.lock = threading.Lock()
        self.steps = self.rows_fed = 0                # meters: forwards, rows fed by them
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)
        if start:                                     # (a benchmark queues its sessions first)
            self.thread.start()

    # -- the callers' side (any thread) ----------------------------------------------------------
    def open(self, question: str, answer: str = "", seed: str = "0",
             problem_id: str | None = None) -> Session:
        """A new session with its question (and the reference answer, when known); its random
        stream is seeded by ``seed``. Raises InputError (a bad question) or Full."""
        question = question.strip()
        if not question:
            raise InputError("invalid_question", "the question is empty")
        if marker := marker_in(question):
            raise InputError("marker_in_input", f"the question holds the protocol marker {marker}: "
                             "markers are written by the protocol, never by the user")
        if (n := self.tokens(question, [])) + self.limits.budget > self.limits.max_len:
            raise InputError("context_overflow", f"the question takes {n} tokens with the prompt: "
                             f"with the budget of {self.limits.budget} it exceeds a session's "
                             f"{self.limits.max_len} tokens")
        s = Session(self, question, answer, random.Random(f"{seed}/0/0"), problem_id)
        with self.lock:
            if len(self.sessions) >= self.limits.sessions:
                raise Full(f"all {self.limits.sessions} sessions are taken", retry_after=5)
            self.sessions[s.id] = s
        s.emit("session.created", id=s.id, max_tokens=self.limits.max_len,
               budget=self.limits.budget, idle_timeout_s=self.limits.idle_s)
        self.inbox.put(("join", s))
        return s

    def append(self, s: Session, text: str) -> int:
        """The next chunk of ``s`` has arrived; returns its index. Bad input: InputError, also
        sent to the session as an ``error`` event."""
        with s.lock:
            t = s.now()
            try:
                if s.final:
                    raise InputError("input_after_end", "input_chunk.append after input.commit "
                                     "with final: the input of this session is over")
                if not text.strip():
                    raise InputError("empty_chunk", "the chunk is empty")
                if marker := marker_in(text):
                    raise InputError("marker_in_input", f"the chunk holds the protocol marker "
                                     f"{marker}: markers are written by the protocol, never by the user")
                n = self.tokens(s.row.ep.problem.question, s.sent + [text.strip()])
                if n + self.limits.budget > self.limits.max_len:
                    raise InputError("context_overflow", f"the chunk would overflow the session: "
                                     f"{n} observation tokens with it + the budget of "
                                     f"{self.limits.budget} exceed {self.limits.max_len}")
            except InputError as e:
                self.refuse(s, e)
            s.sent.append(text.strip())
            s.arrived.append(t)
            s.last_input = time.perf_counter()
            k = len(s.arrived) - 1
            s.emit("chunk.accepted", t, chunk=k, text=text.strip())
            self.inbox.put(("chunk", s, text.strip()))
            return k

    def end(self, s: Session) -> None:
        """The input of ``s`` is over (``input.commit`` with final)."""
        with s.lock:
            if s.final:
                self.refuse(s, InputError("input_after_end", "input.commit after input.commit "
                                          "with final: the input of this session is over"))
            s.final, s.end_s, s.last_input = True, s.now(), time.perf_counter()
            s.emit("input.committed", s.end_s, final=True)
            self.inbox.put(("end", s))

    def tokens(self, question: str, chunks: list[str]) -> int:
        """Observation tokens of a stream of these chunks, <EOI> included."""
        blocks = self.protocol.blocks(Problem("", question, chunks, ""), self.layout)
        return sum(len(ids) for ids, _ in blocks)

    def refuse(self, s: Session, e: InputError) -> None:
        s.emit("error", code=e.code, message=str(e))
        raise e

    def close(self, s: Session) -> None:
        """The client went away (or is done): free the row at the engine's next turn."""
        self.inbox.put(("leave", s))

    def stop(self) -> None:
        self.stopped = True
        self.inbox.put(("stop", None))
        self.thread.join()

    # -- the engine thread -------------------------------------------------------------------------
    def _on_token(self, row: _Row) -> None:
        s = self.by_row[id(row)]
        s.on_token()
        if row.done:
            self._drop(s)

    def _drop(self, s: Session) -> None:
        self.engine.leave(s.row)
        self.by_row.pop(id(s.row), None)
        with self.lock:
            self.sessions.pop(s.id, None)
        s.events.put(None)                            # the end of its event stream

    def _handle(self, item) -> None:
        kind, s = item[0], item[1]
        if kind == "join":
            if s.id in self.sessions:                 # not closed before its turn came
                self.by_row[id(s.row)] = s
                self.engine.join(s.row)
        elif kind == "chunk" and s.row.slot is not None:
            s.row.arrive(item[2])
        elif kind == "end" and s.row.slot is not None:
            s.row.end()
        elif kind == "leave" and s.id in self.sessions:
            self._drop(s)

    def _expire(self) -> None:
        """Close the sessions that waited for input longer than the idle timeout."""
        now = time.perf_counter()
        for s in list(self.sessions.values()):
            if not s.final and now - s.last_input > self.limits.idle_s and s.row.slot is not None:
                s.emit("error", code="idle_timeout", message=f"no input for {self.limits.idle_s:g} s: "
                       "the session is closed")
                self._drop(s)

    def _run(self) -> None:
        last_expiry = time.perf_counter()
        while not self.stopped:
            try:                                      # wait for input only when idle
                self._handle(self.inbox.get_nowait() if self.engine.busy
                             else self.inbox.get(timeout=0.5))
                while True:
                    self._handle(self.inbox.get_nowait())
            except queue.Empty:
                pass
            if time.perf_counter() - last_expiry > 0.5:
                self._expire()
                last_expiry = time.perf_counter()
            if self.engine.busy and self.engine.step():
                self.steps += 1                       # a forward ran: count it and its rows
                self.rows_fed += len(self.engine.fed)


# ---------------------------------------------------------------------------------------------
# The terminal: python live.py --model DIR (--stdin | --replay FILE | --problem TEXT | --data FILE)
# ---------------------------------------------------------------------------------------------

class LiveView:
    """Prints one session's events as they come: the question, chunk k once the thought before
    it is shown (with its arrival time: the wall clock's when live, else the simulated one),
    each thought as it is written (or the skip), the deep phase, and the ending — the simulated
    clock's latency, and the measured one when the stream was live."""

    def __init__(self, protocol: Protocol, s: Session, live: bool, out=sys.stdout):
        self.protocol, self.s, self.live, self.out = protocol, s, live, out
        self.chunks: list[tuple[float, str]] = []
        self.shown_chunks = self.shown_thoughts = 0
        self.writing = self.deep = False

    def print(self, text: str, end: str = "\n") -> None:
        print(text, end=end, file=self.out, flush=True)

    def _chunks(self) -> None:
        """Show the chunks whose turn it is: chunk k once thought k-1 is shown."""
        while self.shown_chunks < len(self.chunks) and self.shown_chunks <= self.shown_thoughts:
            t, text = self.chunks[self.shown_chunks]
            if not self.live:
                t = self.protocol.arrivals(self.s.row.ep.problem)[self.shown_chunks]
            self.print(f"[{t:6.1f}s] {text}")
            self.shown_chunks += 1

    def _text(self, prefix: str, delta: str) -> None:
        if not self.writing:
            self.print(prefix, end="")
            delta, self.writing = delta.lstrip(), True
        self.print(delta, end="")

    def __call__(self, name: str, d: dict) -> None:
        if name == "session.created":
            self.print(f"Question: {self.s.row.ep.problem.question}")
        elif name == "chunk.accepted":
            self.chunks.append((d["t"], d["text"]))
            if not self.writing:
                self._chunks()
        elif name == "thought.delta":
            self._chunks()
            self._text("          💭 ", d["delta"])
        elif name in ("thought.done", "thought.skip"):
            self.print("" if self.writing else self.protocol.thought_line(d.get("text", "")))
            self.writing = False
            self.shown_thoughts += 1
            self._chunks()
        elif name == "deep.delta":
            if not self.deep:
                self._chunks()
                ep = self.s.row.ep
                end = self.s.end_s if self.live else ep.arrivals[-1]
                self.print(f"[{end:6.1f}s] <end of input>")
                self.deep = True
            self._text("          🧠 ", d["delta"])
        elif name == "deep.done" and self.writing:
            self.print("")
            self.writing = False
        elif name == "response.done":
            if self.writing:
                self.print("")
            self._chunks()
            lines = self.protocol.ending_lines(self.s.row.ep)
            self.print("\n".join(lines[2:] if self.deep else lines))
            r = self.s.result
            if self.live:
                self.print(f"          measured: waited {r['residual_s']:.2f}s after the end of "
                           f"input ({r['residual_tokens']} tokens, {r['decode_tps'] or 0:.0f} "
                           f"tok/s); the simulated clock at that rate says "
                           f"{r['simulated']['residual_s_at_measured_tps'] or 0:.2f}s")
            self.print("")
        elif name == "error":
            self.print(f"error: {d['message']}")


def episode_record(s: Session) -> dict:
    """One machine-readable record of a finished session (``--json``)."""
    ep = s.row.ep
    p, ref = ep.parsed, ep.problem.answer
    return {"id": ep.problem.id, "question": ep.problem.question, "chunks": ep.problem.chunks,
            "thoughts": p.thoughts, "skips": p.skips, "deep": p.deep, "answer": p.answer,
            "reference": ref or None, "correct": ep.correct if ref else None,
            "format_valid": p.valid, "format_errors": p.stream_errors + p.deep_errors,
            "stream_tokens": ep.stream_tokens, "deep_tokens": ep.deep_tokens,
            "residual_tokens": ep.residual_tokens, "residual_s": round(ep.residual_s, 3),
            "truncated": ep.truncated, "wall": s.result}


def play(live: Live, problem: Problem, schedule, *, seed: str, show, json_out: bool) -> Session:
    """Run one problem through ``live``: its chunks sent at the seconds ``schedule`` gives (None:
    all at once), then the end of the input; events printed by ``show`` as they come."""
    s = live.open(problem.question, problem.answer, seed=seed, problem_id=problem.id)
    view = None if json_out else show(s)
    sender = threading.Thread(target=_send, args=(live, s, problem.chunks, schedule), daemon=True)
    sender.start()
    while (event := s.events.get()) is not None:
        if view is not None:
            view(*event)
    sender.join()
    return s


def _send(live: Live, s: Session, chunks: list[str], schedule) -> None:
    for k, chunk in enumerate(chunks):
        if schedule is not None:
            time.sleep(max(0.0, schedule[k] - s.now()))
        live.append(s, chunk)
    live.end(s)


def _read_stdin(live: Live, args, show) -> None:
    """A question, then one chunk a line as the lines arrive; an empty line or the end of the
    input ends the problem (the next line is a new question)."""
    s, printer, n = None, None, 0

    def drain(until_done: bool) -> None:
        while True:
            try:
                event = s.events.get(timeout=None if until_done else 0)
            except queue.Empty:
                return
            if event is None:
                return
            printer(*event)

    for line in iter(sys.stdin.readline, ""):
        line = line.strip()
        if s is None and line:
            try:
                s = live.open(line, seed=f"{args.seed}/{n}")
            except InputError as e:
                print(f"error: {e}", flush=True)
                continue
            printer = show(s)
        elif s is not None and line:
            try:
                live.append(s, line)
            except InputError:
                pass                                  # its error event is printed
        elif s is not None:
            live.end(s)
            drain(True)
            s, n = None, n + 1
        if s is not None:
            drain(False)
    if s is not None:
        live.end(s)
        drain(True)


def main(argv=None) -> None:
    ap = ArgumentParser(description="Run a model on a stream and show it as it happens.")
    ap.add_argument("--model", required=True, help="checkpoint directory, .gguf file or 'smollm2'")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--stdin", action="store_true",
                     help="live: a question line, then one chunk a line as the lines arrive")
    src.add_argument("--replay", metavar="FILE", help="live: a data file's problems spoken at --wpm")
    src.add_argument("--problem", help="free text; the asking sentence becomes the question "
                     "(every chunk there at once: the simulated clock)")
    src.add_argument("--data", help="StreamingThinker JSON or GSM8K JSONL file (every chunk there "
                     "at once)")
    ap.add_argument("--limit", type=int, default=None, help="first N problems of --data/--replay")
    ap.add_argument("--layout", default="stream", choices=LAYOUTS)
    ap.add_argument("--wpm", type=float, default=Protocol.WPM, help="words per minute of the stream")
    ap.add_argument("--decode-tps", type=float, default=Protocol.DECODE_TPS,
                    help="model tokens per second of the simulated clock")
    ap.add_argument("--budget", type=int, default=BUDGET, help="policy tokens per problem")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 is greedy decoding")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=THREADS, default=None, help="torch CPU threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true", help="one JSON record per problem")
    args = ap.parse_args(argv)
    check_options(args, [("--limit", args.limit is None or args.limit >= 1, "at least 1"),
                         ("--wpm", args.wpm > 0, "positive"),
                         ("--decode-tps", args.decode_tps > 0, "positive"),
                         ("--budget", args.budget >= 1, "at least 1"),
                         ("--temperature", args.temperature >= 0, "0 (greedy) or positive")])
    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    problems = []
    if args.problem is not None:
        if not args.problem.strip():
            raise UserError("option --problem is empty: give the problem's text")
        if marker := marker_in(args.problem):
            raise UserError(f"option --problem holds the protocol marker {marker}: the markers are "
                            "written by the protocol, never by the user")
        question, chunks = split_question(args.problem)
        problems = [Problem(id="cli", question=question, chunks=chunks, answer="")]
    elif args.data or args.replay:
        problems = load_problems(args.data or args.replay)[:args.limit]
    model, tok = load_pretrained(args.model, device=args.device)
    add_markers(model, tok)
    model.eval()
    protocol = Protocol(tok, wpm=args.wpm, decode_tps=args.decode_tps)
    check_context(model, protocol, problems, args.budget)
    live = Live(model, protocol, Limits(sessions=1, max_len=model.cfg.max_seq_len,
                                        budget=args.budget, idle_s=float("inf")),
                layout=args.layout, temperature=args.temperature)
    realtime = not (args.problem is not None or args.data)

    def show(s):
        return LiveView(protocol, s, live=realtime)
    try:
        if args.stdin:
            _read_stdin(live, args, show)
        for i, p in enumerate(problems):
            s = play(live, p, protocol.arrivals(p) if realtime else None, seed=f"{args.seed}/{i}",
                     show=show, json_out=args.json)
            if args.json:
                print(json.dumps(episode_record(s)), flush=True)
    finally:
        live.stop()


if __name__ == "__main__":
    run_cli(main)
