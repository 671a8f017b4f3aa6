"""parallel.py — data parallelism across processes (torchrun), and nothing else.

Each rank rolls out and trains on its contiguous share of a step's problems; the loss of every
rank is divided by the policy-token count of the whole step (``global_sum``), and gradients are
summed (``sync_gradients``), so that the update is exactly the single-process one. Without
torchrun every function here is the identity of one process.

Design decisions
* A plain all-reduce of gradients instead of DistributedDataParallel: ranks may run different
  numbers of micro-batches, or none when they hold no group of a mini-batch, which DDP's
  per-backward hooks forbid.
* Ranks must agree on when to stop (``Dist.any``): Ctrl-C reaches them at different moments, and
  one rank leaving early would hang the next collective.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cli import UserError


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

    def gather(self, x: int, device) -> list[int]:
        """``x`` of every rank, in rank order."""
        if not dist.is_initialized():
            return [x]
        t = torch.zeros(self.world, dtype=torch.long, device=device)
        t[self.rank] = x
        dist.all_reduce(t)
        return t.tolist()

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
    for option in ("rl_batch", "sft_batch"):
        if getattr(args, option) % d.world:
            raise UserError(f"option --{option.replace('_', '-')} = {getattr(args, option)} must "
                            f"be divisible by the {d.world} ranks")
    return d


def global_sum(x: float, device) -> float:
    """Sum of ``x`` over all data-parallel ranks (``x`` itself in a single process)."""
    if not dist.is_initialized():
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t)


def sync_gradients(model) -> None:
    """Sum gradients over ranks. Each rank's loss is already divided by the *global* token count,
    so the sum is exactly the single-process gradient of the whole step."""
    if not dist.is_initialized():
        return
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
