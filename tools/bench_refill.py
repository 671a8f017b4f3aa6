"""tools/bench_refill.py — dynamic sampling's refill groups: streamed into the batch, or in rounds.

    python -m tools.bench_refill                          # SmolLM2-135M, B=4 × G=8, half the groups rejected
    python -m tools.bench_refill --model runs/default/sft --synthetic --budget 160

DAPO's dynamic sampling rolls out groups until ``--problems`` (B) of them carry signal. This
script rejects each candidate group with probability ``--reject`` (decided by the group's index,
so both sides reject the same groups) and times two ways of rolling them out:

* streamed — what train.py does: one ``rollout(want=B, accept=...)``; a rejected group's rows
  take the next candidate while the other rows keep writing, so the batch stays full;
* rounds — the loop train.py ran before: roll out the B groups still missing, judge them, roll
  out the ones still missing after that, ..., each round its own rollout with its own tail of a
  few long rows.

Both roll out the same groups of the same problems, at temperature 1 (their samples differ:
each row's random stream is seeded by its index in the call). Medians of ``--repeats``
interleaved runs, beside this machine's matmul GFLOP/s. A script, not a test.
"""
from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

import torch

from adasr import Protocol, add_markers
from checkpoint import load_pretrained
from cli import ArgumentParser, UserError, run_cli
from data import load_problems
from report import matmul_gflops
from rollout import rollout
from tasks import make_synthetic


def main(argv=None) -> None:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default=str(Path(__file__).parent.parent / "data" / "gsm8k" /
                                          "test.jsonl"))
    ap.add_argument("--synthetic", action="store_true", help="synthetic problems instead of --data")
    ap.add_argument("--problems", type=int, default=4, help="B: groups with signal wanted")
    ap.add_argument("--group", type=int, default=8, help="G")
    ap.add_argument("--budget", type=int, default=128, help="policy tokens per row")
    ap.add_argument("--reject", type=float, default=0.5, help="share of groups without signal")
    ap.add_argument("--cap", type=int, default=3, help="candidates: --cap × B (train.py's --refill-cap)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs of each side; medians count")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 weights), as train.py --bf16")
    args = ap.parse_args(argv)
    for name in ("problems", "group", "budget", "cap", "repeats", "threads"):
        if getattr(args, name) < 1:
            raise UserError(f"option --{name} = {getattr(args, name)} must be at least 1")
    if not 0 <= args.reject < 1:
        raise UserError(f"option --reject = {args.reject} must be in [0, 1)")
    torch.set_num_threads(args.threads)

    B, G = args.problems, args.group
    n = args.cap * B
    candidates = make_synthetic(n, 123) if args.synthetic else load_problems(args.data)[:n]
    if len(candidates) < n:
        raise UserError(f"option --data: {args.data} holds {len(candidates)} problems, "
                        f"--cap × --problems needs {n}")
    model, tok = load_pretrained(args.model)
    add_markers(model, tok)
    model.eval()
    protocol = Protocol(tok)
    rng = random.Random(0)
    rejected = {b for b in range(n) if rng.random() < args.reject}

    def streamed():
        return rollout(model, protocol, candidates, group_size=G, budget=args.budget,
                       temperature=1.0, seed=0, want=B, accept=lambda b, _: b not in rejected)

    def rounds():
        """train.py's dynamic sampling before streaming: one rollout per round, of the groups
        still missing."""
        episodes, start, need = [], 0, B
        while need > 0 and start < n:
            k = min(need, n - start)
            episodes += rollout(model, protocol, candidates[start:start + k], group_size=G,
                                budget=args.budget, temperature=1.0, seed=start)
            need -= sum(b not in rejected for b in range(start, start + k))
            start += k
        return episodes

    def timed(fn):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            t = time.perf_counter()
            episodes = fn()
            return time.perf_counter() - t, episodes
    runs = {"streamed": [], "rounds": []}
    for _ in range(args.repeats):
        for name, fn in (("streamed", streamed), ("rounds", rounds)):
            runs[name].append(timed(fn))

    print(f"model {args.model}: want B={B} groups × G={G} with signal, {args.reject:.0%} of groups "
          f"rejected, budget {args.budget}, {torch.get_num_threads()} thread(s), "
          f"{'bf16' if args.bf16 else 'fp32'}, matmul {matmul_gflops():.0f} GFLOP/s fp32; "
          f"median of {args.repeats} interleaved runs")
    median = {}
    for name, rs in runs.items():
        seconds = statistics.median(s for s, _ in rs)
        tokens = statistics.median(sum(len(ep.tokens) - ep.prompt_len for ep in eps) for _, eps in rs)
        groups = len(rs[0][1]) // G
        median[name] = seconds, tokens
        print(f"  {name:9s}: {seconds:6.2f} s  {groups} groups  {tokens:6.0f} tokens after the "
              f"prompts  {tokens / seconds:7.1f} tok/s   (runs: "
              + ", ".join(f"{s:.2f}" for s, _ in rs) + ")")
    (s_s, t_s), (s_r, t_r) = median["streamed"], median["rounds"]
    print(f"  streamed / rounds: {s_r / s_s:.2f}× faster, {t_s / s_s / (t_r / s_r):.2f}× the tokens/s")


if __name__ == "__main__":
    run_cli(main)
