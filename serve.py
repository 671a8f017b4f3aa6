"""serve.py — the engine over HTTP: many live streams at once in one engine thread, each session's
events sent to its client as they happen (Server-Sent Events), and the page that shows them.

    python serve.py --model runs/default/hrpo [--rtt-model runs/compare/read_then_think] [--port 8000]

A client opens a session with its question and reads the answer of that request as an event
stream; it appends chunks and ends its input with POSTs naming the session. Names follow the
realtime APIs (OpenAI Realtime, vLLM /v1/realtime):

    POST /v1/sessions            {"question": "...", "model": "stream" | "rtt"}   -> event stream:
         session.created {id}, chunk.accepted, input.committed, thought.delta, thought.done |
         thought.skip, deep.delta, deep.done, answer.delta, timings, response.done; error
    POST /v1/sessions/ID         {"type": "input_chunk.append", "text": "One sentence."}
                                 {"type": "input.commit", "final": true}
    GET  /  (serve.html)   GET /v1/problems (held-out problems)   GET /v1/stats (the engine's meters)
    POST /v1/split {"text": ...} -> {"question", "chunks"} (data.split_question, for the page)

Decisions: the standard library only (ThreadingHTTPServer, a thread per connection; SSE is plain
HTTP that a browser reads with fetch). The handlers only validate and queue: the model runs in
the engine threads (live.Live). Closing the event stream closes the session and frees its row at
once. A session's id (secrets.token_urlsafe) is its only key. Limits: sessions (a full server
answers 503 with Retry-After, it never queues), a message's bytes, a session's tokens (its KV
cache row), an idle timeout. Binds 127.0.0.1 unless --host says otherwise.
"""
from __future__ import annotations

import json
import select
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from adasr import BUDGET, LAYOUTS, Protocol
from checkpoint import add_markers, load_pretrained
from cli import ArgumentParser, UserError, at_least, check_device, checked, positive, run_cli
from data import load_problems, marker_in, split_question
from live import Full, InputError, Limits, Live, Session
from tasks import synthetic_splits

PAGE = Path(__file__).parent / "serve.html"


class Server(ThreadingHTTPServer):
    """The HTTP server: its engines (``stream``, and ``rtt`` when a read-then-think model is
    served), the open sessions by id, and the problems the page offers."""
    daemon_threads = True
    request_queue_size = 256                # the listen backlog: many clients connect at once

    def __init__(self, address, engines: dict[str, Live], problems: list[dict], *,
                 max_bytes: int = 16384, heartbeat_s: float = 15.0):
        super().__init__(address, Handler)
        self.engines, self.problems = engines, problems
        self.max_bytes, self.heartbeat_s = max_bytes, heartbeat_s
        self.sessions: dict[str, Session] = {}
        self.lock = threading.Lock()

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)      # a client that hung up is no error

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        for live in self.engines.values():
            live.stop()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"           # keep-alive for the POSTs of a session's input
    server: Server

    def log_message(self, *args):           # quiet: a load test makes thousands of requests
        pass

    # -- replies -----------------------------------------------------------------------------
    def reply(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def error(self, status: int, code: str, message: str, s: Session | None = None,
              headers: dict | None = None) -> None:
        """An error reply; with a session, also an ``error`` event on its stream."""
        if s is not None:
            s.emit("error", code=code, message=message)
        self.reply(status, {"type": "error", "error": {"code": code, "message": message}}, headers)

    def body(self, s: Session | None = None) -> dict | None:
        """The request's JSON object, or None after an error reply naming what is wrong."""
        n = int(self.headers.get("Content-Length") or 0)
        if n > self.server.max_bytes:
            self.close_connection = True     # the body is not read: the connection is spent
            self.error(413, "message_too_large", f"the message has {n} bytes, the limit is "
                       f"{self.server.max_bytes}", s)
            return None
        raw = self.rfile.read(n)
        try:
            body = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            self.error(400, "invalid_utf8", f"the message is not UTF-8 ({e.reason} at byte {e.start})", s)
            return None
        except json.JSONDecodeError as e:
            self.error(400, "invalid_json", f"the message is not JSON: {e}", s)
            return None
        if not isinstance(body, dict):
            self.error(400, "invalid_json", "the message must be a JSON object", s)
            return None
        return body

    # -- routes ------------------------------------------------------------------------------
    def do_GET(self):
        if self.path in ("/", "/index.html") or self.path.startswith("/?"):
            data = PAGE.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif self.path == "/v1/problems":
            self.reply(200, {"problems": self.server.problems,
                             "models": list(self.server.engines)})
        elif self.path == "/v1/stats":
            self.reply(200, {name: stats(live) for name, live in self.server.engines.items()})
        else:
            self.error(404, "not_found", f"no such path: {self.path}")

    def do_POST(self):
        if self.path == "/v1/sessions":
            return self.open_session()
        if self.path == "/v1/split":
            return self.split()
        prefix = "/v1/sessions/"
        with self.server.lock:
            s = self.server.sessions.get(self.path[len(prefix):]) if self.path.startswith(prefix) else None
        if s is None:                        # no other session is named, not even to say it exists
            self.body()
            return self.error(404, "session_not_found", "no open session has this id")
        body = self.body(s)
        if body is None:
            return
        kind = body.get("type")
        try:
            if kind == "input_chunk.append":
                text = body.get("text")
                if not isinstance(text, str):
                    return self.error(400, "invalid_event", "input_chunk.append needs a string 'text'", s)
                return self.reply(200, {"type": "chunk.accepted", "chunk": s.live.append(s, text)})
            if kind == "input.commit":
                if body.get("final") is not True:
                    return self.error(400, "invalid_event", "input.commit needs \"final\": true: a "
                                      "chunk is committed by input_chunk.append", s)
                s.live.end(s)
                return self.reply(200, {"type": "input.committed", "final": True})
        except InputError as e:              # its error event is on the session's stream already
            return self.reply(400, {"type": "error", "error": {"code": e.code, "message": str(e)}})
        self.error(400, "unknown_event", f"unknown event type {kind!r}: expected "
                   "input_chunk.append or input.commit", s)

    def split(self):
        """A pasted problem as the question and its chunks (data.split_question), for the page."""
        body = self.body()
        if body is None:
            return
        text = body.get("text")
        if not isinstance(text, str) or marker_in(text):
            return self.error(400, "invalid_text", "split needs a string 'text' without "
                              "protocol markers")
        try:
            question, chunks = split_question(text)
        except UserError as e:
            return self.error(400, "invalid_text", str(e))
        self.reply(200, {"question": question, "chunks": chunks, "answer": ""})

    def open_session(self):
        body = self.body()
        if body is None:
            return
        question, name = body.get("question"), body.get("model", "stream")
        live = self.server.engines.get(name)
        if live is None:
            return self.error(400, "unknown_model", f"no model {name!r} here: "
                              f"{', '.join(sorted(self.server.engines))}")
        if not isinstance(question, str):
            return self.error(400, "invalid_question", "session needs a string 'question'")
        try:
            s = live.open(question, str(body.get("answer", "")), seed=str(body.get("seed", 0)))
        except Full as e:
            return self.error(503, "server_full", f"{e}; retry in {e.retry_after} s",
                              headers={"Retry-After": str(e.retry_after)})
        except InputError as e:
            return self.error(400, e.code, str(e))
        with self.server.lock:
            self.server.sessions[s.id] = s
        try:
            self.stream(s)
        finally:
            with self.server.lock:
                self.server.sessions.pop(s.id, None)
            live.close(s)                    # a no-op when the session finished

    def stream(self, s: Session) -> None:
        """Send the session's events as they come until its response is done; a client that goes
        away ends it (and frees the row) as soon as it is noticed: at the next event, or within a
        quarter second while the session waits."""
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.flush()
        beat = time.monotonic()
        try:
            while True:
                try:
                    event = s.events.get(timeout=0.25)
                except Exception:            # queue.Empty: nothing to send, is the client there?
                    if self.gone():
                        return
                    if time.monotonic() - beat > self.server.heartbeat_s:
                        self.wfile.write(b": ping\n\n")
                        self.wfile.flush()
                        beat = time.monotonic()
                    continue
                if event is None:
                    return
                name, data = event
                self.wfile.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
                self.wfile.flush()
                beat = time.monotonic()
        except (BrokenPipeError, ConnectionResetError):
            return

    def gone(self) -> bool:
        """Whether the client closed its end (readable with nothing to read). poll, not select:
        select cannot watch a descriptor above 1023, and a busy server has more."""
        try:
            poll = select.poll()
            poll.register(self.connection, select.POLLIN)
            return bool(poll.poll(0)) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True


def stats(live: Live) -> dict:
    """The engine's meters: sessions open, rows, forwards, tokens computed, rows fed per forward."""
    e = live.engine
    return {"sessions": len(live.sessions), "rows": len(e.rows), "rows_in_use": len(e.live),
            "steps": live.steps,
            "tokens": e.tokens, "rows_fed": live.rows_fed, "time": time.perf_counter()}


def held_out(path: str | None, n: int) -> list[dict]:
    """Problems the page offers: the first n of a data file, or the main job's held-out synthetic
    problems (seed 0)."""
    problems = load_problems(path)[:n] if path else synthetic_splits(6000, n, 0)[1]
    return [{"id": p.id, "question": p.question, "chunks": p.chunks, "answer": p.answer}
            for p in problems]


def load_engine(path: str, args, layout: str) -> Live:
    model, tok = load_pretrained(path, device=args.device)
    add_markers(model, tok)
    model.eval()
    protocol = Protocol(tok, wpm=args.wpm, decode_tps=args.decode_tps)
    limits = Limits(sessions=args.sessions, max_len=min(args.max_tokens, model.cfg.max_seq_len),
                    budget=args.budget, idle_s=args.idle_timeout)
    if limits.max_len <= args.budget + 64:
        raise UserError(f"option --max-tokens = {args.max_tokens}: a session needs room for the "
                        f"prompt and its chunks beyond the --budget of {args.budget}")
    return Live(model, protocol, limits, layout=layout, temperature=args.temperature)


def main(argv=None) -> None:
    ap = ArgumentParser(description="Serve a model to live streams: HTTP + Server-Sent Events.")
    ap.add_argument("--model", required=True, help="checkpoint directory, .gguf file or 'smollm2'")
    ap.add_argument("--layout", default="stream", choices=LAYOUTS, help="the layout of --model")
    ap.add_argument("--rtt-model", help="a read-then-think model served beside it ('rtt')")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=at_least(0), default=8000)
    ap.add_argument("--sessions", type=at_least(1), default=64, help="rows: sessions at once")
    ap.add_argument("--max-tokens", type=at_least(1), default=1024,
                    help="tokens of a session (its KV cache row; at most the model's context)")
    ap.add_argument("--max-bytes", type=at_least(64), default=16384, help="bytes of a message")
    ap.add_argument("--idle-timeout", type=positive(float), default=60.0,
                    help="seconds a session may wait for its next input")
    ap.add_argument("--budget", type=at_least(1), default=BUDGET, help="policy tokens per session")
    ap.add_argument("--temperature", type=checked(float, lambda v: v >= 0, "0 (greedy) or positive"),
                    default=0.0)
    ap.add_argument("--wpm", type=positive(float), default=Protocol.WPM,
                    help="words per minute of the simulated clock")
    ap.add_argument("--decode-tps", type=positive(float), default=Protocol.DECODE_TPS,
                    help="tokens per second of the simulated clock")
    ap.add_argument("--problems", help="data file of the problems the page offers "
                    "(default: the main job's held-out synthetic problems)")
    ap.add_argument("--threads", type=positive(int), default=None, help="torch CPU threads")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    engines = {"stream": load_engine(args.model, args, args.layout)}
    if args.rtt_model:
        engines["rtt"] = load_engine(args.rtt_model, args, "read_then_think")
    server = Server((args.host, args.port), engines, held_out(args.problems, 20),
                    max_bytes=args.max_bytes)
    print(f"serving {args.model} on http://{args.host}:{server.server_address[1]}/ "
          f"({args.sessions} sessions of {engines['stream'].limits.max_len} tokens)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    run_cli(main)
