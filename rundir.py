"""rundir.py — a run directory is data: one writer, exact history, nothing lost by accident.

    OUT/config.json  the options that made it     OUT/metrics.jsonl  one line per training step
    OUT/checkpoint/  the job in progress           OUT/<job>/         each finished job's model
    OUT/eval.json, traces.md, curves.png, timeline.png  the evaluation    OUT/lock  the writer's pid

Owns: the lock, what a directory is (``dir_kind``: a run, a multi-seed run, a model, something
else) and what in it is the run's own (``foreign``), resume checks, fresh starts, the metrics
log, atomic JSON, the trainer state of the job in progress, and the stop flag (Ctrl-C, SIGTERM).

Design decisions
* A directory holds only what the run wrote: a fresh run starts in a new or empty directory or
  in one of its own runs, and with --overwrite removes only names it writes, each checked to be
  its own; anything else is refused by name. A model directory is never a run directory.
* A resumed run is the run it continues: every option that shapes what is trained must equal
  config.json's (``RESUMABLE`` lists the few that may change); every mismatch in one line.
* The metrics log keeps history exact: a job that (re)starts at step s drops its lines after s;
  a partial last line (SIGKILL, a full disk) is ignored when read and dropped when truncated.
* Numbers written are finite; NaN is this project's "unknown" (a skip rate where no chunk is
  known irrelevant) and is written as such.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
from pathlib import Path

import torch

from checkpoint import read_json, recover_checkpoint, save_checkpoint
from cli import UserError

# Options a resumed run may change: they change how fast or how visibly a run goes, not what it
# trains. (Seeds: each seed directory records its own seed; a gathering run names them all.)
RESUMABLE = {"resume", "overwrite", "threads", "log_every", "save_every", "device", "out",
             "seeds", "preset"}
# What a run writes at the top of its directory, besides one directory per job.
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint", "eval.json", "traces.md",
             "curves.png", "timeline.png")
# What a multi-seed run (--seeds) writes at the top of its directory, besides seed<S>/.
SEEDS_FILES = ("eval.json", "compare.png")
# What save_checkpoint writes in a model directory (trainer.pt: the checkpoint's trainer state).
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "trainer.pt")
# Fields every metrics line has (train.py's training loop writes them).
METRIC_FIELDS = ("job", "stage", "step")
SEED_DIR = re.compile(r"seed(\d+)")


def _non_finite(obj, where: str = ""):
    """(key path, value) of the first infinity in a JSON-able object, or None."""
    if isinstance(obj, float) and math.isinf(obj):
        return where or "the value", obj
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        if found := _non_finite(value, f"{where}.{key}" if where else str(key)):
            return found
    return None


def _dumps(path: Path, obj, **kw) -> str:
    """JSON text of ``obj``; an infinity (an overflowed number: never a result) is a UserError
    naming the file and the key, and nothing is written."""
    if found := _non_finite(obj):
        raise UserError(f"{path}: {found[0]} is {found[1]}, not a finite number (a reward or "
                        "metric overflowed: lower --alpha/--beta?); nothing was written")
    return json.dumps(obj, default=str, **kw)


def _write(path: Path, text: str, mode: str = "w", name: Path | None = None) -> None:
    """Write ``text`` to ``path``; a failed write (a full disk) names the file (``name``, the one
    the user knows, if given) and leaves no temporary file behind."""
    try:
        with open(path, mode) as f:
            f.write(text)
    except OSError as e:
        if name is not None:                  # ``path`` is a temporary file: leave none behind
            path.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(name or path)) from None


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temporary file, then rename); infinities are refused (``_dumps``)."""
    text = _dumps(path, obj, indent=2) + "\n"
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")    # parallel seeds share OUT/
    _write(tmp, text, name=path)
    os.replace(tmp, path)


def read_json_lines(path: Path, fields=METRIC_FIELDS) -> list[dict]:
    """The records of a JSON-lines log, each an object with ``fields``; a partial last line (a
    killed writer's) is ignored."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise UserError(f"{path}:{i + 1}: not a JSON line (the metrics log is damaged)") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{i + 1}: not a JSON object (the metrics log is damaged)")
        if missing := [f for f in fields if f not in record]:
            raise UserError(f"{path}:{i + 1}: field '{missing[0]}' is missing (the metrics log "
                            "is damaged)")
        records.append(record)
    return records


def config_kind(config: dict) -> str | None:
    """"run" for a config.json of train.py, "model" for a model's (Hugging Face), else None."""
    if {"stage", "seed", "sft_steps", "rl_steps", "lam"} <= set(config):
        return "run"
    if "architectures" in config or "model_type" in config:
        return "model"
    return None


def dir_kind(path: Path) -> str | None:
    """What a directory is: "run" (a config.json of train.py), "model" (a model's config.json),
    "seeds" (seed<S>/ run directories of a multi-seed run), "other" (anything else that is not
    empty), or None (missing or empty)."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / "config.json").is_file():
        kind = config_kind(_try_config(path / "config.json"))
        if kind:
            return kind
    names = [p for p in path.iterdir() if p.name != "lock"]
    if any(SEED_DIR.fullmatch(p.name) and dir_kind(p) == "run" for p in names):
        return "seeds"
    return "other" if names else None


def run_models(path: Path) -> list[Path]:
    """The final models in a run directory, one per finished job (not the checkpoint, the job in
    progress)."""
    return [p for p in sorted(Path(path).iterdir()) if p.is_dir() and p.name != "checkpoint"
            and (p / "config.json").is_file() and dir_kind(p) == "model"]


def check_model_path(option: str | None, model: str) -> None:
    """A model path (of ``option``, if it came from one) that is empty or a run directory (not a
    model) is refused, naming the models inside the run."""
    where = f"option {option} {model}" if option else model
    if not model.strip():
        raise UserError(f"option {option} is empty: give a checkpoint directory, a .gguf file or "
                        "smollm2" if option else "the model path is empty")
    path = Path(model)
    kind = dir_kind(path) if path.is_dir() else None
    if kind in ("run", "seeds"):
        inside = run_models(path) if kind == "run" else [
            m for p in sorted(path.iterdir()) if SEED_DIR.fullmatch(p.name) for m in run_models(p)]
        raise UserError(f"{where} is a run directory of train.py, not a model; "
                        + (f"its models: {', '.join(str(m) for m in inside)}" if inside
                           else "it holds no trained model yet"))


def file_digest(path) -> str:
    """sha256 of a file's bytes: what identifies a data file in config.json."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_out(out: str) -> Path:
    """--out as an absolute path; an empty --out or a symbolic-link loop is a UserError."""
    if not out.strip():
        raise UserError("option --out is empty: give the run directory (default runs/default)")
    try:
        return Path(out).resolve()
    except (RuntimeError, OSError):        # RuntimeError: Python < 3.13's "Symlink loop"
        raise UserError(f"option --out {out}: a symbolic link loop") from None


def check_out(out: str, seeds: list[int] | None, fresh: bool = True) -> None:
    """The --out of a run (fresh or resumed) is not a model directory nor inside one, and holds
    the kind of run that this one is: a single run's directory is never a multi-seed run's
    (``seeds``), nor the other way round. The top of a multi-seed run holds its seed<S>/ and
    its summary; a fresh one starts where it holds nothing else."""
    resolved = resolve_out(out)
    for parent in [resolved, *resolved.parents]:
        if parent.is_dir() and (parent / "config.json").is_file() and dir_kind(parent) == "model":
            where = "is" if parent == resolved else f"is inside {parent}, which is"
            raise UserError(f"option --out {out} {where} a model directory (its config.json is a "
                            "model's), not a run directory; give another --out")
    kind = dir_kind(Path(out))
    if seeds is not None and kind == "run":
        raise UserError(f"option --seeds: --out {out} holds a single run (its config.json); a "
                        "multi-seed run writes seed<S>/ and eval.json there: give another --out")
    if seeds is None and kind == "seeds":
        names = sorted(p.name for p in Path(out).iterdir() if SEED_DIR.fullmatch(p.name))
        raise UserError(f"option --out {out} holds a multi-seed run ({', '.join(names)}); "
                        "name the seeds with --seeds, or give another --out")
    if seeds is not None:                  # the top of a multi-seed run: its summary, its seeds
        for name in os.listdir(out) if kind else []:
            target = Path(out) / name
            if SEED_DIR.fullmatch(name) and target.is_dir() and not target.is_symlink():
                continue
            if re.fullmatch(r"eval\.json\.\d+\.tmp", name):    # a parallel seed's write_json
                continue
            if (name in SEEDS_FILES and foreign(target)) or (fresh and name not in SEEDS_FILES):
                raise UserError(f"option --out {out} holds {target}, which a multi-seed run does "
                                "not write: it starts in a new or empty directory, or in one of "
                                "its own")


def foreign(target: Path) -> str | None:
    """Why ``target``, a name that a run writes, is not what this program wrote there, or None
    when it is (so that --overwrite may remove it)."""
    name = target.name
    if target.is_symlink():
        return "is a symbolic link (this program writes none)"
    if target.is_dir():                      # checkpoint/ or a job's model: save_checkpoint's
        extra = sorted(p.name for p in target.iterdir() if p.name not in MODEL_FILES or not p.is_file())
        if extra:
            return f"holds {extra[0]}, which this program does not write in a model directory"
        config = target / "config.json"
        if config.exists() and config_kind(_try_config(config)) != "model":
            return "has a config.json that is not a model's"
        return None
    if not target.is_file():
        return "is not a regular file (this program writes only files and directories)"
    if name == "config.json":
        return None if config_kind(_try_config(target)) == "run" else "is not a config.json of train.py"
    if name == "metrics.jsonl":
        try:
            read_json_lines(target)
        except (UserError, UnicodeDecodeError):
            return "is not a metrics log of train.py"
        return None
    if name == "eval.json":
        record = _try_config(target)
        return None if "methods" in record or "per_seed" in record else "is not an evaluation of train.py"
    if name == "traces.md":
        with open(target, "rb") as f:
            return None if f.read(40).startswith(b"# One held-out problem per method") else \
                "is not a traces.md of train.py"
    if name.endswith(".png"):
        with open(target, "rb") as f:
            head = f.read(256)
        return None if head.startswith(b"\x89PNG") and b"Matplotlib" in head else \
            "is not a plot this program drew"
    return "is not a file this program writes"


def _try_config(path: Path) -> dict:
    try:
        return read_json(path)
    except UserError:
        return {}


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
        """A config.json of train.py is here (a model's config.json is not a run's)."""
        return dir_kind(self.path) == "run"

    def config(self) -> dict:
        return read_json(self.path / "config.json")

    def check_resume(self, config: dict) -> None:
        """Refuse to resume with an option that shapes what is trained set otherwise than in the
        directory's config.json: one line listing every such option, its new and its old value."""
        old = self.config()
        differ = {key: (value, old[key]) for key, value in config.items()
                  if key not in RESUMABLE and key in old and old[key] != value}
        if differ:
            raise UserError(differences(differ, self.path))

    def check_fresh(self, writes: list[str], overwrite: bool) -> None:
        """A fresh run that writes ``writes`` (names in the directory) may start here: the
        directory is new or empty, or holds one of this program's runs; there, only with
        ``overwrite``, and only where every one of those names that exists is the run's own."""
        kind = dir_kind(self.path)
        if kind is None:
            return
        if kind != "run":
            what = {"model": "is a model directory, not a run directory",
                    "seeds": "holds a multi-seed run (seed<S>/); name its seeds with --seeds"}.get(
                kind, "is not empty and holds no run of train.py (no config.json of one)")
            raise UserError(f"option --out: {self.path} {what}: a fresh run starts in a new or "
                            "empty directory, or in one of its own runs; give another --out")
        here = self.check_own(writes)
        if not overwrite:
            raise UserError(f"option --out: {self.path} already holds a run; --resume continues "
                            "it, --overwrite replaces its " + (", ".join(here) or "files"))

    def check_own(self, writes: list[str]) -> list[str]:
        """The names of ``writes`` that exist here, once each is checked to be what this program
        wrote (a fresh run replaces them, a resumed one rewrites or finishes them); one that is
        not is refused by name."""
        here = [name for name in writes if (self.path / name).exists() or (self.path / name).is_symlink()]
        for name in here:
            if reason := foreign(self.path / name):
                raise UserError(f"option --out: {self.path / name} {reason}; the run would replace "
                                "it (even --overwrite removes only what this program wrote): move "
                                "it away, or give another --out")
        return here

    def start_fresh(self, writes: list[str], overwrite: bool) -> None:
        """Make room for a fresh run that writes ``writes`` (names in the directory): refuse
        where ``check_fresh`` does; else remove those names only."""
        if not self.main:
            return
        self.check_fresh(writes, overwrite)
        for name in writes:
            target = self.path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()

    # -- the metrics log ---------------------------------------------------------------------
    def log(self, record: dict) -> None:
        if self.main:
            _write(self.metrics, _dumps(self.metrics, record) + "\n", "a")   # an infinity: refused

    def records(self) -> list[dict]:
        return read_json_lines(self.metrics)

    def truncate(self, job: str, step: int) -> None:
        """Job ``job`` (re)starts after step ``step``: drop its lines logged after it, and a
        partial last line, so that the log holds each step once."""
        if not self.main or not self.metrics.exists():
            return
        keep = [r for r in self.records() if not (r["job"] == job and r["step"] > step)]
        tmp = self.metrics.with_suffix(".tmp")
        _write(tmp, "".join(json.dumps(r) + "\n" for r in keep), name=self.metrics)
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
        raise UserError(f"{state_file}: cannot read the trainer state ({type(e).__name__}); delete "
                        f"{path / 'checkpoint'} to train job '{job}' again from its start (the "
                        "finished models beside it are kept)") from None
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
            print("\nstopping: training finishes its step and saves a checkpoint, an evaluation "
                  "stops after the model it is on; --resume continues (Ctrl-C again to quit "
                  "at once)", flush=True)


def differences(differ: dict, path: Path) -> str:
    """The one line that refuses a resume: every option that differs, its new and old value."""
    may = ", ".join(f"--{k.replace('_', '-')}" for k in sorted(
        RESUMABLE - {"resume", "out", "overwrite", "preset", "seeds"}))
    items = [f"--{key.replace('_', '-')} = {_show(new)} ({_show(old)})" for key, (new, old) in differ.items()]
    head = f"option {items[0]}" if len(items) == 1 else f"options {', '.join(items)}"
    return (f"{head} differ{'s' if len(items) == 1 else ''} from the run in {path} (its value in "
            f"brackets); --resume continues a run as it was started (only {may} may change)")


def _show(value) -> str:
    if isinstance(value, list):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)
