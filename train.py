"""train.py — the training program: SFT warm start, HRPO (or GRPO), evaluation.

    python train.py                 # the main job: tiny model from scratch on the synthetic task,
                                    # SFT then HRPO, then the table SFT vs HRPO on held-out problems
    python train.py --compare       # read-then-think, SFT, GRPO (λ=0) and HRPO at equal RL steps
    python train.py --stage sft --layout read_then_think     # one stage alone
    python train.py --model smollm2 --data ../shared/data/gsm8k/train.jsonl --device cuda
    torchrun --nproc_per_node 2 train.py ...                 # data-parallel (see README)

What this file owns: the options, building the model/tokenizer/data of a run, the job list of a
run (which models are trained from which), the SFT and RL loops with progress lines, checkpoints
and resuming, the evaluation table, and the run directory:

    runs/NAME/config.json      every option used
    runs/NAME/metrics.jsonl    one line per step (stage, job, step, metrics)
    runs/NAME/eval.json        the evaluation table
    runs/NAME/curves.png       reward, accuracy, latency, skip rate, tokens per phase over steps
    runs/NAME/checkpoint/      the latest training state: model.py's checkpoint + trainer.pt
    runs/NAME/<job>/           the final model of each job (sft, hrpo, grpo, read_then_think)

Design decisions
----------------
* A run is a list of *jobs* — (name, kind, layout, start-from, λ) — executed in order. The main
  job is [sft, hrpo]; --compare is [read_then_think, sft, grpo, hrpo]. A finished job leaves its
  model in runs/NAME/<job>/, so a resumed run skips it; the job in progress resumes from
  checkpoint/ with its step count and optimizer state.
* All randomness of step k of a job is derived from (seed, job, k) — which problems, which
  samples — so a resumed run continues exactly as the uninterrupted one would have, with no RNG
  state to save.
* Evaluation decodes greedily (deterministic) on the held-out problems; every method is scored by
  the same functions (rewards.summarize) that score the RL rollouts.
* Data parallel (torchrun): each rank takes a contiguous share of the step's problems; the loss is
  normalised by the policy-token count of the whole step across ranks and the gradients summed
  (hrpo.py); rank 0 alone logs, evaluates and writes.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from adasr import INSTRUCTION, MARKERS, Protocol, add_markers
from data import load_problems, synthetic_splits
from hrpo import HRPOConfig, rl_step, sft_step
from model import (Transformer, init_weights, load_pretrained, save_checkpoint, tiny_config,
                   train_bpe)
from rewards import RewardConfig, score, summarize
from rollout import rollout


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/default", help="run directory")
    g.add_argument("--stage", default="all", choices=["all", "sft", "rl", "eval"],
                   help="all = SFT, RL, eval; or one stage alone (rl/eval start from --model)")
    g.add_argument("--compare", action="store_true",
                   help="train read-then-think, SFT, GRPO (lam=0) and HRPO and compare them")
    g.add_argument("--resume", action="store_true", help="continue a killed run in --out")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--bf16", action="store_true",
                   help="bf16 autocast (fp32 master weights); for GPUs, slow on CPUs")
    g.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--save-every", type=int, default=50, help="checkpoint period (steps)")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None,
                   help="checkpoint dir, .gguf file or 'smollm2'; default: a tiny model from scratch")
    g.add_argument("--tiny-dim", type=int, default=128)
    g.add_argument("--tiny-layers", type=int, default=4)
    g.add_argument("--vocab", type=int, default=384, help="BPE vocabulary of the tiny tokenizer")
    g.add_argument("--data", default=None,
                   help="StreamingThinker JSON or GSM8K JSONL file; default: the synthetic task")
    g.add_argument("--eval-data", default=None,
                   help="held-out file; default: the last --n-eval problems of --data")
    g.add_argument("--n-train", type=int, default=6000, help="synthetic training problems")
    g.add_argument("--n-eval", type=int, default=200, help="held-out problems")
    g = p.add_argument_group("SFT")
    g.add_argument("--layout", default="stream", choices=["stream", "read_then_think"],
                   help="layout of the gold trajectories (--stage sft)")
    g.add_argument("--sft-steps", type=int, default=600)
    g.add_argument("--sft-batch", type=int, default=32)
    g.add_argument("--sft-lr", type=float, default=3e-3)
    g = p.add_argument_group("RL (HRPO; --lam 0 is GRPO)")
    g.add_argument("--rl-steps", type=int, default=60)
    g.add_argument("--rl-batch", type=int, default=8, help="problems per step (all ranks)")
    g.add_argument("--group", type=int, default=8, help="G, rollouts per problem")
    g.add_argument("--rl-lr", type=float, default=1e-4)
    g.add_argument("--lam", type=float, default=0.25, help="local/global balance λ of HRPO")
    g.add_argument("--eps-low", type=float, default=0.2)
    g.add_argument("--eps-high", type=float, default=0.28)
    g.add_argument("--kl-beta", type=float, default=0.0, help="k3 KL to the start model")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    g.add_argument("--budget", type=int, default=160, help="T, policy tokens per rollout")
    g.add_argument("--micro-batch", type=int, default=32, help="rows per forward/backward")
    g = p.add_argument_group("rewards and clock")
    g.add_argument("--alpha", type=float, default=0.3, help="cost of a residual token, per T")
    g.add_argument("--beta", type=float, default=0.05, help="cost of a streaming token, per T")
    g.add_argument("--wpm", type=float, default=150.0, help="words per minute of the stream")
    g.add_argument("--decode-tps", type=float, default=20.0, help="model tokens per second")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Set-up: distributed, model, data
# ---------------------------------------------------------------------------------------------

@dataclass
class Dist:
    """Where this process stands in data-parallel training (rank 0 of 1 without torchrun)."""
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (after rank 0 wrote files the others will read)."""
        if dist.is_initialized():
            dist.barrier()

    def any(self, flag: bool, device) -> bool:
        """True on every rank if ``flag`` is True on any (Ctrl-C reaches ranks at different
        moments; they must stop after the same step or the next collective would hang)."""
        if not dist.is_initialized():
            return flag
        t = torch.tensor([float(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t)

    def share(self, items: list) -> list:
        """This rank's contiguous share of a step's items (equal shares; world must divide)."""
        n = len(items) // self.world
        return items[self.rank * n:(self.rank + 1) * n]


def setup_distributed(args) -> Dist:
    """Join the process group when started by torchrun (gloo on CPU, nccl on CUDA)."""
    if "RANK" not in os.environ:
        return Dist()
    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    dist.init_process_group(backend)
    d = Dist(dist.get_rank(), dist.get_world_size())
    if args.device.startswith("cuda"):
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(args.device)
    if args.rl_batch % d.world:
        raise SystemExit(f"--rl-batch {args.rl_batch} must be divisible by the {d.world} ranks")
    if args.sft_batch % d.world:
        raise SystemExit(f"--sft-batch {args.sft_batch} must be divisible by the {d.world} ranks")
    return d


def build_data(args):
    """(train, held-out) problems: the synthetic task by default, else --data / --eval-data."""
    if args.data is None:
        return synthetic_splits(args.n_train, args.n_eval, args.seed)
    train = load_problems(args.data)
    if args.eval_data:
        return train, load_problems(args.eval_data)
    if len(train) <= args.n_eval:
        raise SystemExit(f"--data {args.data}: {len(train)} problems, not more than --n-eval "
                         f"{args.n_eval}; give --eval-data or a smaller --n-eval")
    return train[:-args.n_eval], train[-args.n_eval:]


def build_model(args, train_problems):
    """The start model: --model (pretrained checkpoint, .gguf or 'smollm2') or a tiny model from
    scratch whose BPE tokenizer is trained on the gold trajectories' text."""
    if args.model:
        model, tok = load_pretrained(args.model, device=args.device)
        # Recompute each block's activations in the backward pass: a pretrained model's
        # activations, not its weights, are what overflow memory in an RL step (hrpo.py).
        model.gradient_checkpointing = True
    else:
        # Every text carries the instruction, so that BPE merges it as often as it is read.
        texts = [" ".join([INSTRUCTION, p.question, *p.chunks, *(p.thoughts or []),
                           p.deep or "", p.rtt_deep or "", p.answer])
                 for p in train_problems[:2000]]
        tok = train_bpe(texts, args.vocab, special_tokens=MARKERS)
        torch.manual_seed(args.seed)
        model = Transformer(tiny_config(tok.vocab_size, dim=args.tiny_dim,
                                        n_layers=args.tiny_layers))
        init_weights(model, args.seed)
        model.to(args.device)
    add_markers(model, tok)
    return model, tok


# ---------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """One model to train: ``kind`` sft or rl, on ``layout``, starting from the final model of job
    ``start`` (None: the run's start model), with HRPO's ``lam`` (0 = GRPO) for RL."""
    name: str
    kind: str
    layout: str = "stream"
    start: str | None = None
    lam: float = 0.0


def plan(args) -> list[Job]:
    """The jobs of this run, in order (see the module docstring)."""
    if args.stage == "sft":
        return [Job("sft" if args.layout == "stream" else "read_then_think", "sft", args.layout)]
    if args.stage == "rl":
        return [Job("hrpo" if args.lam else "grpo", "rl", lam=args.lam)]
    if args.stage == "eval":
        return []
    jobs = [Job("sft", "sft")]
    if args.compare:
        jobs = [Job("read_then_think", "sft", "read_then_think")] + jobs + \
               [Job("grpo", "rl", start="sft", lam=0.0)]
    return jobs + [Job("hrpo", "rl", start="sft", lam=args.lam)]


class Run:
    """A run directory and the state shared by its jobs: options, tokenizer, protocol, data,
    metrics log, and the Ctrl-C flag."""

    def __init__(self, args, d: Dist):
        self.args, self.d, self.out = args, d, Path(args.out)
        self.train, self.held_out = build_data(args)
        self.model, self.tok = build_model(args, self.train)
        self.protocol = Protocol(self.tok, wpm=args.wpm, decode_tps=args.decode_tps)
        self.rewards = RewardConfig(alpha=args.alpha, beta=args.beta, budget=args.budget)
        self.stop = False
        self._gold: dict[tuple[int, str], object] = {}
        self.t0 = time.time()
        if d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            if not args.resume:          # a fresh run: forget what an earlier run left here
                for name in ["checkpoint", "metrics.jsonl"] + [job.name for job in plan(args)]:
                    shutil.rmtree(self.out / name, ignore_errors=True)
                    (self.out / name).unlink(missing_ok=True)
            write_json(self.out / "config.json", vars(args))
        d.barrier()
        signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, *_):
        if self.stop:                       # second Ctrl-C: leave at once
            raise KeyboardInterrupt
        self.stop = True
        if self.d.main:
            print("\nCtrl-C: finishing this step, saving a checkpoint, then exiting "
                  "(Ctrl-C again to quit without saving)", flush=True)

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) \
            if self.args.bf16 and self.args.device.startswith("cuda") else nullcontext()

    def load(self, path: Path):
        """A model saved by this run, set up like the run's start model."""
        model = load_pretrained(path, device=self.args.device)[0]
        model.gradient_checkpointing = self.model.gradient_checkpointing
        return model

    def gold(self, i: int, layout: str):
        """Gold episode of training problem i (memoised: tokenised once per run)."""
        if (i, layout) not in self._gold:
            self._gold[i, layout] = self.protocol.gold(self.train[i], layout)
        return self._gold[i, layout]

    def log(self, record: dict) -> None:
        if self.d.main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def save_state(self, job: Job, step: int, model, optimizer) -> None:
        """Atomic checkpoint of the job in progress: model files + trainer.pt, in one rename."""
        if self.d.main:
            save_checkpoint(model, self.tok, self.out / "checkpoint",
                            extra={"trainer.pt": {"job": job.name, "step": step,
                                                  "optimizer": optimizer.state_dict()}})

    # -- one job ------------------------------------------------------------------------------
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
        state_file, state = self.out / "checkpoint" / "trainer.pt", None
        if args.resume and state_file.exists():
            state = torch.load(state_file, map_location=args.device, weights_only=False)
            state = state if state["job"] == job.name else None
        model = self.load(self.out / "checkpoint") if state else copy.deepcopy(start)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95),
                                      weight_decay=0.0 if job.kind == "rl" else 0.1)
        step = 0
        if state:
            optimizer.load_state_dict(state["optimizer"])
            step = state["step"]
            if self.d.main:
                print(f"[{job.name}] resuming at step {step}/{steps}")
        if self.d.main:
            print(f"[{job.name}] {job.kind} on the {job.layout} layout, {steps} steps"
                  + (f", lam={job.lam}" if job.kind == "rl" else ""), flush=True)
        t_start, first = time.time(), step
        while step < steps and not self.d.any(self.stop, args.device):
            for group in optimizer.param_groups:   # linear warm-up then cosine decay (SFT)
                group["lr"] = lr if job.kind == "rl" else lr * min(1.0, (step + 1) / 20) * \
                    0.5 * (1 + math.cos(math.pi * step / steps))
            rng = random.Random(f"{args.seed}/{job.name}/{step}")
            with self.autocast():
                m = self.sft_step(job, step, model, optimizer, rng) if job.kind == "sft" else \
                    self.rl_step(job, step, model, optimizer, ref_model, rng)
            step += 1
            m.update(job=job.name, stage=job.kind, step=step, lr=optimizer.param_groups[0]["lr"],
                     time=round(time.time() - self.t0, 2))
            self.log(m)
            if self.d.main and (step % args.log_every == 0 or step == steps or step == first + 1):
                eta = (time.time() - t_start) / (step - first) * (steps - step)
                print(progress_line(job.name, step, steps, m, eta), flush=True)
            if step % args.save_every == 0 and step < steps:
                self.save_state(job, step, model, optimizer)
        if step < steps:                            # stopped by Ctrl-C (on some rank)
            self.save_state(job, step, model, optimizer)
            if self.d.main:
                print(f"saved {self.out / 'checkpoint'} at step {step}; "
                      f"continue with --resume --out {self.out}")
            sys.exit(130)
        if self.d.main:
            save_checkpoint(model, self.tok, final)
            self.save_state(job, step, model, optimizer)
        self.d.barrier()
        return model

    def sft_step(self, job, step, model, optimizer, rng) -> dict:
        idx = self.d.share(rng.sample(range(len(self.train)), self.args.sft_batch))
        episodes = [self.gold(i, job.layout) for i in idx]
        t = time.time()
        m = sft_step(model, optimizer, episodes, self.args.micro_batch)
        n_tok = sum(len(ep.tokens) for ep in episodes) * self.d.world
        return {"sft_loss": m["loss"], "grad_norm": m["grad_norm"],
                "tokens_per_s": n_tok / (time.time() - t)}

    def rl_step(self, job, step, model, optimizer, ref_model, rng) -> dict:
        args = self.args
        problems = self.d.share(rng.sample(self.train, args.rl_batch))
        gen = torch.Generator(device=args.device).manual_seed(    # str seeds hash reproducibly
            random.Random(f"{args.seed}/{job.name}/{step}/{self.d.rank}").getrandbits(62))
        t = time.time()
        model.eval()
        episodes = rollout(model, self.protocol, problems, group_size=args.group, budget=args.budget,
                           temperature=args.temperature, generator=gen)
        t_roll = time.time() - t
        rewards = [score(ep, self.rewards) for ep in episodes]
        hcfg = HRPOConfig(lam=job.lam, eps_low=args.eps_low, eps_high=args.eps_high,
                          kl_beta=args.kl_beta, temperature=args.temperature)
        update = rl_step(model, optimizer, episodes, rewards, args.group, hcfg,
                         micro_batch=args.micro_batch, ref_model=ref_model)
        n_policy = sum(sum(ep.policy) for ep in episodes)
        n_all = sum(len(ep.tokens) - ep.prompt_len for ep in episodes)
        return {**summarize(episodes, rewards), **update,
                "rollout_policy_tokens_per_s": n_policy / t_roll,
                "rollout_tokens_per_s": n_all / t_roll,
                "tokens_per_s": n_policy / (time.time() - t)}


def progress_line(name: str, step: int, steps: int, m: dict, eta: float) -> str:
    """One line of progress: step, the step's key numbers, throughput and time left."""
    if "sft_loss" in m:
        body = f"loss {m['sft_loss']:.3f}"
    else:
        body = (f"reward {m['reward']:+.3f}  acc {m['accuracy']:.2f}  fmt {m['format_rate']:.2f}  "
                f"resid {m['residual_tokens']:5.1f} tok / {m['residual_latency_s']:4.1f}s  "
                f"skip(irr) {m['skip_rate_irrelevant']:.2f}  S/D {m['stream_tokens']:.0f}/"
                f"{m['deep_tokens']:.0f}  0-sig {m['zero_signal']:.2f}")
    return (f"[{name}] step {step:4d}/{steps}  {body}  {m['tokens_per_s']:6.0f} tok/s  "
            f"ETA {eta / 60:4.1f} min")


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, protocol: Protocol, problems, layout: str, rcfg: RewardConfig,
             batch: int = 100):
    """Greedy rollouts on held-out problems → (the table row of rewards.summarize, episodes)."""
    model.eval()
    episodes = []
    for i in range(0, len(problems), batch):
        episodes += rollout(model, protocol, problems[i:i + batch], layout=layout,
                            budget=rcfg.budget, temperature=0.0)
    return summarize(episodes, [score(ep, rcfg) for ep in episodes]), episodes


COLUMNS = [("accuracy", "acc", "{:.3f}"), ("format_rate", "format", "{:.3f}"),
           ("stream_tokens", "S.Len", "{:.1f}"), ("deep_tokens", "D.Len", "{:.1f}"),
           ("total_tokens", "T.Len", "{:.1f}"), ("residual_tokens", "resid.tok", "{:.1f}"),
           ("residual_latency_s", "resid.s", "{:.2f}"), ("skip_rate_irrelevant", "skip(irr)", "{:.2f}")]


def format_table(methods: dict[str, dict]) -> str:
    """The evaluation table as aligned text."""
    head = f"{'method':<16}" + "".join(f"{h:>10}" for _, h, _ in COLUMNS)
    rows = [f"{name:<16}" + "".join(f"{fmt.format(m[k]):>10}" for k, _, fmt in COLUMNS)
            for name, m in methods.items()]
    return "\n".join([head, "-" * len(head), *rows])


def run_eval(run: Run, models: dict) -> dict:
    """Evaluate each (name → (model, layout)) on the held-out problems; write eval.json."""
    methods, traces = {}, []
    for name, (model, layout) in models.items():
        row, episodes = evaluate(model, run.protocol, run.held_out, layout, run.rewards)
        methods[name] = row
        traces.append(f"## {name}\n\n```\n{run.protocol.render(episodes[0])}\n```\n")
        print(f"[eval] {name}: acc {row['accuracy']:.3f}, residual {row['residual_tokens']:.1f} "
              f"tokens", flush=True)
    result = {"methods": methods, "wpm": run.args.wpm, "decode_tps": run.args.decode_tps,
              "n_held_out": len(run.held_out)}
    write_json(run.out / "eval.json", result)
    (run.out / "traces.md").write_text("# One held-out problem per method\n\n" + "\n".join(traces))
    print("\n" + format_table(methods) + "\n")
    if "sft" in methods and "hrpo" in methods and methods["sft"]["residual_tokens"] > 0:
        s, h = methods["sft"], methods["hrpo"]
        cut = 1 - h["residual_tokens"] / s["residual_tokens"]
        print(f"HRPO vs SFT: accuracy {h['accuracy'] - s['accuracy']:+.3f}, residual tokens "
              f"{-cut:+.0%}, skip rate on irrelevant chunks {s['skip_rate_irrelevant']:.2f} → "
              f"{h['skip_rate_irrelevant']:.2f}")
    return result


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def plot_curves(out: Path) -> None:
    """curves.png from metrics.jsonl: SFT loss, then per RL job reward, accuracy, residual
    latency (tokens), skip rate on irrelevant chunks, tokens per phase and format rate."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    panels = [("sft_loss", "SFT loss"), ("reward", "reward"), ("accuracy", "accuracy"),
              ("residual_tokens", "residual tokens"), ("skip_rate_irrelevant", "skip rate (irrelevant)"),
              ("stream_tokens", "stream tokens"), ("deep_tokens", "deep tokens"),
              ("format_rate", "format-valid rate")]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, (key, title) in zip(axes.flat, panels):
        for job in dict.fromkeys(r["job"] for r in records):
            pts = [(r["step"], r[key]) for r in records if r["job"] == job and key in r]
            if pts:
                xs, ys = zip(*pts)
                k = max(1, len(ys) // 20)             # moving average: RL curves are noisy
                smooth = [sum(ys[max(0, i - k + 1):i + 1]) / len(ys[max(0, i - k + 1):i + 1])
                          for i in range(len(ys))]
                ax.plot(xs, smooth, label=job)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=80)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    d = setup_distributed(args)
    run = Run(args, d)
    if d.main:
        print(f"run {run.out}: {len(run.train)} training / {len(run.held_out)} held-out problems, "
              f"model {sum(p.numel() for p in run.model.parameters()) / 1e6:.2f}M params, "
              f"vocab {run.tok.vocab_size}, device {args.device}, {d.world} process(es)", flush=True)
    trained = {job.name: (run.run_job(job), job.layout) for job in plan(args)}
    if d.main:
        if args.stage == "eval":
            trained = {"model": (run.model, args.layout)}
        run_eval(run, trained)
        if (run.out / "metrics.jsonl").exists():
            plot_curves(run.out)
        print(f"wrote {run.out}/: config.json metrics.jsonl eval.json traces.md curves.png "
              "checkpoint/ and one directory per trained model")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
