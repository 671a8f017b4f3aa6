"""cli.py — the contract every program of the project keeps with its user.

Bad input — an option, a data file, a checkpoint, a missing optional package — ends a program
with one line ``error: …`` that names the option, file, line, field or tensor, and exit status 2,
before any work starts where it can be checked that early. A bug keeps its traceback. This file
holds the pieces of that contract, so that ``train.py``, ``rollout.py``, ``data.py`` and the tools
in ``tools/`` read and fail the same way:

* ``UserError`` (and ``CheckpointError``): bad input the user can fix, raised anywhere;
* ``run_cli``: turns a UserError into the one line and exit status 2;
* ``ArgumentParser``: argparse whose own errors are UserErrors (no usage dump);
* ``checked``, ``at_least``, ``positive``: option types that carry their rule, so that a rule is
  declared next to its option; ``check_options`` for the rules that relate several options;
* ``number_list``, ``check_device`` and ``THREADS``: option types shared by several programs.

It imports nothing from the project: every other module may import it.
"""
from __future__ import annotations

import argparse
import errno
import math
import os
import sys

import torch


class UserError(Exception):
    """Bad input from the user (a checkpoint, a data file, an option, a missing optional package),
    as opposed to a bug. The message names the file, line, field, tensor or option. Programs
    started with `run_cli` print it as one line `error: ...` and exit with status 2."""


class CheckpointError(UserError):
    """A checkpoint, tokenizer or GGUF file that cannot be loaded; the message names file and field."""


# What the machine, not the program, did wrong: a full disk, a read-only file system, no
# permission. One line, like bad input: there is nothing in a traceback for the user to read.
ENVIRONMENT_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def run_cli(main) -> None:
    """Run a program's `main()`: a UserError — or a full disk, a read-only file system, missing
    permissions — ends it with one line on stderr and exit status 2; a second Ctrl-C with one
    line and status 130; any other exception is a bug and keeps its traceback. Under torchrun
    every process checks the same options and fails the same way: only rank 0 says so, so that
    a bad option is one line, not one per process. Once the processes have started working
    together (the process group is up), each says its own error, naming its rank."""
    rank = os.environ.get("RANK", "0")                  # torchrun sets RANK; alone it is unset

    def say(line: str) -> None:
        if rank == "0":
            print(line, file=sys.stderr)
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            print(line.replace(": ", f": rank {rank}: ", 1), file=sys.stderr)
    try:
        main()
    except UserError as e:
        say(f"error: {e}")
        sys.exit(2)
    except OSError as e:
        if e.errno not in ENVIRONMENT_ERRORS:
            raise
        say(f"error: {e.filename or 'a file'}: {e.strerror}")
        sys.exit(2)
    except KeyboardInterrupt:
        say("interrupted: stopped without saving (the last checkpoint is intact)")
        sys.exit(130)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help shows every option's default once: "(default: X)" after its help, unless the
    default is None (the help then says what happens without it) or a flag's False."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = not any(action.default is v for v in (None, False, argparse.SUPPRESS))
        if shown and action.option_strings and "%(default)" not in text:
            text += (" " if text else "") + "(default: %(default)s)"
        return text

    def _format_action(self, action):
        if action.option_strings:            # argparse prints no help line for an empty help
            action.help = self._get_help_string(action) or action.help
        return super()._format_action(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors (one line, no usage dump), so that an option checked
    by hand after parsing and one argparse rejects read the same: "option --x ..."."""

    def error(self, message):
        if message.startswith("argument "):
            message = "option " + message.removeprefix("argument ").replace(": = ", " = ", 1)
        raise UserError(message)


def checked(kind, ok, rule: str):
    """An argparse ``type`` that parses with ``kind`` and accepts a value only where ``ok``:
    the rule is declared next to its option ("option --x = V must be RULE" otherwise). A float
    must also be finite: inf and nan are never a meaningful setting."""
    def parse(text: str):
        value = kind(text)                     # ValueError: argparse says "invalid int value"
        if (kind is float and not math.isfinite(value)) or not ok(value):
            raise argparse.ArgumentTypeError(f"= {text} must be {rule}")
        return value
    parse.__name__ = kind.__name__
    return parse


# One thread per core is what is sensible; a few more only slow a program down, and far more
# (tens of thousands) crash torch's thread pool.
CORES = os.cpu_count() or 1
THREADS = checked(int, lambda v: 1 <= v <= 4 * CORES,
                  f"between 1 and {4 * CORES} (4 x this machine's {CORES} cores; one thread per "
                  "core is what is sensible)")


def at_least(lo, kind=int):
    return checked(kind, lambda v: v >= lo, f"at least {lo}")


def positive(kind=float):
    return checked(kind, lambda v: v > 0, "positive")


def check_options(args, rules: list[tuple[str, bool, str]]) -> None:
    """``rules`` are (option, holds, what it must be); the first that does not hold is a
    UserError "option --x = VALUE must be WHAT" naming the value ``args`` holds. A float option
    named by a rule must also be finite, whatever the rule says (inf > 0 holds)."""
    for option, ok, rule in rules:
        value = getattr(args, option[2:].replace("-", "_"))
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"option {option} = {value} must be a finite number")
        if not ok:
            if isinstance(value, list):
                value = ",".join(f"{v:g}" for v in value)
            raise UserError(f"option {option} = {value} must be {rule}")


def number_list(option: str, text: str, kind) -> list:
    """A comma-separated option value ("0,0.25") as a list of ``kind``; empty items are ignored."""
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"option {option} = {text!r} is not a comma-separated list of numbers") from None
    if not values:
        raise UserError(f"option {option} is empty")
    if not all(math.isfinite(v) for v in values):          # inf and nan are never a setting
        raise UserError(f"option {option} = {text} must hold finite numbers")
    return values


def check_device(device: str) -> None:
    """A --device option: 'cpu', 'cuda' or 'cuda:N' of a GPU this machine has."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"option --device = {device!r} is not a device (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"option --device = {device!r}: no such CUDA device on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"option --device = {device!r}: only cpu and cuda are supported")
