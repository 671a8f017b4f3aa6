"""train.py — the training program: SFT warm start, then HRPO (or GRPO), then the evaluation.

    python train.py                       # the main job: a tiny model, SFT then HRPO, SFT vs HRPO
    python train.py --compare --seeds 5   # read-then-think, SFT, GRPO (λ=0), HRPO; paired; 5 seeds
    python train.py --preset smollm2      # SmolLM2-135M: SFT then HRPO on the named-target task
    torchrun --nproc_per_node 2 train.py ...                 # data-parallel (docs/running.md)

Read it top-down: the start of a run (data, start model), ``Run.run_job`` — the training loop of
one model — then one SFT step, one RL step in the algorithm's order, dynamic sampling, ``main``.

Design decisions
* A run is a list of *jobs* (options.plan): [sft, hrpo] by default, [read_then_think, sft, grpo,
  hrpo] with --compare, one RL job per --lam. A finished job leaves its model in OUT/<job>/ and a
  resumed run skips it; the job in progress resumes from OUT/checkpoint/.
* Common random numbers: all randomness of step k (which problems, each rollout row's random
  stream) comes from (seed, k) and the problem's place in the step, never from the job or the
  number of processes: every RL job sees the same problems and, from equal models, draws equal
  samples, so a difference between methods comes from the method.
* Dynamic sampling (DAPO): a group whose rewards are all equal carries no signal; the step rolls
  out fresh problems until it holds --rl-batch groups with signal, or --refill-cap times that many.
* A non-finite loss or gradient stops the run before anything is saved.
"""
from __future__ import annotations

import copy
import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed

from adasr import INSTRUCTION, MARKERS, Protocol
from checkpoint import add_markers, boost_rows, load_pretrained, read_json, save_checkpoint
from cli import UserError, run_cli
from data import load_problems, warn_overlap
from hrpo import STATS, HRPOConfig, group_signal, means, rl_update, sft_update
from model import Transformer, init_weights, tiny_config
from options import Job, parse_args, plan, run_config, run_dirs, writes
from parallel import Dist, setup_distributed
from report import aggregate, evaluate_run, plot_curves, progress_line, report, warn_slow_bf16
from rewards import RewardConfig, score, summarize
from rollout import check_context, rollout
from rundir import RunDir, StopFlag, save_state, trainer_state, write_json
from tasks import TASKS, synthetic_splits
from tokenizer import train_bpe

# ---------------------------------------------------------------------------------------------
# The start of a run: data and the start model
# ---------------------------------------------------------------------------------------------

def load_data(args, seed: int):
    """(train, held-out) problems: the synthetic task by default, else --data / --eval-data."""
    if args.data is None:
        return synthetic_splits(args.n_train, args.n_eval, seed, task=args.task or "you")
    train = load_problems(args.data)
    if args.eval_data:
        return train, load_problems(args.eval_data)[:args.n_eval]
    if len(train) <= args.n_eval:
        raise UserError(f"option --data {args.data}: {len(train)} problems, not more than "
                        f"--n-eval {args.n_eval}; give --eval-data or a smaller --n-eval")
    return train[:-args.n_eval], train[-args.n_eval:]


def load_other_tasks(args, seed: int) -> dict[str, list]:
    """--eval-tasks: for each synthetic task the held-out problems a run trained on it would
    hold out, for each file its first --n-eval problems; none is trained on."""
    return {Path(t).name: load_problems(t)[:args.n_eval] if t not in TASKS else
            synthetic_splits(args.n_train, args.n_eval, seed, task=t)[1] for t in args.eval_tasks or []}


def start_model(args, seed: int, train_problems):
    """The start model: --model (a checkpoint, .gguf or 'smollm2'), or a tiny model from scratch
    whose BPE tokenizer is trained on the gold trajectories' text. Returns (model, tokenizer, the
    marker ids new to the model's vocabulary: none for a tiny model or a model this program
    saved)."""
    if args.model:
        model, tok = load_pretrained(args.model, device=args.device)
        # on a GPU memory, not time, is the limit: recompute each block's activations in backward
        model.gradient_checkpointing = torch.device(args.device).type == "cuda"
    else:
        # every text carries the instruction, so that BPE merges it as often as it is read
        texts = [" ".join([INSTRUCTION, p.question, *p.chunks, *(p.thoughts or []),
                           p.deep or "", p.rtt_deep or "", p.answer])
                 for p in train_problems[:2000]]
        tok = train_bpe(texts, args.vocab, special_tokens=MARKERS)
        model = Transformer(tiny_config(tok.vocab_size, dim=args.tiny_dim, n_layers=args.tiny_layers))
        init_weights(model, seed)
        model.to(args.device)
    known = set(tok.special)
    add_markers(model, tok)
    return model, tok, [tok.token_id(m) for m in MARKERS if m not in known]


def learning_rate(kind: str, base: float, step: int, steps: int) -> float:
    """RL: constant. SFT: a linear warm-up over the first 20 steps, then cosine decay to 0."""
    if kind == "rl":
        return base
    warmup = min(1.0, (step + 1) / 20)
    return base * warmup * 0.5 * (1 + math.cos(math.pi * step / steps))


class TrainingError(UserError):
    """Training went numerically wrong (a non-finite loss or gradient): the run stops."""


# ---------------------------------------------------------------------------------------------
# The run: the training loop, one SFT step, one RL step
# ---------------------------------------------------------------------------------------------

class Run:
    """One seed's run directory and what its jobs share: options, data, start model, tokenizer,
    protocol, reward weights, the gold episodes, and the stop flag (Ctrl-C, SIGTERM)."""

    def __init__(self, args, seed: int, rundir: RunDir, dist: Dist):
        self.args, self.seed, self.dir, self.dist, self.out = args, seed, rundir, dist, rundir.path
        self.train, self.held_out = load_data(args, seed)
        for option in ("sft_batch", "rl_batch"):
            if len(self.train) < getattr(args, option):
                raise UserError(f"option --{option.replace('_', '-')} = {getattr(args, option)} "
                                f"is more than the {len(self.train)} training problems")
        self.model, self.tok, self.new_markers = start_model(args, seed, self.train)
        self.protocol = Protocol(self.tok, wpm=args.wpm, decode_tps=args.decode_tps)
        self.ood = load_other_tasks(args, seed)
        check_context(self.model, self.protocol,
                      self.train + self.held_out + [p for ps in self.ood.values() for p in ps], args.budget)
        self.rewards = RewardConfig(alpha=args.alpha, beta=args.beta, budget=args.budget,
                                    stream_credit=args.stream_credit)
        # the gold episodes of the SFT jobs, tokenised once
        layouts = {job.layout for job in plan(args) if job.kind == "sft"}
        self.gold = {layout: [self.protocol.gold(p, layout) for p in self.train] for layout in layouts}
        self.writes = writes(args)                       # what this run writes in its directory
        if dist.main:
            warn_overlap(self.train, self.held_out)
            self.warn_long_gold()
            rundir.open(run_config(args, seed), self.writes, args.resume, args.overwrite)
        dist.barrier()
        self.stop = StopFlag(verbose=dist.main)
        self.trained = []                       # the jobs this process trained (not found trained)
        self.t0 = time.time()

    def warn_long_gold(self) -> None:
        """A gold trajectory longer than the budget is one that no rollout could end like."""
        for layout, episodes in self.gold.items():
            over = [n for n in (sum(ep.is_policy) for ep in episodes) if n > self.args.budget]
            if over:
                print(f"warning: {len(over)} of {len(episodes)} gold trajectories ({layout}) are "
                      f"longer than --budget {self.args.budget} policy tokens (the longest "
                      f"{max(over)}); a rollout is cut off before it could end like them",
                      file=sys.stderr)

    def autocast(self):
        """bf16 autocast when --bf16 (CUDA or CPU); the KV cache follows (model.new_cache)."""
        if not self.args.bf16:
            return nullcontext()
        return torch.autocast(torch.device(self.args.device).type, dtype=torch.bfloat16)

    def load(self, path: Path):
        """A model saved by this run, set up like the run's start model."""
        model = load_pretrained(path, device=self.args.device)[0]
        model.gradient_checkpointing = self.model.gradient_checkpointing
        return model

    def run_job(self, job: Job):
        """Train one job to its end, or resume it; returns its final model."""
        args, final = self.args, self.out / job.name
        if (final / "config.json").exists():
            if self.dist.main:
                print(f"[{job.name}] already trained: {final}")
            return self.load(final)
        steps, lr = (args.sft_steps, args.sft_lr) if job.kind == "sft" else (args.rl_steps, args.rl_lr)
        start = copy.deepcopy(self.model) if job.start is None else self.load(self.out / job.start)
        ref_model = start.eval() if job.kind == "rl" and args.kl_beta else None
        hrpo = HRPOConfig(lam=job.lam, eps_low=args.eps_low, eps_high=args.eps_high,
                          kl_beta=args.kl_beta, temperature=args.temperature,
                          mini_batches=args.mini_batches, credit=job.credit) if job.kind == "rl" else None
        rewards = replace(self.rewards, terms=job.terms)       # what this job's RL is paid
        state = trainer_state(self.out, job.name, args.device) if args.resume else None
        self.dist.barrier()                     # rank 0 may have finished an interrupted save
        model = self.load(self.out / "checkpoint") if state else copy.deepcopy(start)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95),
                                      weight_decay=0.0 if job.kind == "rl" else 0.1)
        if self.new_markers:            # rows added to a pretrained vocabulary move further
            boost_rows(optimizer, model, self.new_markers)
        step = 0
        if state:
            optimizer.load_state_dict(state["optimizer"])
            step = state["step"]
        if self.dist.main:
            self.dir.truncate(job.name, step)   # what a killed run logged after its checkpoint
            print(f"[{job.name}] {job.kind} on the {job.layout} layout, {steps} steps"
                  + (f", lam={job.lam}" if job.kind == "rl" else "")
                  + (f"; resuming at step {step}" if step else ""), flush=True)
        t_start, first = time.time(), step
        while step < steps and not self.dist.any(self.stop.requested):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(job.kind, lr, step, steps)
            with self.autocast():
                metrics = self.sft_step(job, step, model, optimizer) if job.kind == "sft" else \
                    self.rl_step(step, model, optimizer, hrpo, rewards, ref_model)
            step += 1
            for key in ("sft_loss", "loss", "grad_norm"):
                if key in metrics and not math.isfinite(metrics[key]):
                    raise TrainingError(f"{job.kind} job '{job.name}', step {step}: {key} is "
                                        f"{metrics[key]} (diverged; lower --{job.kind}-lr); "
                                        "nothing was saved from this step on")
            metrics.update(job=job.name, stage=job.kind, step=step,
                           lr=optimizer.param_groups[0]["lr"], time=round(time.time() - self.t0, 2))
            if self.dist.main:
                self.dir.log(metrics)
                if step % args.log_every == 0 or step == steps or step == first + 1:
                    eta = (time.time() - t_start) / (step - first) * (steps - step)
                    print(progress_line(job.name, step, steps, metrics, eta), flush=True)
                if step % args.save_every == 0 and step < steps:
                    save_state(self.out, job.name, step, model, self.tok, optimizer)
        if step < steps:                        # stopped by a signal (on some rank)
            if self.dist.main:
                save_state(self.out, job.name, step, model, self.tok, optimizer)
                print(f"saved {self.out / 'checkpoint'} at step {step}; "
                      f"continue with --resume --out {self.args.out}")
            sys.exit(130)
        self.trained.append(job.name)
        if self.dist.main:
            save_checkpoint(model, self.tok, final)
            save_state(self.out, job.name, step, model, self.tok, optimizer)
        self.dist.barrier()
        return model

    def sft_step(self, job: Job, step: int, model, optimizer) -> dict:
        """One SFT step on a batch of gold episodes (the same problems for both layouts)."""
        idx = random.Random(f"{self.seed}/sft/{step}").sample(range(len(self.train)),
                                                                self.args.sft_batch)
        episodes = [self.gold[job.layout][i] for i in idx]
        t = time.time()
        update = sft_update(model, optimizer, episodes, self.args.micro_batch, mine=self.dist.share)
        seconds = time.time() - t                 # the loss is this rank's part; the norm is global
        return {"sft_loss": self.dist.sum({"loss": update["loss"]})["loss"], "grad_norm": update["grad_norm"],
                "tokens_per_s": sum(len(ep.tokens) for ep in episodes) / seconds, "sft_s": seconds}

    def rl_step(self, step: int, model, optimizer, hrpo: HRPOConfig, rewards: RewardConfig,
                ref_model) -> dict:
        """One step of HRPO (GRPO for λ = 0), in the order of the algorithm."""
        args, G = self.args, self.args.group
        # 1. The candidate problems of this step, in order: the same for every job (paired).
        candidates = random.Random(f"{self.seed}/rl/{step}").sample(
            self.train, min(len(self.train), args.refill_cap * args.rl_batch))

        # 2. Rollouts and rewards, G per problem; each row's random stream is seeded by (seed,
        #    step, the problem's place among the candidates, sample): common random numbers.
        def roll(problems: list, first: int):
            mine = self.dist.share(list(range(len(problems))))     # data parallel: my share
            episodes = rollout(model, self.protocol, [problems[i] for i in mine], group_size=G,
                               budget=args.budget, temperature=args.temperature,
                               seed=f"{self.seed}/rl/{step}", first=first + mine[0]) if mine else []
            episodes = self.dist.gather(episodes)                    # every rank: every episode
            return episodes, [score(ep, rewards) for ep in episodes]

        t = time.time()
        model.eval()
        # 3. Dynamic sampling: keep the first rl_batch groups that carry signal.
        kept, kept_rewards, episodes, scores, generated, with_signal = dynamic_sampling(
            candidates, args.rl_batch, G, roll, lambda e, r: group_signal(e, r, G, hrpo))
        t_roll = time.time() - t
        # 4. The advantages and the mini-batch updates of the clipped loss, on the kept groups.
        t = time.time()
        update = rl_update(model, optimizer, kept, kept_rewards, G, hrpo,
                           micro_batch=args.micro_batch, ref_model=ref_model, mine=self.dist.share)
        t_update = time.time() - t
        # 5. Metrics of every rollout of the step, kept or not.
        n_policy = sum(sum(ep.is_policy) for ep in episodes)
        n_all = sum(len(ep.tokens) - ep.prompt_len for ep in episodes)
        update.update(self.dist.sum({k: update[k] for k in STATS}))   # every rank's tokens
        return {**summarize(episodes, scores), **means(update),
                "groups_generated": generated, "groups_kept": len(kept) // G,
                "zero_signal": 1 - with_signal / generated,
                "problem_ids": [p.id for p in candidates[:generated]],
                "rollout_policy_tokens_per_s": n_policy / t_roll, "rollout_tokens_per_s": n_all / t_roll,
                "tokens_per_s": n_policy / (t_roll + t_update),
                "rollout_s": t_roll, "update_s": t_update}

def dynamic_sampling(candidates: list, batch: int, group: int, roll, signal):
    """DAPO's dynamic sampling: roll out groups of ``candidates`` (problems, in order) until
    ``batch`` groups carry signal or the candidates run out (the refill cap).

    ``roll(problems, first) -> (episodes, rewards)`` rolls out a round, ``group`` episodes per
    problem, grouped (``first``: where the round starts among the candidates); ``signal(episodes,
    rewards)`` says which of a round's groups carry signal. Returns (kept episodes, their rewards,
    every episode rolled out, their rewards, groups rolled out, of those the groups with signal)."""
    kept, kept_rewards, episodes, rewards, generated, with_signal = [], [], [], [], 0, 0
    while len(kept) < batch * group and generated < len(candidates):
        n = min(batch - len(kept) // group, len(candidates) - generated)   # groups still missing
        round_episodes, round_rewards = roll(candidates[generated:generated + n], generated)
        for b, has_signal in enumerate(signal(round_episodes, round_rewards)):
            with_signal += has_signal
            if has_signal and len(kept) < batch * group:
                kept += round_episodes[b * group:(b + 1) * group]
                kept_rewards += round_rewards[b * group:(b + 1) * group]
        episodes += round_episodes
        rewards += round_rewards
        generated += n
    return kept, kept_rewards, episodes, rewards, generated, with_signal


# ---------------------------------------------------------------------------------------------
# The program
# ---------------------------------------------------------------------------------------------

def train_seed(args, seed: int, rundir: RunDir, dist: Dist) -> dict | None:
    """Train and evaluate every job of one seed; returns eval.json's content (rank 0). A resumed
    run that trained nothing and whose eval.json covers every method is not evaluated again."""
    run = Run(args, seed, rundir, dist)
    out = rundir.path
    if dist.main:
        print(f"run {out}: seed {seed}, {len(run.train)} training / {len(run.held_out)} held-out "
              f"problems, model {sum(p.numel() for p in run.model.parameters()) / 1e6:.2f}M params, "
              f"vocab {run.tok.vocab_size}, device {args.device}, {dist.world} process(es)", flush=True)
    trained = {job.name: (run.run_job(job), job.layout) for job in plan(args)}
    if not dist.main:
        return None
    if args.stage == "eval":
        trained = {"model": (run.model, args.layout)}
    done = out / "eval.json"
    if args.resume and done.exists() and not run.trained:
        result = read_json(done)                # checked to be ours by options.check_args
        if set(trained) <= set(result.get("methods", {})):
            print(f"[eval] {out}: every method already evaluated")
            return {**result, "methods": {k: v for k, v in result["methods"].items() if k in trained}}
    result = evaluate_run(run, trained)
    if (out / "metrics.jsonl").exists():
        plot_curves(out)
    print(f"wrote {out}/: " + " ".join(name + ("/" if (out / name).is_dir() else "")
                                        for name in run.writes if (out / name).exists()))
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dist = setup_distributed(args)
    if dist.main:                           # once, not once per rank
        warn_slow_bf16(args)
    dirs = run_dirs(args)                   # one RunDir per seed
    for rundir in dirs:
        rundir.main = dist.main
    try:
        results = {seed: train_seed(args, seed, rundir, dist) for seed, rundir in
                   zip(args.seeds or [args.seed], dirs)}
        if args.seeds is not None and dist.main:
            summary = aggregate(results)
            write_json(Path(args.out) / "eval.json", summary)
            report(Path(args.out), summary)
    finally:
        for rundir in dirs:
            rundir.unlock()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
