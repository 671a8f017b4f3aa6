"""rundir.py — a run directory is data: one writer, exact history, nothing lost by accident.

    OUT/config.json      every option of the run (what made it)
    OUT/metrics.jsonl    one line per training step: stage, job, step, metrics
    OUT/checkpoint/      the job in progress: model files + trainer.pt (job, step, optimizer)
    OUT/<job>/           the final model of each finished job (sft, hrpo, grpo, ...)
    OUT/eval.json, traces.md, curves.png, timeline.png    the evaluation (report.py)
    OUT/lock             the pid of the process writing here

What this file owns: the lock (``RunDir.lock``), the comparison of a resumed run's options with
the ones that made the directory (``check_resume``), starting afresh without deleting what the
run did not make (``start_fresh``), the metrics log (append, read, truncate on resume) and
atomic JSON files. train.py decides *what* to write; this file decides how it stays whole.

Design decisions
* A resumed run must be the run it continues. Every option that shapes what is trained — the
  model, tokenizer, data, seed, steps, learning rates, rewards, precision — must equal the one in
  config.json; ``RESUMABLE`` lists the few that may change (how fast, how chatty, where the
  progress goes). A mismatch is refused with the option and both values, before any work.
* A fresh run in a directory that already holds a run is refused unless ``--overwrite``; then it
  removes only the files that it is about to write itself, never a model it reads (``--model``
  inside OUT is refused where the run would write over it).
* One writer per directory: ``lock`` is created exclusively and holds the writer's pid; a lock
  whose process is gone is stale and taken over.
* The metrics log keeps history exact: a job that (re)starts at step s drops its own lines after
  s (a run killed after its last checkpoint logged steps it will log again); a partial last line
  (what SIGKILL or a full disk leaves) is ignored when read and dropped when truncated.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import torch

from checkpoint import recover_checkpoint, save_checkpoint
from cli import UserError

# Options a resumed run may change: they change how fast or how visibly a run goes, not what it
# trains. (Seeds: each seed directory records its own seed; a gathering run names them all.)
RESUMABLE = {"resume", "overwrite", "threads", "log_every", "save_every", "device", "out",
             "seeds", "preset"}
# What a run writes at the top of its directory, besides one directory per job.
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint", "eval.json", "traces.md",
             "curves.png", "timeline.png")


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")    # parallel seeds share OUT/
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_json_lines(path: Path) -> list[dict]:
    """The records of a JSON-lines log; a partial last line (a killed writer's) is ignored."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise UserError(f"{path}:{i + 1}: not a JSON line (the metrics log is damaged)") from None
    return records


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # someone else's process: alive
        return True
    return True


class RunDir:
    """One run directory (one seed's). ``main`` is False on data-parallel ranks other than 0,
    which read but never write."""

    def __init__(self, path: Path, main: bool = True):
        self.path, self.main = Path(path), main
        self.metrics = self.path / "metrics.jsonl"

    # -- one writer --------------------------------------------------------------------------
    def lock(self) -> None:
        """Take the directory for this process, or refuse with one line if a live one has it."""
        if not self.main:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise UserError(f"option --out: {self.path} is not a directory") from None
        except OSError as e:
            raise UserError(f"option --out: cannot create {self.path} ({e.strerror})") from None
        lock = self.path / "lock"
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(lock.read_text() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise UserError(f"option --out: {self.path} is in use by process {pid} "
                                    f"(its lock file {lock}); one run writes a directory at a time") from None
                lock.unlink(missing_ok=True)           # stale: its process is gone
                continue
            except OSError as e:
                raise UserError(f"option --out: cannot write in {self.path} ({e.strerror})") from None
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return

    def unlock(self) -> None:
        lock = self.path / "lock"
        if self.main and lock.exists() and lock.read_text() == str(os.getpid()):
            lock.unlink()

    def open(self, config: dict, writes: list[str], resume: bool, overwrite: bool) -> None:
        """Take the directory, make room for a fresh run (unless resumed), record its options."""
        self.lock()                                   # before the run writes anything
        if not resume:
            self.start_fresh(writes, overwrite)
        write_json(self.path / "config.json", config)

    # -- what made it ------------------------------------------------------------------------
    def holds_run(self) -> bool:
        return (self.path / "config.json").exists()

    def check_resume(self, config: dict) -> None:
        """Refuse to resume with an option that shapes what is trained set otherwise than in the
        directory's config.json (one line: the option, its old and its new value)."""
        old = json.loads((self.path / "config.json").read_text())
        for key, value in config.items():
            if key in RESUMABLE or old.get(key, value) == value:
                continue
            raise UserError(f"option --{key.replace('_', '-')} = {_show(value)} differs from the "
                            f"run in {self.path} ({_show(old[key])}); --resume continues a run "
                            "as it was started (only " + ", ".join(
                                f"--{k.replace('_', '-')}" for k in sorted(RESUMABLE - {"resume", "out", "overwrite", "preset", "seeds"}))
                            + " may change)")

    def start_fresh(self, writes: list[str], overwrite: bool) -> None:
        """Make room for a fresh run that writes ``writes`` (names in the directory): refuse if a
        run is here and ``overwrite`` is off; else remove those names only."""
        if not self.main:
            return
        here = [name for name in writes if (self.path / name).exists()]
        if self.holds_run() and not overwrite:
            raise UserError(f"option --out: {self.path} already holds a run; --resume continues "
                            "it, --overwrite replaces its " + (", ".join(here) or "files"))
        for name in here:
            target = self.path / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()

    # -- the metrics log ---------------------------------------------------------------------
    def log(self, record: dict) -> None:
        if self.main:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        return read_json_lines(self.metrics)

    def truncate(self, job: str, step: int) -> None:
        """Job ``job`` (re)starts after step ``step``: drop its lines logged after it, and a
        partial last line, so that the log holds each step once."""
        if not self.main or not self.metrics.exists():
            return
        keep = [r for r in self.records() if not (r["job"] == job and r["step"] > step)]
        tmp = self.metrics.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, self.metrics)


# -- the job in progress: its checkpoint ----------------------------------------------------
def save_state(path: Path, job: str, step: int, model, tokenizer, optimizer) -> None:
    """Atomic checkpoint of the job in progress: model files + trainer.pt, in one rename."""
    save_checkpoint(model, tokenizer, path / "checkpoint",
                    extra={"trainer.pt": {"job": job, "step": step,
                                          "optimizer": optimizer.state_dict()}})


def trainer_state(path: Path, job: str, device) -> dict | None:
    """The trainer state (job, step, optimizer) of ``job`` in ``path``/checkpoint, if it is there."""
    recover_checkpoint(path / "checkpoint")            # a save that a crash interrupted
    state_file = path / "checkpoint" / "trainer.pt"
    if not state_file.exists():
        return None
    try:
        state = torch.load(state_file, map_location=device, weights_only=False)
    except Exception as e:   # a truncated or foreign file: torch raises several kinds
        raise UserError(f"{state_file}: cannot read the trainer state ({type(e).__name__}); "
                        "start afresh with --overwrite") from None
    if not isinstance(state, dict) or not {"job", "step", "optimizer"} <= set(state):
        raise UserError(f"{state_file}: not a trainer state of this program")
    return state if state["job"] == job else None


class StopFlag:
    """Ctrl-C or SIGTERM asks the run to stop after the current step (it then saves a
    checkpoint); a second Ctrl-C leaves at once."""

    def __init__(self, verbose: bool):
        self.requested, self.verbose = False, verbose
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, *_):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.verbose:
            print("\nstopping: finishing this step, saving a checkpoint, then exiting "
                  "(Ctrl-C again to quit without saving)", flush=True)


def _show(value) -> str:
    if isinstance(value, list):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)
