"""tools/bench_trl.py — one RL step of ours against TRL's GRPOTrainer on the same model (a script, not a test).

    python -m tools.bench_trl                   # SmolLM2-135M, B=4 GSM8K problems × G=8, ≤ 128 new tokens
    python -m tools.bench_trl --full-length     # every row writes all 128 tokens, on both sides

What a user would otherwise pick for GRPO on a small model is TRL. Both sides get the same
weights (ours saved in the Hugging Face layout and loaded by `transformers`), the same B·G rows,
temperature 1 without top-k, the same stop tokens, the same clipping (ε = 0.2 / 0.28), no KL
term, a token-mean loss over the batch ("dapo" in TRL), one pass over the rows in micro-batches
of --micro-batch, and rewards drawn at random (this measures time, not learning), from the same
prompts: the instruction, the question and the first chunk of the stream. Each side's step is
timed in two parts: ours as rollout + update, TRL's as `model.generate` + the rest of
`trainer.train()` (rewards, advantages, log-probs, backward, optimiser). The two alternate for
--repeats rounds (this machine's speed drifts) and the medians count; the matmul GFLOP/s and the
versions are printed beside.

Without TRL installed the script says so and exits with status 2 (``pip install trl``).
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
from cli import ArgumentParser, UserError, positive, run_cli
from data import load_problems
from hrpo import HRPOConfig, advantages, rl_update
from report import matmul_gflops
from rewards import Rewards
from rollout import rollout


def ours_step(model, protocol, problems, args) -> dict:
    """One RL step of ours: rollout, random rewards, HRPO advantages, the clipped update."""
    cfg = HRPOConfig(mini_batches=1)         # one optimiser step over all rows, as TRL takes
    t0 = time.perf_counter()
    episodes = rollout(model, protocol, problems, group_size=args.group, budget=args.budget,
                       temperature=1.0, seed=0)
    t1 = time.perf_counter()
    rng = random.Random(0)
    rewards = [Rewards(0, 0, 0, total=rng.random(), stream=rng.random(), deep=rng.random())
               for _ in episodes]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    rl_update(model, optimizer, episodes, advantages(rewards, args.group, cfg.lam), args.group,
              cfg, micro_batch=args.micro_batch)
    t2 = time.perf_counter()
    return {"generate": t1 - t0, "rest": t2 - t1, "step": t2 - t0,
            "new": statistics.mean(sum(ep.is_policy) for ep in episodes),
            "tokens": statistics.mean(len(ep.tokens) for ep in episodes)}


def trl_step(hf, hf_tok, prompts, stop_ids, args, trl, datasets) -> dict:
    """One GRPOTrainer step (max_steps=1) on the B prompts, G generations each."""
    timing = {"generate": 0.0}
    generate = type(hf).generate

    def timed_generate(*a, **k):              # TRL calls model.generate once per step here
        t = time.perf_counter()
        out = generate(hf, *a, **k)
        timing["generate"] += time.perf_counter() - t
        # generate pads every row to the longest; a row's completion ends at its first stop
        new = out[:, k["input_ids"].shape[1]:]
        stop = torch.isin(new, torch.tensor(sorted(stop_ids)))
        ends = torch.where(stop.any(1), stop.int().argmax(1) + 1, new.shape[1])
        timing["new"] = ends.float().mean().item()
        return out
    hf.generate = timed_generate
    rng = random.Random(0)
    gen = {"eos_token_id": sorted(stop_ids)}
    if args.full_length:
        gen["min_new_tokens"] = args.budget
    with tempfile.TemporaryDirectory() as out:
        config = trl.GRPOConfig(
            output_dir=out, max_steps=1, learning_rate=1e-6, report_to=[], save_strategy="no",
            logging_strategy="no", use_cpu=True, bf16=False, num_generations=args.group,
            per_device_train_batch_size=args.micro_batch,
            gradient_accumulation_steps=args.problems * args.group // args.micro_batch,
            max_completion_length=args.budget, temperature=1.0, top_k=0, top_p=1.0, beta=0.0,
            epsilon=0.2, epsilon_high=0.28, loss_type="dapo", generation_kwargs=gen,
            disable_tqdm=True, dataloader_num_workers=0, seed=0)
        trainer = trl.GRPOTrainer(
            model=hf, args=config, processing_class=hf_tok,
            reward_funcs=[lambda completions, **_: [rng.random() for _ in completions]],
            train_dataset=datasets.Dataset.from_dict({"prompt": prompts}))
        t0 = time.perf_counter()
        trainer.train()
        step = time.perf_counter() - t0
    del hf.generate
    prompt_len = statistics.mean(len(hf_tok(p, add_special_tokens=False).input_ids) for p in prompts)
    return {"generate": timing["generate"], "rest": step - timing["generate"], "step": step,
            "new": timing["new"], "tokens": prompt_len + timing["new"]}


def main(argv=None) -> None:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default=str(Path(__file__).parent.parent / "data" / "gsm8k" /
                                          "test.jsonl"))
    ap.add_argument("--problems", type=positive(int), default=4, help="B")
    ap.add_argument("--group", type=positive(int), default=8, help="G")
    ap.add_argument("--budget", type=positive(int), default=128, help="new tokens per row, at most")
    ap.add_argument("--full-length", action="store_true", help="every row writes --budget tokens")
    ap.add_argument("--micro-batch", type=positive(int), default=8, help="rows per forward/backward")
    ap.add_argument("--repeats", type=positive(int), default=3,
                    help="interleaved steps of each side; medians count")
    ap.add_argument("--threads", type=positive(int), default=1)
    args = ap.parse_args(argv)
    if args.problems * args.group % args.micro_batch:
        raise UserError(f"option --micro-batch {args.micro_batch} must divide --problems × --group "
                        f"= {args.problems * args.group} (TRL accumulates whole micro-batches)")
    try:
        import trl                     # first: it brings datasets and transformers with it
        import datasets
        import transformers
    except ModuleNotFoundError as e:
        raise UserError(f"bench_trl.py compares with TRL ({e.name} is not installed): "
                        "pip install trl") from None
    torch.set_num_threads(args.threads)

    problems = load_problems(args.data)[:args.problems]
    model, tok = load_pretrained(args.model)
    add_markers(model, tok)
    protocol = Protocol(tok)
    stop_ids = protocol.stop_ids         # TRL's stop tokens; with --full-length, ours has none
    if args.full_length:
        protocol.stop_ids = set()
    # TRL starts every row from the prompt ours starts from (instruction, question, first chunk);
    # ours feeds the next chunk only after a thought ends (<EOT>), which SmolLM2 as shipped
    # rarely writes, so both sides process about the same tokens ("tok/row" says how many).
    prompts = [tok.decode(protocol.blocks(p, "stream")[0][0]) for p in problems]
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(model, tok, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(Path(d) / "tokenizer.json"))
    hf_tok.pad_token = hf_tok.eos_token = tok.decode([sorted(stop_ids)[0]])

    rounds = [(ours_step(model, protocol, problems, args),
               trl_step(hf, hf_tok, prompts, stop_ids, args, trl, datasets))
              for _ in range(args.repeats)]
    print(f"model {args.model}: B={args.problems} problems × G={args.group}, up to {args.budget} new "
          f"tokens{' (every row all of them)' if args.full_length else ''}, micro-batch "
          f"{args.micro_batch}, {args.threads} thread(s), fp32; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, trl {trl.__version__}; matmul "
          f"{matmul_gflops():.0f} GFLOP/s fp32; medians of {args.repeats} interleaved steps")
    print(f"{'':6}{'step s':>9}{'generate s':>12}{'rest s':>9}{'new tok/row':>13}{'tok/row':>9}")
    med = {}
    for name, side in (("ours", 0), ("TRL", 1)):
        med[name] = {k: statistics.median(r[side][k] for r in rounds) for k in rounds[0][side]}
        m = med[name]
        steps = ", ".join(f"{r[side]['step']:.1f}" for r in rounds)
        print(f"{name:6}{m['step']:9.1f}{m['generate']:12.1f}{m['rest']:9.1f}{m['new']:13.1f}"
              f"{m['tokens']:9.1f}   (steps: {steps})")
    print(f"TRL / ours: step {med['TRL']['step'] / med['ours']['step']:.2f}×, generate "
          f"{med['TRL']['generate'] / med['ours']['generate']:.2f}×, rest "
          f"{med['TRL']['rest'] / med['ours']['rest']:.2f}×")


if __name__ == "__main__":
    run_cli(main)
