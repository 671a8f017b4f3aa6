"""train.py — the training program: SFT warm start, then HRPO (or GRPO), then the evaluation.

    python train.py                       # the main job: a tiny model from scratch on the
                                          # synthetic task, SFT then HRPO, then SFT vs HRPO
    python train.py --compare --seeds 5   # read-then-think, SFT, GRPO (λ=0), HRPO; paired; 5 seeds
    python train.py --preset smollm2      # SmolLM2-135M: SFT then HRPO on the named-target task
    python train.py --stage sft --layout read_then_think     # one stage alone
    torchrun --nproc_per_node 2 train.py ...                 # data-parallel (docs/running.md)

Read it top-down: the set-up of a run (data, start model), then ``Run``: ``run_job`` is the
training loop of one model and ``rl_step`` one step of HRPO, in the order of the algorithm —
candidate problems, rollouts and rewards, dynamic sampling, advantages (once), the mini-batch
updates, metrics — then the evaluation and ``main``. The options and the jobs they define are
options.py's; the run directory's safety (lock, resume checks, metrics history) rundir.py's;
data parallelism parallel.py's; tables and plots report.py's.

Design decisions
----------------
* A run is a list of *jobs* — (name, kind, layout, start-from, λ) — executed in order. The main
  job is [sft, hrpo]; --compare is [read_then_think, sft, grpo, hrpo]; several --lam values give
  one RL job each. A finished job leaves its model in OUT/<job>/, so a resumed run skips it; the
  job in progress resumes from OUT/checkpoint/ with its step count and optimizer state.
* Common random numbers: all randomness of RL step k — which problems, in which order, and the
  random streams of each rollout round — is derived from (seed, k), never from the job, so every
  RL job of a run sees the same problems and, from identical models, draws identical samples; a
  difference between methods then comes from the method. SFT steps likewise share (seed, k)
  between layouts. A resumed run continues exactly as the uninterrupted one, with no RNG state.
* Dynamic sampling (DAPO): a group whose rewards are all equal carries no signal; the step keeps
  rolling out fresh problems until it holds --rl-batch groups with signal, or until it has rolled
  out --refill-cap times that many (then it trains on what it has).
* A non-finite loss or gradient norm stops the run at once, before anything is saved: a NaN
  model must never replace a good one on disk.
* Data parallel (torchrun): each rank takes a contiguous share of the step's problems; the loss is
  normalised by the policy-token count of the whole update across ranks and the gradients summed
  (hrpo.py); rank 0 alone logs, evaluates and writes.
"""
from __future__ import annotations

import copy
import json
import math
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from adasr import INSTRUCTION, MARKERS, Protocol, add_markers
from checkpoint import load_pretrained, recover_checkpoint, save_checkpoint
from cli import UserError, run_cli
from data import load_problems
from hrpo import HRPOConfig, advantages, group_signal, rl_update, sft_update
from model import Transformer, init_weights, tiny_config
from options import Job, parse_args, plan, run_config, run_dirs
from parallel import Dist, setup_distributed
from report import (aggregate, evaluate, learning_speed, matmul_gflops, peak_memory_gib,
                    plot_curves, plot_timeline, print_tables, report, speedups)
from rewards import RewardConfig, score, summarize
from rollout import check_context, rollout
from rundir import RUN_FILES, RunDir, write_json
from tasks import synthetic_splits
from tokenizer import train_bpe

# ---------------------------------------------------------------------------------------------
# Set-up: data, the start model
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


def warn_overlap(train: list, held_out: list) -> None:
    """Say how many held-out problems are also training problems, or repeat one another (the
    synthetic splits are disjoint by construction; files need not be)."""
    key = lambda p: (p.question, tuple(p.chunks))                      # noqa: E731
    seen = {key(p) for p in train}
    shared = sum(key(p) in seen for p in held_out)
    repeated = len(held_out) - len({key(p) for p in held_out})
    if shared or repeated:
        print(f"warning: of {len(held_out)} held-out problems, {shared} are also training problems "
              f"and {repeated} repeat another held-out one: the evaluation is not on unseen "
              "problems alone", file=sys.stderr)


def start_model(args, seed: int, train_problems):
    """The start model: --model (pretrained checkpoint, .gguf or 'smollm2') or a tiny model from
    scratch whose BPE tokenizer is trained on the gold trajectories' text. Returns (model,
    tokenizer, the ids of the marker tokens that were new to the model's vocabulary: none for a
    tiny model, whose tokenizer is trained with them, or for a checkpoint this program wrote)."""
    if args.model:
        model, tok = load_pretrained(args.model, device=args.device)
        # On a GPU, recompute each block's activations in the backward pass: a pretrained
        # model's activations, not its weights, are what overflow GPU memory in an RL step. On a
        # CPU time is the limit, not memory (SmolLM2 at 8 rows × 256 tokens: 8 GB without).
        model.gradient_checkpointing = torch.device(args.device).type == "cuda"
    else:
        # Every text carries the instruction, so that BPE merges it as often as it is read.
        texts = [" ".join([INSTRUCTION, p.question, *p.chunks, *(p.thoughts or []),
                           p.deep or "", p.rtt_deep or "", p.answer])
                 for p in train_problems[:2000]]
        tok = train_bpe(texts, args.vocab, special_tokens=MARKERS)
        model = Transformer(tiny_config(tok.vocab_size, dim=args.tiny_dim,
                                        n_layers=args.tiny_layers))
        init_weights(model, seed)
        model.to(args.device)
    known = set(tok.special)
    add_markers(model, tok)
    return model, tok, [tok.token_id(m) for m in MARKERS if m not in known]


# Adam moves every weight by about lr per step, the right pace for a pretrained weight that only
# needs nudging. A marker row added to a pretrained vocabulary starts as a newline (add_markers)
# and must travel to a place of its own, and with tied embeddings the six rows can only be told
# apart at the output once they have moved apart: they move 20x as far (docs/smollm2.md).
MARKER_BOOST = 20.0


def boost_rows(optimizer, model: Transformer, rows: list[int], factor: float) -> None:
    """Make every ``optimizer`` step move the embedding rows ``rows`` (and an untied head's)
    ``factor`` times as far as the optimizer moved them; every other weight moves as usual."""
    rows = torch.tensor(rows, device=model.device)
    weights = list({id(w): w for w in (model.embed_tokens.weight, model.lm_head.weight)}.values())
    before = []

    def pre(*_):
        before[:] = [w.detach()[rows].clone() for w in weights]

    @torch.no_grad()
    def post(*_):
        for w, b in zip(weights, before):
            w[rows] = b + factor * (w[rows] - b)

    optimizer.register_step_pre_hook(pre)
    optimizer.register_step_post_hook(post)


def learning_rate(kind: str, base: float, step: int, steps: int) -> float:
    """RL: constant. SFT: a linear warm-up over the first 20 steps, then cosine decay to 0."""
    if kind == "rl":
        return base
    warmup = min(1.0, (step + 1) / 20)
    return base * warmup * 0.5 * (1 + math.cos(math.pi * step / steps))



# ---------------------------------------------------------------------------------------------
# The run: training loop, one SFT step, one RL step
# ---------------------------------------------------------------------------------------------

class TrainingError(UserError):
    """Training went numerically wrong (a non-finite loss or gradient): the run stops."""


class Run:
    """A run directory of one seed and the state shared by its jobs: options, tokenizer,
    protocol, data, metrics log, time per stage, and the stop flag (Ctrl-C, SIGTERM)."""

    def __init__(self, args, seed: int, rundir: RunDir, d: Dist):
        self.args, self.seed, self.d, self.dir, self.out = args, seed, d, rundir, rundir.path
        self.train, self.held_out = load_data(args, seed)
        for option in ("sft_batch", "rl_batch"):
            if len(self.train) < getattr(args, option):
                raise UserError(f"option --{option.replace('_', '-')} = {getattr(args, option)} "
                                f"is more than the {len(self.train)} training problems")
        self.model, self.tok, self.new_markers = start_model(args, seed, self.train)
        self.protocol = Protocol(self.tok, wpm=args.wpm, decode_tps=args.decode_tps)
        check_context(self.model, self.protocol, self.train + self.held_out, args.budget)
        if d.main:
            warn_overlap(self.train, self.held_out)
        self.rewards = RewardConfig(alpha=args.alpha, beta=args.beta, budget=args.budget,
                                    stream_credit=args.stream_credit)
        self.stop = False
        self.trained = []                # the jobs this process trained (not found trained)
        self.seconds = {"sft": 0.0, "rollout": 0.0, "update": 0.0, "eval": 0.0}
        self.t0 = time.time()
        # The gold episodes of the SFT jobs, tokenised once; a gold trajectory longer than the
        # budget is one that no rollout could end like, so the run says how many there are.
        layouts = {job.layout for job in plan(args) if job.kind == "sft"}
        self.gold = {layout: [self.protocol.gold(p, layout) for p in self.train] for layout in layouts}
        for layout, episodes in self.gold.items():
            over = [n for n in (sum(ep.is_policy) for ep in episodes) if n > args.budget]
            if over and d.main:
                print(f"warning: {len(over)} of {len(episodes)} gold trajectories ({layout}) are "
                      f"longer than --budget {args.budget} policy tokens (the longest {max(over)}); "
                      "a rollout is cut off before it could end like them", file=sys.stderr)
        if d.main:
            self.dir.lock()                  # before the run writes anything
            if not args.resume:
                jobs = [job.name for job in plan(args)]
                files = RUN_FILES if jobs else ("config.json", "eval.json", "traces.md", "timeline.png")
                self.dir.start_fresh(list(files) + jobs, args.overwrite)
            write_json(self.out / "config.json", run_config(args, seed))
        d.barrier()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, *_):
        if self.stop:                       # second Ctrl-C: leave at once
            raise KeyboardInterrupt
        self.stop = True
        if self.d.main:
            print("\nstopping: finishing this step, saving a checkpoint, then exiting "
                  "(Ctrl-C again to quit without saving)", flush=True)

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

    def log(self, record: dict) -> None:
        self.dir.log(record)

    def save_state(self, job: Job, step: int, model, optimizer) -> None:
        """Atomic checkpoint of the job in progress: model files + trainer.pt, in one rename."""
        if self.d.main:
            save_checkpoint(model, self.tok, self.out / "checkpoint",
                            extra={"trainer.pt": {"job": job.name, "step": step,
                                                  "optimizer": optimizer.state_dict()}})

    def resume_state(self, job: Job) -> dict | None:
        """The trainer state of ``job`` in checkpoint/, if the run is resumed and it is there."""
        if not self.args.resume:
            return None
        if self.d.main:
            recover_checkpoint(self.out / "checkpoint")
        self.d.barrier()
        state_file = self.out / "checkpoint" / "trainer.pt"
        if not state_file.exists():
            return None
        try:
            state = torch.load(state_file, map_location=self.args.device, weights_only=False)
        except Exception as e:   # a truncated or foreign file: torch raises several kinds
            raise UserError(f"{state_file}: cannot read the trainer state ({type(e).__name__}); "
                            "start afresh with --overwrite") from None
        if not isinstance(state, dict) or not {"job", "step", "optimizer"} <= set(state):
            raise UserError(f"{state_file}: not a trainer state of this program")
        return state if state["job"] == job.name else None

    def run_job(self, job: Job):
        """Train one job to its end (or resume it); returns its final model."""
        args, final = self.args, self.out / job.name
        if (final / "config.json").exists():
            if self.d.main:
                print(f"[{job.name}] already trained: {final}")
            return self.load(final)
        steps, lr = (args.sft_steps, args.sft_lr) if job.kind == "sft" else (args.rl_steps, args.rl_lr)
        start = copy.deepcopy(self.model) if job.start is None else self.load(self.out / job.start)
        ref_model = start.eval() if job.kind == "rl" and args.kl_beta else None
        state = self.resume_state(job)
        model = self.load(self.out / "checkpoint") if state else copy.deepcopy(start)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95),
                                      weight_decay=0.0 if job.kind == "rl" else 0.1)
        if self.new_markers:   # rows added to a pretrained vocabulary, in every job of the run
            boost_rows(optimizer, model, self.new_markers, MARKER_BOOST)
        step = 0
        if state:
            optimizer.load_state_dict(state["optimizer"])
            step = state["step"]
        self.dir.truncate(job.name, step)       # what a killed run logged after its checkpoint
        if self.d.main:
            print(f"[{job.name}] {job.kind} on the {job.layout} layout, {steps} steps"
                  + (f", lam={job.lam}" if job.kind == "rl" else "")
                  + (f"; resuming at step {step}" if step else ""), flush=True)
        t_start, first = time.time(), step
        while step < steps and not self.d.any(self.stop, args.device):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(job.kind, lr, step, steps)
            with self.autocast():
                m = self.sft_step(job, step, model, optimizer) if job.kind == "sft" else \
                    self.rl_step(job, step, model, optimizer, ref_model)
            step += 1
            for key in ("sft_loss", "loss", "grad_norm"):
                if key in m and not math.isfinite(m[key]):
                    raise TrainingError(f"{job.kind} job '{job.name}', step {step}: {key} is "
                                        f"{m[key]} (diverged; lower --{job.kind}-lr); nothing "
                                        "was saved from this step on")
            m.update(job=job.name, stage=job.kind, step=step, lr=optimizer.param_groups[0]["lr"],
                     time=round(time.time() - self.t0, 2))
            self.log(m)
            if self.d.main and (step % args.log_every == 0 or step == steps or step == first + 1):
                eta = (time.time() - t_start) / (step - first) * (steps - step)
                print(progress_line(job.name, step, steps, m, eta), flush=True)
            if step % args.save_every == 0 and step < steps:
                self.save_state(job, step, model, optimizer)
        if step < steps:                            # stopped by a signal (on some rank)
            self.save_state(job, step, model, optimizer)
            if self.d.main:
                print(f"saved {self.out / 'checkpoint'} at step {step}; "
                      f"continue with --resume --out {self.args.out}")
            sys.exit(130)
        self.trained.append(job.name)
        if self.d.main:
            save_checkpoint(model, self.tok, final)
            self.save_state(job, step, model, optimizer)
        self.d.barrier()
        return model

    def sft_step(self, job: Job, step: int, model, optimizer) -> dict:
        """One SFT step on a batch of gold episodes (the same problems for both layouts)."""
        rng = random.Random(f"{self.seed}/sft/{step}")
        idx = self.d.share(rng.sample(range(len(self.train)), self.args.sft_batch))
        episodes = [self.gold[job.layout][i] for i in idx]
        t = time.time()
        m = sft_update(model, optimizer, episodes, self.args.micro_batch)
        dt = time.time() - t
        self.seconds["sft"] += dt
        n_tok = sum(len(ep.tokens) for ep in episodes) * self.d.world
        return {"sft_loss": m["loss"], "grad_norm": m["grad_norm"], "tokens_per_s": n_tok / dt}

    def rl_step(self, job: Job, step: int, model, optimizer, ref_model) -> dict:
        """One step of HRPO (GRPO for λ = 0), in the order of the algorithm."""
        args, d, G, B = self.args, self.d, self.args.group, self.args.rl_batch
        hcfg = HRPOConfig(lam=job.lam, eps_low=args.eps_low, eps_high=args.eps_high,
                          kl_beta=args.kl_beta, temperature=args.temperature,
                          mini_batches=args.mini_batches, epochs=args.epochs)
        # 1. The candidate problems of this step, in order: the same for every job (paired).
        candidates = random.Random(f"{self.seed}/rl/{step}").sample(
            self.train, min(len(self.train), args.refill_cap * B))

        # 2. Rollouts of G samples per problem, their rewards and advantages (a function of the
        # round, so that dynamic sampling can ask for more).
        def roll(problems, start):
            """This rank's rollouts of ``problems``; the sampling seed depends on (seed, step,
            where in the candidates the round starts, rank) only: common random numbers."""
            episodes = rollout(model, self.protocol, problems, group_size=G, budget=args.budget,
                               temperature=args.temperature,
                               seed=f"{self.seed}/rl/{step}/{start}/{d.rank}")
            rewards = [score(ep, self.rewards) for ep in episodes]
            return episodes, rewards, advantages(rewards, G, job.lam, hcfg.std_eps)

        t = time.time()
        model.eval()
        # 3. Dynamic sampling: keep the first B groups whose advantages are not all zero.
        s = dynamic_sampling(candidates, B, G, roll, d, args.device)
        t_roll = time.time() - t
        # 4. The mini-batch updates on the kept groups, with the advantages computed in step 2.
        t = time.time()
        update = rl_update(model, optimizer, s.kept, s.advantages, G, hcfg,
                           micro_batch=args.micro_batch, ref_model=ref_model)
        t_update = time.time() - t
        self.seconds["rollout"] += t_roll
        self.seconds["update"] += t_update
        # 5. Metrics of every rollout of the step, kept or not.
        n_policy = sum(sum(ep.is_policy) for ep in s.episodes)
        n_all = sum(len(ep.tokens) - ep.prompt_len for ep in s.episodes)
        return {**summarize(s.episodes, s.rewards), **update,
                "groups_generated": s.generated, "groups_kept": sum(d.gather(len(s.kept) // G, args.device)),
                "zero_signal": 1 - s.with_signal / s.generated,
                "problem_ids": [p.id for p in candidates[:s.generated]],
                "rollout_policy_tokens_per_s": n_policy / t_roll,
                "rollout_tokens_per_s": n_all / t_roll,
                "tokens_per_s": n_policy / (t_roll + t_update)}


@dataclass
class Sampled:
    """What dynamic sampling rolled out in one RL step (this rank's share)."""
    kept: list                  # episodes of the kept groups, grouped
    advantages: tuple           # (A_stream, A_deep) of the kept episodes, each (len(kept),)
    episodes: list              # every episode rolled out, kept or not
    rewards: list               # their rewards
    generated: int              # groups rolled out, over all ranks
    with_signal: int            # of those, groups with signal, over all ranks


def dynamic_sampling(candidates: list, batch: int, group: int, roll, d: Dist, device) -> Sampled:
    """DAPO's dynamic sampling: roll out groups of the ``candidates`` (problems, in order) until
    ``batch`` groups carry signal, over all ranks, or the candidates run out (the cap).

    ``roll(problems, start) -> (episodes, rewards, (A_stream, A_deep))`` rolls out this rank's
    share of a round, ``group`` episodes per problem, grouped. Each round asks for the groups
    still missing, rounded up to a multiple of the ranks; the kept groups are the first with
    signal in the global order (rank 0's share of a round first)."""
    s = Sampled([], (torch.zeros(0), torch.zeros(0)), [], [], 0, 0)
    kept_adv = []
    while s.generated < len(candidates):
        need = batch - sum(d.gather(len(s.kept) // group, device))    # groups still missing
        if need <= 0:
            break
        n = min(-(-need // d.world) * d.world, len(candidates) - s.generated)
        episodes, rewards, (a_stream, a_deep) = roll(d.share(candidates[s.generated:s.generated + n]),
                                                     s.generated)
        signal = group_signal(a_stream, a_deep, group)                   # (groups,)
        counts = d.gather(int(signal.sum()), device)
        room = max(0, need - sum(counts[:d.rank]))
        for b in signal.nonzero().flatten().tolist()[:room]:
            rows = slice(b * group, (b + 1) * group)
            s.kept += episodes[rows]
            kept_adv.append((a_stream[rows], a_deep[rows]))
        s.episodes += episodes
        s.rewards += rewards
        s.generated += n
        s.with_signal += sum(counts)
    if kept_adv:
        s.advantages = (torch.cat([a for a, _ in kept_adv]), torch.cat([b for _, b in kept_adv]))
    return s


def progress_line(name: str, step: int, steps: int, m: dict, eta: float) -> str:
    """One line of progress: step, the step's key numbers, throughput and time left."""
    if "sft_loss" in m:
        body = f"loss {m['sft_loss']:.3f}"
    else:
        body = (f"reward {m['reward']:+.3f}  acc {m['accuracy']:.2f}  fmt {m['format_rate']:.2f}  "
                f"resid {m['residual_tokens']:5.1f} tok / {m['residual_latency_s']:4.1f}s  "
                f"skip(irr) {m['skip_rate_irrelevant']:.2f}  S/D {m['stream_tokens']:.0f}/"
                f"{m['deep_tokens']:.0f}  groups {m['groups_kept']}/{m['groups_generated']}  "
                f"clip {m.get('clip_low', 0):.3f}/{m.get('clip_high', 0):.3f}")
    return (f"[{name}] step {step:4d}/{steps}  {body}  {m['tokens_per_s']:6.0f} tok/s  "
            f"ETA {eta / 60:4.1f} min")


# ---------------------------------------------------------------------------------------------
# Evaluation and the program
# ---------------------------------------------------------------------------------------------

def run_eval(run: Run, models: dict) -> dict:
    """Evaluate each (name → (model, layout)) on the held-out problems; write eval.json,
    traces.md and timeline.png; print the table, the learning speed of the RL jobs and the time
    per stage."""
    args, out = run.args, run.out
    methods, first = {}, {}
    t = time.time()
    for name, (model, layout) in models.items():
        with run.autocast():
            methods[name], episodes = evaluate(model, run.protocol, run.held_out, layout, run.rewards)
        first[name] = episodes[0]
        print(f"[eval] {name}: acc {methods[name]['accuracy']:.3f}, residual "
              f"{methods[name]['residual_tokens']:.1f} tokens", flush=True)
    run.seconds["eval"] += time.time() - t
    records = run.dir.records()
    for name in methods:
        rl = [r for r in records if r["job"] == name and r["stage"] == "rl"]
        if rl:
            methods[name].update(learning_speed(rl))
    speedups(methods)
    result = {"seed": run.seed, "methods": methods, "wpm": args.wpm, "decode_tps": args.decode_tps,
              "n_held_out": len(run.held_out),
              "time_s": {k: round(v, 1) for k, v in run.seconds.items()},
              "peak_memory_gib": round(peak_memory_gib(args.device), 2)}
    write_json(out / "eval.json", result)
    traces = [f"## {name}\n\n```\n{run.protocol.render(ep)}\n```\n" for name, ep in first.items()]
    (out / "traces.md").write_text("# One held-out problem per method\n\n" + "\n".join(traces))
    plot_timeline(out / "timeline.png", first)
    print_tables(methods)
    if "sft" in methods and "hrpo" in methods and methods["sft"]["residual_tokens"] > 0:
        s, h = methods["sft"], methods["hrpo"]
        cut = 1 - h["residual_tokens"] / s["residual_tokens"]
        print(f"HRPO vs SFT: accuracy {h['accuracy'] - s['accuracy']:+.3f}, residual tokens "
              f"{-cut:+.0%}, skip rate on irrelevant chunks {s['skip_rate_irrelevant']:.2f} → "
              f"{h['skip_rate_irrelevant']:.2f}")
    machine = "" if torch.device(args.device).type != "cpu" else (   # to scale the times by
        f"; this machine's matmul: {matmul_gflops():.0f} GFLOP/s fp32, "
        f"{matmul_gflops(dtype=torch.bfloat16):.0f} bf16 at {torch.get_num_threads()} threads")
    print("time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in run.seconds.items())
          + f"; total {(time.time() - run.t0) / 60:.1f} min; peak memory "
          f"{result['peak_memory_gib']:.2f} GiB" + machine, flush=True)
    return result


def train_seed(args, seed: int, rundir: RunDir, d: Dist) -> dict | None:
    """Train and evaluate every job of one seed in ``rundir``; returns eval.json's content (rank
    0). A resumed run that trained nothing and whose eval.json already covers every method is not
    evaluated again (one that trained a job again, say after its directory was deleted, is)."""
    run = Run(args, seed, rundir, d)
    out = rundir.path
    if d.main:
        print(f"run {out}: seed {seed}, {len(run.train)} training / {len(run.held_out)} held-out "
              f"problems, model {sum(p.numel() for p in run.model.parameters()) / 1e6:.2f}M params, "
              f"vocab {run.tok.vocab_size}, device {args.device}, {d.world} process(es)", flush=True)
    trained = {job.name: (run.run_job(job), job.layout) for job in plan(args)}
    if not d.main:
        return None
    if args.stage == "eval":
        trained = {"model": (run.model, args.layout)}
    done = out / "eval.json"
    if args.resume and done.exists() and not run.trained:
        result = json.loads(done.read_text())
        if set(trained) <= set(result.get("methods", {})):
            print(f"[eval] {out}: every method already evaluated")
            return {**result, "methods": {k: v for k, v in result["methods"].items() if k in trained}}
    result = run_eval(run, trained)
    if (out / "metrics.jsonl").exists():
        plot_curves(out)
    print(f"wrote {out}/: config.json metrics.jsonl eval.json traces.md curves.png timeline.png "
          "checkpoint/ and one directory per trained model")
    return result


def warn_slow_bf16(args) -> None:
    """--bf16 on a CPU without bf16 matrix units (AVX2-only, or AVX-512 without BF16) runs every
    matmul through a slow path: on a 2-core AMD EPYC, 1.3 GFLOP/s against 70 in fp32. Say so at
    the start, with the two rates, rather than let a run take 50x longer unexplained."""
    if not args.bf16 or torch.device(args.device).type != "cpu":
        return
    bf16, fp32 = (matmul_gflops(0.05, dtype=dt, n=256) for dt in (torch.bfloat16, torch.float32))
    if bf16 < fp32:
        print(f"warning: --bf16 on a CPU without bf16 matrix units: a bf16 matmul runs at "
              f"{bf16:.1f} GFLOP/s here against {fp32:.0f} in fp32, so this run is slower than "
              "it would be without --bf16", file=sys.stderr)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    d = setup_distributed(args)
    if d.main:                           # once, not once per rank
        warn_slow_bf16(args)
    runs = run_dirs(args)
    for run in runs:
        run.main = d.main
    try:
        results = {seed: train_seed(args, seed, run, d) for seed, run in
                   zip(args.seeds or [args.seed], runs)}
        if args.seeds is not None and d.main:
            summary = aggregate(results)
            write_json(Path(args.out) / "eval.json", summary)
            report(Path(args.out), summary)
    finally:
        for run in runs:
            run.unlock()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
