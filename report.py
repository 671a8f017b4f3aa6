"""report.py — what a run shows a person: the evaluation table, learning speed, plots.

* ``evaluate``: greedy rollouts of a model on the held-out problems, scored by the same
  functions (rewards.summarize) that score RL rollouts, so every method is measured alike.
* ``format_table``: the paper's table (docs/method.md §6) as aligned text, with ± sd over seeds.
* ``learning_speed``: how fast an RL job learned, from its metrics.jsonl records.
* ``aggregate``: per-seed results -> mean, sd and paired wins against GRPO.
* plots: ``plot_curves`` (curves.png, one run's training curves), ``plot_compare`` (compare.png,
  the RL curves over seeds as mean ± sd bands) and ``plot_timeline`` (timeline.png: one held-out
  problem, each model on the stream's time axis — when chunks arrived, when the model thought,
  what it skipped, and how long the user waited after the last chunk).
* machine figures (``matmul_gflops``, ``peak_memory_gib``) printed beside absolute times:
  machines of one kind differ by up to 2x, ratios measured on one of them do not.

Design decisions
* Everything here reads what the run recorded — Episodes with their clock, metrics.jsonl — and
  never a second model of time or a second scorer; matplotlib is imported only to draw.
"""
from __future__ import annotations

import math
import resource
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from adasr import STREAM, Protocol
from rewards import RewardConfig, score, summarize
from rollout import rollout
from rundir import read_json_lines, write_json

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


@dataclass(frozen=True)
class Metric:
    """How a person sees one metric of ``rewards.summarize``: its short header and format, which
    way is better when it is a learning curve (+1 higher, -1 lower, 0 not one), and whether it is
    a column of the evaluation table."""
    header: str
    fmt: str
    better: int = 0
    column: bool = True


# Every metric shown, declared once. Residual tokens are mostly the deep phase; the skip rates and
# the streaming tokens are the streaming phase, whose advantage HRPO separates.
METRICS = {
    "accuracy": Metric("acc", "{:.3f}", +1),
    "format_rate": Metric("format", "{:.3f}"),
    "stream_tokens": Metric("S.Len", "{:.1f}", -1),
    "deep_tokens": Metric("D.Len", "{:.1f}", -1),
    "total_tokens": Metric("T.Len", "{:.1f}"),
    "residual_tokens": Metric("resid.tok", "{:.1f}", -1),
    "residual_latency_s": Metric("resid.s", "{:.2f}"),
    "skip_rate_irrelevant": Metric("skip(irr)", "{:.2f}", +1),
    "skip_rate_relevant": Metric("skip(rel)", "{:.2f}", -1),
    "state_accuracy": Metric("state", "{:.2f}", +1),
    "speedup_vs_rtt": Metric("vs RTT", "{:.2f}"),
    "reward": Metric("reward", "{:+.3f}", +1, column=False),
}
COLUMNS = [(k, m.header, m.fmt) for k, m in METRICS.items() if m.column]
SPEED_METRICS = {k: m.better for k, m in METRICS.items() if m.better}   # the learning curves
AREA = [(f"auc_{k}", METRICS[k].header, "{:.3f}") for k in SPEED_METRICS]
HALFWAY = [(f"half_{k}", METRICS[k].header, "{:.1f}") for k in SPEED_METRICS]


def progress_line(name: str, step: int, steps: int, m: dict, eta: float) -> str:
    """One line of progress: step, the step's key numbers, throughput and time left."""
    def num(key, fmt):
        return "—" if math.isnan(m[key]) else fmt.format(m[key])   # e.g. no irrelevant chunk known
    if "sft_loss" in m:
        body = f"loss {m['sft_loss']:.3f}"
    else:
        body = (f"reward {m['reward']:+.3f}  acc {m['accuracy']:.2f}  fmt {m['format_rate']:.2f}  "
                f"resid {m['residual_tokens']:5.1f} tok / {m['residual_latency_s']:4.1f}s  "
                f"skip(irr) {num('skip_rate_irrelevant', '{:.2f}')}  S/D {m['stream_tokens']:.0f}/"
                f"{m['deep_tokens']:.0f}  groups {m['groups_kept']}/{m['groups_generated']}  "
                f"clip {m.get('clip_low', 0):.3f}/{m.get('clip_high', 0):.3f}")
    return (f"[{name}] step {step:4d}/{steps}  {body}  {m['tokens_per_s']:6.0f} tok/s  "
            f"ETA {eta / 60:4.1f} min")


def format_table(methods: dict[str, dict], sd: dict[str, dict] | None = None,
                 columns=COLUMNS) -> str:
    """A table as aligned text: one row per method; with ``sd``, each cell is mean ± sd. A
    column no method has (the speed-up without read-then-think) is left out."""
    columns = [c for c in columns if any(c[0] in m for m in methods.values())]

    def cell(name, key, fmt):
        value = methods[name].get(key, float("nan"))
        if math.isnan(value):          # e.g. no chunk of the held-out set is marked irrelevant
            return "—"
        return fmt.format(value) + (f" ± {fmt.format(sd[name][key]).lstrip('+')}" if sd else "")
    width = 17 if sd else 11
    head = f"{'method':<16}" + "".join(f"{h:>{width}}" for _, h, _ in columns)
    rows = [f"{name:<16}" + "".join(f"{cell(name, k, fmt):>{width}}" for k, _, fmt in columns)
            for name in methods]
    return "\n".join([head, "-" * len(head), *rows])


def smooth(ys: list[float]) -> list[float]:
    """Trailing moving average over a twentieth of the curve: RL curves are noisy."""
    k = max(1, len(ys) // 20)
    return [sum(ys[max(0, i - k + 1):i + 1]) / len(ys[max(0, i - k + 1):i + 1]) for i in range(len(ys))]


def learning_speed(records: list[dict]) -> dict:
    """How fast one RL job learned, from its metrics.jsonl records (one per RL step), for every
    curve of ``SPEED_METRICS``: ``auc_<metric>``, the mean over the RL steps (the area under the
    curve per step), and ``half_<metric>``, the first step at which the smoothed curve gets
    halfway from its start (the first step's, i.e. the start model's) to its final value (the
    mean of the last tenth), in the direction it moved; NaN when it never moved. A curve that is
    undefined on some step (no irrelevant chunk in the step's problems) is left out."""
    out = {}
    for key in SPEED_METRICS:
        raw = [r.get(key, float("nan")) for r in records]
        if not raw or any(math.isnan(y) for y in raw):
            continue
        ys = smooth(raw)
        tail = max(1, len(ys) // 10)
        start, final = ys[0], sum(ys[-tail:]) / tail
        half = (start + final) / 2
        crossed = [r["step"] for r, y in zip(records, ys)
                   if final != start and (y <= half if final < start else y >= half)]
        out[f"auc_{key}"] = sum(raw) / len(raw)
        out[f"half_{key}"] = float(crossed[0]) if crossed else float("nan")
    return out


def speedups(methods: dict[str, dict]) -> None:
    """The paper's latency speed-up (in place): for every method, the residual seconds of
    read-then-think on the same problems (a row "name@task" against "read_then_think@task")
    divided by its own, when the run trained read-then-think."""
    for name, row in methods.items():
        rtt = methods.get("read_then_think" + task_of(name))
        if rtt is not None:
            row["speedup_vs_rtt"] = rtt["residual_latency_s"] / row["residual_latency_s"] \
                if row["residual_latency_s"] > 0 else float("nan")


def task_of(name: str) -> str:
    """"hrpo@named" -> "@named": the problems a row was evaluated on ("" for the held-out)."""
    return name[name.index("@"):] if "@" in name else ""


def aggregate(results: dict[int, dict]) -> dict:
    """Per-seed rows → per method the mean and sd (sample sd over seeds) of every metric, and
    for every RL method against GRPO the number of seeds it wins on each learning metric."""
    seeds = sorted(results)
    names = list(results[seeds[0]]["methods"])
    mean, sd = {}, {}
    for name in names:
        rows = [results[s]["methods"][name] for s in seeds]
        keys = [k for k, v in rows[0].items() if isinstance(v, (int, float))]
        mean[name] = {k: _mean([r[k] for r in rows]) for k in keys}
        sd[name] = {k: _sd([r[k] for r in rows]) for k in keys}
    wins = {}
    better = {"accuracy": 1, "residual_tokens": -1, "residual_latency_s": -1,
              **{f"auc_{k}": sign for k, sign in SPEED_METRICS.items()},
              **{f"half_{k}": -1 for k in SPEED_METRICS}}       # halfway sooner is faster
    for name in names:                     # every RL row against GRPO's on the same problems
        grpo = "grpo" + task_of(name)
        if name == grpo or grpo not in names or name.split("@")[0] in ("sft", "read_then_think"):
            continue
        wins[name] = {}
        for key, sign in better.items():
            if key not in mean[name] or key not in mean[grpo]:
                continue
            diffs = [sign * (results[s]["methods"][name][key] - results[s]["methods"][grpo][key])
                     for s in seeds]
            wins[name][key] = {"wins": sum(x > 0 for x in diffs), "ties": sum(x == 0 for x in diffs),
                               "losses": sum(x < 0 for x in diffs)}
    return {"seeds": seeds, "per_seed": {str(s): results[s]["methods"] for s in seeds},
            "mean": mean, "sd": sd, "wins_vs_grpo": wins}


def _mean(xs: list[float]) -> float:
    return math.fsum(xs) / len(xs)


def _sd(xs: list[float]) -> float:
    """Sample sd (n - 1); 0 for one value; NaN in, NaN out (statistics.stdev raises on NaN)."""
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1))


# The paper's table: accuracy and lengths, each with its change against SFT on the same problems.
PAPER = [("accuracy", "Acc", "{:.3f}"), ("stream_tokens", "S.Len", "{:.1f}"),
         ("deep_tokens", "D.Len", "{:.1f}"), ("total_tokens", "T.Len", "{:.1f}"),
         ("residual_tokens", "Resid", "{:.1f}"), ("residual_latency_s", "Resid s", "{:.2f}")]


def paper_table(methods: dict[str, dict], sd: dict[str, dict] | None = None) -> str:
    """The paper's table shape, one block per set of problems (held-out, then each other task):
    every cell the value (± sd over seeds) and its change against SFT's in % as the paper prints
    it."""
    lines = []
    for task in dict.fromkeys(task_of(n) for n in methods):
        rows = [n for n in methods if task_of(n) == task]
        base = methods.get("sft" + task)
        lines.append(f"{'method':<20}" + "".join(f"{h:>22}" for _, h, _ in PAPER))
        for name in rows:
            cells = []
            for key, _, fmt in PAPER:
                v = methods[name].get(key, float("nan"))
                cell = fmt.format(v) + (f"±{fmt.format(sd[name][key])}" if sd else "")
                if base is not None and name != "sft" + task and base.get(key):
                    cell += f" ({100 * (v / base[key] - 1):+.0f}%)"
                cells.append(cell)
            lines.append(f"{name:<20}" + "".join(f"{c:>22}" for c in cells))
        lines.append("")
    return "\n".join(lines)


def print_tables(methods: dict[str, dict], sd: dict[str, dict] | None = None) -> None:
    """The evaluation table, the paper's (changes against SFT), then for the RL jobs their
    learning speed: the area under each training curve and the step at which it got halfway
    (see ``learning_speed``)."""
    print("\n" + format_table(methods, sd) + "\n")
    print("as the paper prints it (change against SFT on the same problems):")
    print(paper_table(methods, sd))
    rl = {k: v for k, v in methods.items() if "auc_reward" in v}
    if rl:
        print("learning speed — area under the training curve (mean over RL steps):")
        print(format_table(rl, sd, columns=AREA) + "\n")
        print("learning speed — first RL step at which the smoothed curve got halfway:")
        print(format_table(rl, sd, columns=HALFWAY) + "\n")


def report(out: Path, summary: dict) -> None:
    """Print the mean ± sd tables and the paired wins against GRPO; draw compare.png."""
    n = len(summary["seeds"])
    print(f"\n{n} seeds {summary['seeds']}: mean ± sd")
    print_tables(summary["mean"], summary["sd"])
    for name, w in summary["wins_vs_grpo"].items():
        print(f"{name} vs grpo, seeds won/tied/lost: " + ", ".join(
            f"{k} {v['wins']}/{v['ties']}/{v['losses']}" for k, v in w.items()))
    plot_compare(out, summary["seeds"])


def stage_seconds(records: list[dict]) -> dict[str, float]:
    """Time per training stage from the run's exact history (metrics.jsonl), so that a resumed
    run reports the time of every process that trained it, not only its own."""
    keys = {"sft": "sft_s", "rollout": "rollout_s", "update": "update_s"}
    return {stage: sum(r.get(key, 0.0) for r in records) for stage, key in keys.items()}


def evaluate_run(run, models: dict) -> dict:
    """Evaluate each (name → (model, layout)) of ``run`` (a train.Run) on its held-out problems;
    write eval.json, traces.md and timeline.png; print the table, the learning speed of the RL
    jobs and the time per stage with this machine's matmul speed to scale it by."""
    args, out = run.args, run.out
    methods, first = {}, {}
    t = time.time()
    for name, (model, layout) in models.items():
        # the held-out problems, then those of the tasks it never saw (rows "name@task")
        for suffix, problems in {"": run.held_out, **{f"@{t}": ps for t, ps in run.ood.items()}}.items():
            with run.autocast():
                row, episodes = evaluate(model, run.protocol, problems, layout, run.rewards)
            methods[name + suffix] = row
            if run.stop.requested:                 # Ctrl-C or SIGTERM: nothing half-written
                print(f"stopped during the evaluation; nothing of it was written; continue with "
                      f"--resume --out {args.out}", flush=True)
                sys.exit(130)
            if not suffix:
                first[name] = episodes[0]
            print(f"[eval] {name + suffix}: acc {row['accuracy']:.3f}, residual "
                  f"{row['residual_tokens']:.1f} tokens", flush=True)
    records = run.dir.records()
    seconds = {**stage_seconds(records), "eval": time.time() - t}
    for name in methods:
        rl = [r for r in records if r["job"] == name and r["stage"] == "rl"]
        if rl:
            methods[name].update(learning_speed(rl))
    speedups(methods)
    result = {"seed": run.seed, "methods": methods, "wpm": args.wpm, "decode_tps": args.decode_tps,
              "n_held_out": len(run.held_out),
              "time_s": {k: round(v, 1) for k, v in seconds.items()},
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
              f"{-cut:+.0%}, skip rate on irrelevant chunks {_show(s['skip_rate_irrelevant'])} → "
              f"{_show(h['skip_rate_irrelevant'])}")
    machine = "" if torch.device(args.device).type != "cpu" else (
        f"; this machine's matmul: {matmul_gflops():.0f} GFLOP/s fp32, "
        f"{matmul_gflops(dtype=torch.bfloat16):.0f} bf16 at {torch.get_num_threads()} threads")
    print("time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items())
          + f"; this process {(time.time() - run.t0) / 60:.1f} min; peak memory "
          f"{result['peak_memory_gib']:.2f} GiB" + machine, flush=True)
    return result


def _show(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.2f}"


def warn_slow_bf16(args) -> None:
    """--bf16 on a CPU without bf16 matrix units runs every matmul through a slow path: say so
    at the start, with both rates, rather than let a run take many times longer unexplained."""
    if not args.bf16 or torch.device(args.device).type != "cpu":
        return
    bf16, fp32 = (matmul_gflops(0.05, dtype=dt, n=256) for dt in (torch.bfloat16, torch.float32))
    if bf16 < fp32:
        print(f"warning: --bf16 on a CPU without bf16 matrix units: a bf16 matmul runs at "
              f"{bf16:.1f} GFLOP/s here against {fp32:.0f} in fp32, so this run is slower than "
              "it would be without --bf16", file=sys.stderr)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _label(ax, title: str, xlabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    if ax.lines:
        ax.legend(fontsize=8)


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_curves(out: Path) -> None:
    """curves.png from metrics.jsonl: SFT loss, then per RL job reward, accuracy, residual
    latency (tokens), skip rate on irrelevant chunks, tokens per phase and format rate."""
    plt = _pyplot()
    records = read_json_lines(out / "metrics.jsonl")
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
                ax.plot(xs, smooth(list(ys)), label=job)
        _label(ax, title, "step")
    _save(plt, fig, out / "curves.png")


def plot_compare(out: Path, seeds: list[int]) -> None:
    """compare.png: accuracy, residual tokens and reward against RL step for each RL method,
    the mean over seeds as a line and mean ± sd as a band (each seed's curve smoothed first)."""
    plt = _pyplot()
    curves: dict[str, dict[int, list[dict]]] = {}          # job -> seed -> its RL records
    for s in seeds:
        for r in read_json_lines(out / f"seed{s}" / "metrics.jsonl"):
            if r["stage"] == "rl" and "reward" in r:
                curves.setdefault(r["job"], {}).setdefault(s, []).append(r)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key in zip(axes, ["accuracy", "residual_tokens", "reward"]):
        for job, by_seed in curves.items():
            n = min(len(recs) for recs in by_seed.values())
            ys = [smooth([r[key] for r in recs[:n]]) for recs in by_seed.values()]
            mean = [_mean(col) for col in zip(*ys)]
            sd = [_sd(col) for col in zip(*ys)]
            steps = range(1, n + 1)
            line, = ax.plot(steps, mean, label=f"{job} ({len(ys)} seeds)")
            ax.fill_between(steps, [m - e for m, e in zip(mean, sd)],
                            [m + e for m, e in zip(mean, sd)], color=line.get_color(), alpha=0.2)
        _label(ax, key.replace("_", " "), "RL step")
    _save(plt, fig, out / "compare.png")


def phase_segments(ep) -> list[tuple[int, int, float, float, int]]:
    """The model's work in an episode as segments of its clock: (phase, chunk, start s, end s,
    tokens) for each streaming thought and for the deep phase, read from the Episode's own
    ``times`` (a policy token's time is when it was finished, so a segment starts one
    ``token_s`` before its first token's)."""
    segments: dict[tuple[int, int], list[float]] = {}
    for pol, ph, ch, t in zip(ep.is_policy, ep.phase, ep.chunk, ep.times):
        if pol:
            segments.setdefault((ph, ch), []).append(t)
    return [(ph, ch, ts[0] - ep.token_s, ts[-1], len(ts)) for (ph, ch), ts in segments.items()]


def plot_timeline(path: Path, episodes: dict) -> None:
    """timeline.png: the same held-out problem for each model (name -> finished Episode), on
    one time axis. The top lane is the stream (each chunk while it is spoken; green when it
    matters, grey when not, blue when unknown); each model's lane shows when it thought about
    which chunk (blue), what it skipped (x), its deep phase (orange), and in red the user's wait
    from the last chunk's arrival to the model's last token."""
    plt = _pyplot()
    names = list(episodes)
    ep0 = episodes[names[0]]
    problem, arrivals = ep0.problem, ep0.arrivals
    end = max([arrivals[-1]] + [max(ep.times) for ep in episodes.values()])
    fig, ax = plt.subplots(figsize=(13, 1.6 + 0.9 * len(names)))
    lanes = {name: len(names) - i for i, name in enumerate(names)}
    top = len(names) + 1
    for k, chunk in enumerate(problem.chunks):
        a0 = arrivals[k - 1] if k else 0.0
        rel = None if problem.relevant is None else problem.relevant[k]
        color = {True: "#7fbf7f", False: "#cccccc", None: "#9ecae1"}[rel]
        ax.barh(top, arrivals[k] - a0, left=a0, height=0.6, color=color, edgecolor="white")
        ax.text((a0 + arrivals[k]) / 2, top, str(k), ha="center", va="center", fontsize=7)
    for name, ep in episodes.items():
        y = lanes[name]
        for ph, ch, t0, t1, n in phase_segments(ep):
            if ph == STREAM and n == 1 and ep.parsed.thoughts[ch] == "":
                ax.plot([t1], [y], "x", color="#555555", markersize=6)      # a skip: just <EOT>
            else:
                ax.barh(y, t1 - t0, left=t0, height=0.5,
                        color="#3182bd" if ph == STREAM else "#fd8d3c")
        if ep.residual_s > 0:
            ax.annotate("", xy=(arrivals[-1] + ep.residual_s, y - 0.38), xytext=(arrivals[-1], y - 0.38),
                        arrowprops=dict(arrowstyle="<->", color="#d62728"))
            ax.text(arrivals[-1] + ep.residual_s / 2, y - 0.42, f"wait {ep.residual_s:.2f} s",
                    ha="center", va="top", fontsize=7, color="#d62728")
    ax.axvline(arrivals[-1], color="#d62728", linestyle="--", linewidth=0.8)
    ax.set_yticks([top] + [lanes[n] for n in names],
                  ["stream"] + [f"{n} ({'✓' if episodes[n].correct else '✗'})" for n in names])
    ax.set_ylim(0.3, top + 0.6)
    ax.set_xlim(0, end * 1.03)
    ax.set_xlabel("seconds (chunk k arrives at the end of its bar; dashed: the end of the input)")
    ax.set_title("\n".join(textwrap.wrap(f"{problem.question}  (blue: streaming thought, x: skip, "
                                          "orange: deep phase)", 140)), fontsize=9)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def matmul_gflops(seconds: float = 0.5, dtype: torch.dtype = torch.float32, n: int = 1024) -> float:
    """This machine's CPU matmul throughput in ``dtype`` (n×n×n products, current thread count),
    to print beside absolute times: machines of one kind differ by up to 2x, ratios do not. bf16
    is the number that tells whether the CPU has bf16 matrix units."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    k, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        k += 1
    return 2 * n ** 3 * k / (time.perf_counter() - t0) / 1e9


def peak_memory_gib(device="cpu") -> float:
    """The peak memory of this process so far: the GPU's allocator peak on CUDA, else the
    resident set's high-water mark (what the machine must hold)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux
