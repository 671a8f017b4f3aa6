"""parallel.py — data parallelism across processes (torchrun), and nothing else.

Every rank rolls out its share of a round's problems and all ranks then hold every episode
(``Dist.gather``), so dynamic sampling, the advantages and the logged metrics are the same on
every rank and the same as in one process. In the update each rank computes its share of each
mini-batch's rows (``Dist.share``); the loss is divided by the whole mini-batch's token count
and the gradients are summed (``sync_gradients``), which is exactly the single-process step.
Without torchrun every method here is the identity of one process.

Design decisions
* A plain all-reduce of gradients instead of DistributedDataParallel: a rank may hold fewer or
  no rows of a mini-batch, and DDP's per-backward hooks need every rank to run the same backward.
* Ranks must agree on when to stop (``Dist.any``): Ctrl-C reaches them at different moments, and
  one rank leaving early would hang the next collective.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    """Where this process stands in data-parallel training (rank 0 of 1 without torchrun)."""
    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (after rank 0 wrote files the others will read)."""
        if self.world > 1:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t)

    def share(self, items: list) -> list:
        """This rank's contiguous share of ``items``, near-equal (the first ranks one longer)."""
        n, extra = divmod(len(items), self.world)
        start = self.rank * n + min(self.rank, extra)
        return items[start:start + n + (self.rank < extra)]

    def gather(self, items: list) -> list:
        """Every rank's ``items`` (its ``share`` of a list), concatenated in rank order."""
        if self.world == 1:
            return items
        parts = [None] * self.world
        dist.all_gather_object(parts, items)
        return [x for part in parts for x in part]

    def sum(self, values: dict) -> dict:
        """``values`` (numbers) summed over the ranks."""
        if self.world == 1:
            return values
        t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(values, t.tolist()))


def setup_distributed(args) -> Dist:
    """Join the process group when started by torchrun (gloo on CPU, nccl on CUDA)."""
    if "RANK" not in os.environ:
        return Dist(device=args.device)
    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    dist.init_process_group(backend)
    if args.device.startswith("cuda"):
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(args.device)
    return Dist(dist.get_rank(), dist.get_world_size(), args.device)


def sync_gradients(model) -> None:
    """Sum gradients over ranks. Each rank's loss is already divided by the whole step's token
    count, so the sum is exactly the single-process gradient. Nothing in one process."""
    if not dist.is_initialized():
        return
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
