"""tools/bench_engine.py — the live engine's tokens/s at N busy rows against the RL rollout's (a script, not a test).

    python -m tools.bench_engine --model runs/default/hrpo --rows 32 --threads 1

The same N held-out problems, greedy (so both write the same tokens), every chunk there at once:
once through ``rollout()``, then as N live sessions (live.Live: the engine in its thread, each
token stamped and turned into events), all queued before the engine starts so that N rows are
busy from the first step: once with the events left unread, once read by a thread per session
as serve.py's handlers read them (each event wakes its reader, which takes the interpreter lock). Prints
tokens/s (all tokens after the prompts, policy and observations) of each, medians of --repeats
interleaved runs, and their ratio, beside this machine's matmul GFLOP/s.
"""
from __future__ import annotations

import statistics
import threading
import time

import torch

from adasr import Problem, Protocol
from checkpoint import add_markers, load_pretrained
from cli import ArgumentParser, at_least, run_cli
from live import Limits, Live
from report import matmul_gflops
from rollout import rollout
from serve import held_out


def main(argv=None) -> None:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--problems", help="data file (default: the main job's held-out synthetic problems)")
    ap.add_argument("--rows", type=at_least(1), default=32)
    ap.add_argument("--budget", type=at_least(1), default=160)
    ap.add_argument("--repeats", type=at_least(1), default=5)
    ap.add_argument("--threads", type=at_least(1), default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_pretrained(args.model)
    add_markers(model, tok)
    model.eval()
    protocol = Protocol(tok)
    problems = [Problem(p["id"], p["question"], p["chunks"], p["answer"])
                for p in held_out(args.problems, args.rows)]

    def ours() -> int:
        episodes = rollout(model, protocol, problems, budget=args.budget, temperature=0.0)
        return sum(len(ep.tokens) - ep.prompt_len for ep in episodes)

    def served(readers: bool) -> int:
        # every session queued before the engine starts: N rows busy from the first step
        live = Live(model, protocol, Limits(sessions=args.rows, max_len=1024, budget=args.budget),
                    start=False)
        sessions = [live.open(p.question, p.answer) for p in problems]

        def client(s):                          # reads its events as the server's handler would
            while s.events.get() is not None:
                pass
        threads = [threading.Thread(target=client, args=(s,)) for s in sessions] if readers else []
        for t in threads:
            t.start()
        for s, p in zip(sessions, problems):
            for chunk in p.chunks:
                live.append(s, chunk)
            live.end(s)
        live.thread.start()
        for t in threads:
            t.join()
        while live.sessions:                    # without readers: until every session is done
            time.sleep(0.001)
        live.stop()
        return sum(len(s.row.ep.tokens) - s.row.ep.prompt_len for s in sessions)

    runs = []
    for _ in range(args.repeats):
        row = []
        for fn in (ours, lambda: served(False), lambda: served(True)):
            t = time.perf_counter()
            n = fn()
            row.append(n / (time.perf_counter() - t))
        runs.append(row)
    r_tps, l_tps, c_tps = (statistics.median(col) for col in zip(*runs))
    print(f"model {args.model}: {args.rows} rows, greedy, budget {args.budget}, {args.threads} "
          f"thread(s), matmul {matmul_gflops():.0f} GFLOP/s fp32, median of {args.repeats} "
          f"interleaved runs, {n} tokens after the prompts a run")
    print(f"  rollout()                                  {r_tps:8.0f} tok/s")
    print(f"  live engine, N sessions, events unread     {l_tps:8.0f} tok/s   ({l_tps / r_tps:.2f}x)")
    print(f"  ... and a reader thread per session        {c_tps:8.0f} tok/s   ({c_tps / r_tps:.2f}x)")


if __name__ == "__main__":
    run_cli(main)
