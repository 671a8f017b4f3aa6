"""tools/load_streams.py — N concurrent speakers against serve.py over loopback (a script, not a test).

    python -m tools.load_streams --model runs/default/hrpo --threads 1            # N = 1, 2, 4, ... until it breaks
    python -m tools.load_streams --model smollm2 --streams 1,2,4,8 --problems data/gsm8k/test.jsonl
    python -m tools.load_streams --model runs/default/hrpo --soak 1000 --threads 1   # the soak

Starts ``serve.py`` as its own process (the engine must not share this process's interpreter
lock with the speakers), then for each N runs N speakers at once: each replays held-out
problems one after another, every chunk sent when it would have been spoken at --wpm, the end
of input right after the last chunk, speakers starting at random moments of the first chunk.
Per N it prints, from the sessions' own ``timings`` events: p50 / p95 / max residual latency
(answer done − end of input), time from a chunk's arrival to its thought's end, the share of
sessions that kept up (every thought closed before the next chunk arrived), the decode rate a
session saw, the engine's tokens/s and rows fed per forward, and beside them the simulated
clock's residual for the same episodes (at its 20 tokens/s, and at the measured rate). It stops
once p95 residual passes 2x the one-stream figure. Prints this machine's matmul GFLOP/s.

``--soak N``: N sessions, --soak-at-once at a time, a third of them hanging up at a random moment,
one in ten sending three bad messages first; then checks that every session got one
acknowledgement per chunk, one error per bad message and one response (or hung up), that every
row is back, and the server's memory over time.
"""
from __future__ import annotations

import http.client
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from adasr import LAYOUTS
from cli import ArgumentParser, UserError, at_least, number_list, positive, run_cli
from report import matmul_gflops
from serve import held_out

REPO = Path(__file__).parent.parent


class Speaker:
    """One session over HTTP: opens it, sends the chunks on time, reads its events."""

    def __init__(self, port: int, problem: dict, wpm: float, model: str = "stream"):
        self.port, self.problem, self.wpm, self.model = port, problem, wpm, model
        self.events: list[tuple[str, dict]] = []
        self.acks = self.sent = 0
        self.refused = False
        self.created = threading.Event()

    def post(self, sid: str, body: dict | bytes) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("POST", f"/v1/sessions/{sid}", body if isinstance(body, bytes) else json.dumps(body))
        status = conn.getresponse().status
        conn.close()
        return status

    def run(self, hang_up_at: float | None = None, garbage: bool = False) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        conn.connect()
        sock = conn.sock                        # to hang up for real (the reader holds it open)
        conn.request("POST", "/v1/sessions", json.dumps({"question": self.problem["question"],
                                                         "answer": self.problem["answer"],
                                                         "model": self.model}))
        resp = conn.getresponse()
        if resp.status != 200:
            self.refused = True
            return
        reader = threading.Thread(target=self._read, args=(resp,), daemon=True)
        reader.start()
        self.created.wait()
        sid, t0 = self.events[0][1]["id"], time.perf_counter()
        if garbage:
            self.post(sid, b"\xff\xfe not utf-8")
            self.post(sid, {"type": "input_chunk.append", "text": "a <EOT> marker"})
            self.post(sid, {"type": "no.such.event"})
        words = 0
        for chunk in self.problem["chunks"]:
            words += len(chunk.split())
            due = t0 + words * 60.0 / self.wpm
            if hang_up_at is not None and due - t0 > hang_up_at:
                break
            time.sleep(max(0.0, due - time.perf_counter()))
            self.acks += self.post(sid, {"type": "input_chunk.append", "text": chunk}) == 200
            self.sent += 1
        else:
            self.post(sid, {"type": "input.commit", "final": True})
            reader.join()
            conn.close()
            return
        time.sleep(random.random())             # hang up while the model works, or waits
        sock.shutdown(socket.SHUT_RDWR)
        reader.join()
        resp.close()
        conn.close()

    def _read(self, resp) -> None:
        name = None
        try:
            for raw in resp:
                line = raw.decode()
                if line.startswith("event: "):
                    name = line[7:].strip()
                elif line.startswith("data: "):
                    self.events.append((name, json.loads(line[6:])))
                    self.created.set()
        except (OSError, ValueError):           # we hung up
            pass
        self.created.set()

    def result(self) -> dict | None:
        return next((d for n, d in self.events if n == "timings"), None)


def stats(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/v1/stats")
    out = json.loads(conn.getresponse().read())
    conn.close()
    return out


def start_server(args, sessions: int) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, str(REPO / "serve.py"), "--model", args.model, "--port", "0",
           "--sessions", str(sessions), "--max-tokens", str(args.max_tokens),
           "--budget", str(args.budget), "--threads", str(args.threads), "--layout", args.layout]
    if args.problems:
        cmd += ["--problems", args.problems]
    # the server's stderr goes to a file: a pipe nobody reads would block it once full
    log = open(Path(tempfile.gettempdir()) / "load_streams_server.log", "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO)
    line = proc.stdout.readline()
    if "http://" not in line:
        raise UserError(f"serve.py did not start: {line}{Path(log.name).read_text()}")
    return proc, int(line.split("http://")[1].split("/")[0].split(":")[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def level(port: int, problems: list[dict], n: int, per_speaker: int, wpm: float) -> dict:
    """N speakers at once, each ``per_speaker`` problems in a row; the figures of their sessions."""
    rng = random.Random(n)
    results: list[Speaker] = []

    def speaker(i: int) -> None:
        time.sleep(rng.random() * 2.0)          # speakers do not start in lockstep
        for j in range(per_speaker):
            sp = Speaker(port, problems[(i * per_speaker + j) % len(problems)], wpm)
            try:
                sp.run()
            except OSError:                     # a timeout or a reset: the session is lost
                pass
            results.append(sp)
    before = stats(port)["stream"]
    threads = [threading.Thread(target=speaker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = stats(port)["stream"]
    done = [r for sp in results if (r := sp.result())]
    lag = [c["thought_closed_s"] - c["arrived_s"] for r in done for c in r["chunks"]
           if c["thought_closed_s"] is not None]
    kept = [all(c["thought_closed_s"] is not None and c["thought_closed_s"] <= nxt["arrived_s"]
                for c, nxt in zip(r["chunks"], r["chunks"][1:])) for r in done
            if any(c["thought_closed_s"] is not None for c in r["chunks"])]   # read-then-think: none
    dt = after["time"] - before["time"]
    return {"n": n, "sessions": len(done), "lost": len(results) - len(done),
            "residual": [r["residual_s"] for r in done], "lag": lag,
            "kept": sum(kept) / len(kept) if kept else float("nan"),
            "tps": statistics.median([r["decode_tps"] for r in done if r["decode_tps"]] or [0]),
            "engine_tps": (after["tokens"] - before["tokens"]) / dt,
            "rows": (after["rows_fed"] - before["rows_fed"]) / max(1, after["steps"] - before["steps"]),
            "sim": [r["simulated"]["residual_s"] for r in done],
            "sim_measured": [r["simulated"]["residual_s_at_measured_tps"] or 0 for r in done]}


def soak(port: int, pid: int, problems: list[dict], n: int, wpm: float, seconds: float,
         at_once: int) -> None:
    """``n`` sessions, ``at_once`` at a time, for at most ``seconds``: a third hang up at a random
    moment, one in ten sends three bad messages first. Then the books: acknowledgements, answers,
    errors, rows, and the server's memory every 30 s."""
    rng = random.Random(0)
    t0 = time.perf_counter()
    memory = [(0.0, rss_mib(pid))]
    speakers: list[Speaker] = []
    lock = threading.Lock()
    todo = list(range(n))

    def worker() -> None:
        while time.perf_counter() - t0 < seconds:
            with lock:
                if not todo:
                    return
                i = todo.pop()
                sp = Speaker(port, problems[i % len(problems)], wpm)
                sp.hang = rng.random() * 8.0 if rng.random() < 1 / 3 else None
                sp.garbage = rng.random() < 0.1
                speakers.append(sp)
            sp.run(hang_up_at=sp.hang, garbage=sp.garbage)
    threads = [threading.Thread(target=worker) for _ in range(at_once)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(1.0)
        if time.perf_counter() - t0 > 30 * len(memory):
            memory.append((time.perf_counter() - t0, rss_mib(pid)))
    time.sleep(1.0)                             # the last hang-ups reach the engine
    st = stats(port)["stream"]
    memory.append((time.perf_counter() - t0, rss_mib(pid)))
    whole = [sp for sp in speakers if sp.hang is None and not sp.refused]
    names = {id(sp): [nm for nm, _ in sp.events] for sp in speakers}
    ok = [sp for sp in whole if names[id(sp)].count("response.done") == 1
          and names[id(sp)].count("chunk.accepted") == sp.sent == sp.acks == len(sp.problem["chunks"])
          and names[id(sp)].count("error") == (3 if sp.garbage else 0)]
    hung = [sp for sp in speakers if sp.hang is not None]
    acked = [sp for sp in hung if names[id(sp)].count("chunk.accepted") == sp.sent == sp.acks]
    print(f"soak: {len(speakers)} sessions in {time.perf_counter() - t0:.0f} s, {at_once} at a time, "
          f"{wpm:g} wpm; {len(hung)} hung up, {sum(sp.garbage for sp in speakers)} sent garbage, "
          f"{sum(sp.refused for sp in speakers)} refused")
    print(f"  of the {len(whole)} that spoke to the end, {len(ok)} got one acknowledgement per chunk, "
          f"one error per bad message and exactly one response; of the {len(hung)} that hung up, "
          f"{len(acked)} had every chunk they sent acknowledged once")
    print(f"  afterwards: {st['sessions']} sessions open, {st['rows_in_use']} of {st['rows']} rows in "
          f"use; server memory (MiB) at " + ", ".join(f"{t:.0f} s {m:.0f}" for t, m in memory))


def main(argv=None) -> None:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--layout", default="stream", choices=LAYOUTS, help="read_then_think for an RTT model")
    ap.add_argument("--problems", help="data file (default: the main job's held-out synthetic problems)")
    ap.add_argument("--streams", default=None, help="N to run (default 1, 2, 4, ... until it breaks)")
    ap.add_argument("--max-streams", type=at_least(1), default=256)
    ap.add_argument("--per-speaker", type=at_least(1), default=2, help="problems each speaker replays")
    ap.add_argument("--wpm", type=positive(float), default=150.0)
    ap.add_argument("--budget", type=at_least(1), default=160)
    ap.add_argument("--max-tokens", type=at_least(1), default=512)
    ap.add_argument("--threads", type=at_least(1), default=1, help="torch threads of the server")
    ap.add_argument("--soak", type=at_least(1), default=None, help="run the soak with N sessions")
    ap.add_argument("--soak-seconds", type=positive(float), default=290.0)
    ap.add_argument("--soak-at-once", type=at_least(1), default=48, help="soak sessions at a time")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    levels = number_list("--streams", args.streams, int) if args.streams else None
    problems = held_out(args.problems, 200)
    cap = max(levels) if levels else args.max_streams
    proc, port = start_server(args, 64 if args.soak else cap)
    try:
        print(f"model {args.model} ({args.layout}), server --threads {args.threads}, matmul "
              f"{matmul_gflops():.0f} GFLOP/s fp32 ({torch.get_num_threads()} thread), {args.wpm:g} wpm, "
              f"{args.per_speaker} problems per speaker, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        if args.soak:
            return soak(port, proc.pid, problems, args.soak, args.wpm, args.soak_seconds,
                        args.soak_at_once)
        print(f"{'N':>4} {'sess':>5} {'lost':>4} {'residual p50/p95/max s':>23} {'sim@20 p50':>10} "
              f"{'sim@meas p50':>12} {'chunk→thought p50/p95 s':>23} {'kept up':>7} "
              f"{'tok/s seen':>10} {'engine tok/s':>12} {'rows/fwd':>8}")
        first, n, todo = None, 1, list(levels or [])
        while True:
            if levels:
                if not todo:
                    break
                n = todo.pop(0)
            r = level(port, problems, n, args.per_speaker, args.wpm)
            res = r["residual"]
            print(f"{n:>4} {r['sessions']:>5} {r['lost']:>4} {pct(res, .5):7.2f} {pct(res, .95):7.2f} {max(res):7.2f} "
                  f"{pct(r['sim'], .5):10.2f} {pct(r['sim_measured'], .5):12.2f} "
                  f"{pct(r['lag'], .5):11.2f} {pct(r['lag'], .95):11.2f} {r['kept']:7.0%} "
                  f"{r['tps']:10.0f} {r['engine_tps']:12.0f} {r['rows']:8.1f}", flush=True)
            first = first or pct(res, .95)
            if levels is None:
                if pct(res, .95) > 2 * max(first, 0.05) or 2 * n > args.max_streams:
                    print(f"p95 residual past 2x the one-stream figure (or --max-streams): stops at N = {n}")
                    break
                n *= 2
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    run_cli(main)
