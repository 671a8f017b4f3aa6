"""tools/profile_decode.py — where one decode step of a rollout spends its time (a script, not a test).

    python -m tools.profile_decode                      # SmolLM2-135M, 32 rows, 120 cached tokens, fp32
    python -m tools.profile_decode --bf16 --rows 32 --context 200

Fills a KV cache with ``--context`` random tokens per row, then times the step a rollout repeats
(each row feeds one token and gets its logits) and profiles ``--steps`` of them with
``torch.profiler``, grouping the operators into matmuls (the projections and the head),
attention, and elementwise and indexing ops (their sum against the step's unprofiled wall time
bounds what Python and dispatch cost). Prints the step's FLOP rate beside this machine's matmul GFLOP/s: a
decode step of a few rows is bound by reading the weights (and the cache), not by arithmetic.
"""
from __future__ import annotations

import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from checkpoint import add_markers, load_pretrained
from cli import ArgumentParser, positive, run_cli
from report import matmul_gflops

GROUPS = {"aten::mm": "matmul", "aten::addmm": "matmul", "aten::bmm": "matmul",
          "aten::_scaled_dot_product_flash_attention_for_cpu": "attention"}


def main(argv=None) -> None:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--rows", type=positive(int), default=32, help="rows decoding together (B·G)")
    ap.add_argument("--context", type=positive(int), default=120, help="tokens already in each row's cache")
    ap.add_argument("--steps", type=positive(int), default=5, help="decode steps profiled")
    ap.add_argument("--threads", type=positive(int), default=1)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast, as train.py --bf16")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load_pretrained(args.model)
    add_markers(model, tok)
    model.eval()
    B = args.rows
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
        cache = model.new_cache(B, args.context + 3 + 2 * args.steps + 20)
        model(torch.randint(0, model.cfg.vocab_size, (B, args.context)), cache)
        token, ones = torch.randint(0, model.cfg.vocab_size, (B, 1)), torch.ones(B, dtype=torch.long)

        def step():
            return model.logits(model(token, cache=cache, return_hidden=True, lengths=ones)[:, 0])
        for _ in range(3):
            step()
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        wall = (time.perf_counter() - t) / args.steps
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
    ms = defaultdict(float)
    for e in prof.key_averages():
        ms[GROUPS.get(e.key, "elementwise and indexing")] += e.self_cpu_time_total / 1e3 / args.steps
    traced = sum(ms.values())
    flops = 2 * B * sum(p.numel() for p in model.parameters())     # the tied head counted once
    peak = matmul_gflops(dtype=torch.bfloat16 if args.bf16 else torch.float32)
    print(f"model {args.model}: {B} rows, {args.context} cached tokens, {args.threads} thread(s), "
          f"{'bf16' if args.bf16 else 'fp32'}; one decode step {wall * 1e3:.1f} ms, "
          f"{flops / wall / 1e9:.0f} GFLOP/s = {flops / wall / 1e9 / peak:.0%} of this machine's "
          f"{peak:.0f} GFLOP/s matmul")
    print(f"  profiled step {traced:.1f} ms of operators:")
    for name in ("matmul", "attention", "elementwise and indexing"):
        print(f"    {name:26s} {ms[name]:7.1f} ms  {ms[name] / traced:5.1%}")
    weights = sum(p.numel() * (2 if args.bf16 else p.element_size()) for p in model.parameters())
    kv = cache.k.element_size() * 2 * cache.k[:, :, :, :args.context].numel()
    print(f"  bytes a step must read: weights {weights / 2**20:.0f} MiB, KV cache {kv / 2**20:.0f} MiB "
          f"(at the step's time: {(weights + kv) / wall / 1e9:.1f} GB/s)")


if __name__ == "__main__":
    run_cli(main)
