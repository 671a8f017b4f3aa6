"""phase_errors.py — where sampled rollouts go wrong: in the streaming phase or in the deep phase.

    python -m tools.phase_errors runs/long/seed0                 # sft, grpo, hrpo of one seed's run
    python -m tools.phase_errors runs/long/seed0 --methods sft   # one model

A diagnostic script (not a test, not a benchmark). HRPO's premise is that a rollout can be right
in one phase and wrong in the other, and that a single sequence-level verdict then blames the
phase that did its job. This script measures how often that happens on a synthetic task: it
rolls out ``--group`` samples of each of ``--problems`` held-out problems of the run (the run's
own task, seed, budget and temperature, read from its config.json) and sorts every rollout by
two facts:

* **stream right**: the state carried out of the stream is right (``rewards.state_right``) —
  the last number of the model's streaming thoughts equals the last number of the gold ones
  (the tracked count when the stream ends: "18 - 5 = 13." or "No change, still 13.");
* **answer right**: the episode is correct (``Episode.correct``).

"Stream right, answer wrong" is the case a sequence-level advantage gets wrong for the streaming
tokens. Only synthetic tasks have a carried state to check, so ``--data`` runs are refused.
"""
from __future__ import annotations

from argparse import Namespace
from pathlib import Path

import torch

from adasr import Episode, Protocol
from checkpoint import load_pretrained, read_json
from cli import THREADS, ArgumentParser, UserError, run_cli
from rewards import state_right
from rundir import config_kind
from rollout import rollout
from train import load_data


def classify(ep: Episode) -> tuple[bool, bool]:
    """(stream right, answer right) of a finished episode of a synthetic problem (see above)."""
    return state_right(ep), ep.correct


CASES = [((True, True), "both right"), ((True, False), "stream right, answer wrong"),
         ((False, False), "stream wrong, answer wrong"), ((False, True), "stream wrong, answer right")]


def main(argv=None) -> None:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a run directory of train.py for one seed (holds config.json)")
    ap.add_argument("--methods", default="sft,grpo,hrpo", help="model directories of the run")
    ap.add_argument("--problems", type=int, default=64, help="held-out problems")
    ap.add_argument("--group", type=int, default=8, help="samples per problem")
    ap.add_argument("--seed", type=int, default=1234, help="sampling seed (the same for every model)")
    ap.add_argument("--threads", type=THREADS, default=1)
    args = ap.parse_args(argv)
    for name in ("problems", "group"):
        if getattr(args, name) < 1:
            raise UserError(f"option --{name} = {getattr(args, name)} must be at least 1")
    run = Path(args.run)
    config_file = run / "config.json"
    if not config_file.is_file():
        raise UserError(f"{config_file}: not found (give the directory of one seed's run)")
    config = read_json(config_file)         # a truncated or non-object file: one line
    if config_kind(config) != "run":
        raise UserError(f"{config_file}: not a config.json of train.py (give the directory of "
                        "one seed's run)")
    if config.get("data"):
        raise UserError(f"{config_file}: field data = {config['data']!r}: only synthetic tasks "
                        "have a carried state to check")
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if not (run / m / "config.json").is_file():
            raise UserError(f"option --methods: {run / m} is not a trained model of this run")
    torch.set_num_threads(args.threads)

    problems = load_data(Namespace(**config), config["seed"])[1][:args.problems]   # the run's held-out
    print(f"{run}: task {config.get('task') or 'you'}, {len(problems)} held-out problems × "
          f"{args.group} samples at temperature {config['temperature']}")
    print(f"{'method':8s}" + "".join(f"{label:>28s}" for _, label in CASES)
          + f"{'wrong answers, stream right':>30s}")
    for m in methods:
        model, tok = load_pretrained(run / m)
        protocol = Protocol(tok, wpm=config["wpm"], decode_tps=config["decode_tps"])
        episodes = []
        for i in range(0, len(problems), 16):
            episodes += rollout(model, protocol, problems[i:i + 16], group_size=args.group,
                                budget=config["budget"], temperature=config["temperature"],
                                seed=f"{args.seed}/{i}")
        counts = dict.fromkeys([case for case, _ in CASES], 0)
        for ep in episodes:
            counts[classify(ep)] += 1
        n, wrong = len(episodes), counts[(True, False)] + counts[(False, False)]
        share = f"{counts[(True, False)] / wrong:.2f}" if wrong else "—"
        print(f"{m:8s}" + "".join(f"{counts[case] / n:28.3f}" for case, _ in CASES) + f"{share:>30s}",
              flush=True)


if __name__ == "__main__":
    run_cli(main)
