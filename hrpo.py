"""hrpo.py — Hierarchical Relative Policy Optimisation: advantages, the clipped loss, one RL step.

The whole algorithm, for a group of G rollouts of one problem (method.md §4):

    Â^g_i = (R_i   − mean R)   / (std R   + ε)      global reward, as in GRPO
    Â^s_i = (R^s_i − mean R^s) / (std R^s + ε)      streaming-phase reward
    Â^d_i = (R^d_i − mean R^d) / (std R^d + ε)      deep-phase reward
    A_{i,t} = λ·Â^s_i + (1−λ)·Â^g_i                 for policy tokens of the streaming phase
    A_{i,t} = λ·Â^d_i + (1−λ)·Â^g_i                 for policy tokens of the deep phase
    loss = −1/N Σ_{i,t} min(ρ_{i,t} A_{i,t}, clip(ρ_{i,t}, 1−ε_low, 1+ε_high) A_{i,t})

with ρ the token-level ratio π_θ/π_old under the sampling temperature and N the number of policy
tokens of the whole optimiser step. λ = 0 is exactly GRPO: every token of a rollout gets its
sequence-level advantage. With λ > 0 a rollout that thought wisely while reading but then botched
the answer gets credit for its streaming tokens and blame for its deep tokens, instead of one
verdict for both.

What this file owns: the advantages (``advantages``), turning episodes into padded tensors
(``collate``), log-probabilities of policy tokens under the current model (``policy_logprobs``),
the clipped loss (``clipped_loss``), one RL optimiser step with its metrics (``rl_step``), and the
SFT step (``sft_step``) that shares the same machinery.

Design decisions
----------------
* std is the population std of the group (G samples are the whole population we normalise).
  A group whose rewards are all equal (std below ε) has exactly zero advantage; such groups carry
  no signal and are dropped before the forward pass (DAPO's dynamic sampling, without resampling).
* The token mean is over all policy tokens of the optimiser step, counted *before* splitting into
  micro-batches; each micro-batch's loss is its token sum divided by that count, so gradient
  accumulation gives exactly the full-batch gradient, whatever the micro-batch size.
* Memory: the vocabulary projection is the big tensor ((tokens × vocab) floats, 49k wide for
  SmolLM2). Log-probs are computed only at policy positions, in chunks of rows of hidden states,
  each chunk under activation checkpointing so that its (chunk × vocab) logits are recomputed in
  the backward pass instead of being stored.
* Optional k3 KL to a frozen reference model (``kl_beta``; 0 by default, and then no reference
  model exists at all).
* [ours] λ = 0.25 by default: the phase rewards differ from the global one only in which costs
  they count, and group normalisation makes a one-token difference in streaming length a
  full-size advantage; a quarter of local signal was enough to teach skipping without letting
  length differences outvote the answer (with λ = 0.5 one of our seeds shrank relevant thoughts
  to "11." and lost most of its accuracy).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from adasr import DEEP, Episode
from model import token_logprobs
from rewards import Rewards


@dataclass(frozen=True)
class HRPOConfig:
    """Knobs of the HRPO update. ``lam`` = 0 is GRPO."""
    lam: float = 0.25
    eps_low: float = 0.2
    eps_high: float = 0.28
    kl_beta: float = 0.0
    temperature: float = 1.0
    std_eps: float = 1e-4


# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------

def group_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """(B, G) rewards → (B, G) advantages, normalised within each group (row).

    A group whose std is below ``eps`` gets exactly zero: its rewards are equal up to rounding
    (0.2 + 0.2 + 0.2 is not 3 × 0.2 in floating point), and dividing that rounding noise by a tiny
    std would turn it into a full-size advantage."""
    std = x.std(1, unbiased=False, keepdim=True)
    return torch.where(std > eps, (x - x.mean(1, keepdim=True)) / (std + eps), 0.0)


def advantages(rewards: list[Rewards], group_size: int, lam: float, eps: float = 1e-4
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-rollout advantages of the streaming and of the deep phase.

    rewards: B*G rewards, grouped (rows b*G … b*G+G-1 are one problem's samples).
    Returns (A_stream, A_deep), each (B*G,): the advantage every streaming / deep policy token of
    that rollout receives. With lam = 0 both equal the GRPO advantage.
    """
    def norm(values):
        return group_normalize(torch.tensor(values, dtype=torch.float64).view(-1, group_size), eps)
    g = norm([r.total for r in rewards])
    s = norm([r.stream for r in rewards])
    d = norm([r.deep for r in rewards])
    a_stream = lam * s + (1 - lam) * g
    a_deep = lam * d + (1 - lam) * g
    return a_stream.flatten().float(), a_deep.flatten().float()


# ---------------------------------------------------------------------------------------------
# From episodes to tensors, and log-probs at policy positions
# ---------------------------------------------------------------------------------------------

@dataclass
class Batch:
    """Episodes as right-padded tensors, all (N, T). Position t holds token t; ``policy[t]``
    says the model wrote it, so its log-prob is read from the logits at position t-1."""
    ids: torch.Tensor           # long
    policy: torch.Tensor        # bool, False on padding
    old_logp: torch.Tensor      # float, sampling log-probs (0 where not policy)
    adv: torch.Tensor           # float, per-token advantage (0 where not policy)

    @property
    def n_tokens(self) -> int:
        return int(self.policy.sum())

    def rows(self, sl: slice) -> Batch:
        return Batch(self.ids[sl], self.policy[sl], self.old_logp[sl], self.adv[sl])


def collate(episodes: list[Episode], device, a_stream: torch.Tensor | None = None,
            a_deep: torch.Tensor | None = None) -> Batch:
    """Pad episodes into a Batch; scatter each rollout's phase advantages onto its policy tokens.

    Without advantages (SFT) ``adv`` is zero.
    """
    N, T = len(episodes), max(len(ep.tokens) for ep in episodes)
    ids = torch.zeros(N, T, dtype=torch.long)
    policy = torch.zeros(N, T, dtype=torch.bool)
    old_logp = torch.zeros(N, T)
    adv = torch.zeros(N, T)
    for i, ep in enumerate(episodes):
        n = len(ep.tokens)
        ids[i, :n] = torch.tensor(ep.tokens)
        policy[i, :n] = torch.tensor(ep.policy)
        old_logp[i, :n] = torch.tensor(ep.logprobs)
        if a_stream is not None:
            deep = torch.tensor(ep.phase) == DEEP
            adv[i, :n] = torch.where(deep, a_deep[i], a_stream[i]) * policy[i, :n]
    return Batch(ids.to(device), policy.to(device), old_logp.to(device), adv.to(device))


def policy_logprobs(model, batch: Batch, temperature: float, chunk: int = 1024
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (and entropies) of the policy tokens of ``batch`` under ``model``.

    Returns (logp, entropy), each (P,) with P = batch.n_tokens, in row-major order of the policy
    positions. The vocabulary projection runs on at most ``chunk`` positions at a time, each under
    activation checkpointing; entropy is detached (a metric, not a loss term).
    """
    hidden = model(batch.ids[:, :-1], return_hidden=True)           # (N, T-1, D)
    target_mask = batch.policy[:, 1:]
    h = hidden[target_mask]                                         # (P, D)
    targets = batch.ids[:, 1:][target_mask]                         # (P,)

    def head(h_chunk, t_chunk):
        logits = model.logits(h_chunk)                              # (c, V)
        logp = token_logprobs(logits, t_chunk, temperature)
        with torch.no_grad():
            lsm = torch.log_softmax(logits.float() / temperature, dim=-1)
            entropy = -(lsm.exp() * lsm).sum(-1)
        return logp, entropy

    outs = [checkpoint(head, h[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
            if torch.is_grad_enabled() else head(h[i:i + chunk], targets[i:i + chunk])
            for i in range(0, h.shape[0], chunk)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


# ---------------------------------------------------------------------------------------------
# The clipped loss
# ---------------------------------------------------------------------------------------------

def clipped_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, n_tokens: int,
                 eps_low: float, eps_high: float, ref_logp: torch.Tensor | None = None,
                 kl_beta: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The PPO/DAPO clipped surrogate, summed over these P tokens and divided by ``n_tokens``.

    logp, old_logp, adv, ref_logp: (P,). Returns (loss, stats) where stats holds sums (not means)
    over these tokens, so micro-batches add up: clipped-low / clipped-high counts (tokens whose
    update the clip switched off) and the k3 estimate of KL(π_old ‖ π_θ) to the rollout policy.
    """
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    if kl_beta:
        d = ref_logp - logp                                         # k3: e^d − d − 1 ≥ 0
        per_token = per_token + kl_beta * (d.exp() - d - 1)
    with torch.no_grad():
        stats = {"clip_low": float(((ratio < 1 - eps_low) & (adv < 0)).sum()),
                 "clip_high": float(((ratio > 1 + eps_high) & (adv > 0)).sum()),
                 "kl": float((log_ratio.exp() - 1 - log_ratio).sum())}
    return per_token.sum() / n_tokens, stats


# ---------------------------------------------------------------------------------------------
# Optimiser steps
# ---------------------------------------------------------------------------------------------

def global_sum(x: float, device) -> float:
    """Sum of ``x`` over all data-parallel ranks (``x`` itself in a single process)."""
    if not dist.is_initialized():
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t)


def _sync_gradients(model) -> None:
    """Sum gradients over ranks. Each rank's loss is already divided by the *global* token count,
    so the sum is exactly the single-process gradient of the whole step. (A plain all-reduce
    rather than DistributedDataParallel: ranks may run different numbers of micro-batches, or
    none at all when all their groups had zero signal, which DDP's per-backward hooks forbid.)"""
    if not dist.is_initialized():
        return
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)


def _at_policy(batch: Batch, x: torch.Tensor) -> torch.Tensor:
    """Values of a per-token (N, T) tensor at the policy positions, in ``policy_logprobs`` order."""
    return x[:, 1:][batch.policy[:, 1:]]


def _step(model, optimizer, batch: Batch | None, micro_batch: int, n_tokens: int,
          temperature: float, loss_of, max_grad_norm: float) -> dict:
    """Accumulate gradients over micro-batches of rows, sync ranks, clip, take one optimiser step.

    ``loss_of(mb, logp) -> (loss, stats)`` returns the micro-batch's loss already divided by
    ``n_tokens`` (the step's token count over all ranks) and stats as sums; sums add up here.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    totals: dict[str, float] = {"loss": 0.0, "entropy": 0.0}
    for start in range(0, batch.ids.shape[0] if batch else 0, micro_batch):
        mb = batch.rows(slice(start, start + micro_batch))
        if mb.n_tokens == 0:
            continue
        logp, entropy = policy_logprobs(model, mb, temperature)
        loss, stats = loss_of(mb, logp)
        loss.backward()
        for k, v in {"loss": loss.item(), "entropy": entropy.sum().item() / n_tokens,
                     **stats}.items():
            totals[k] = totals.get(k, 0.0) + v
    _sync_gradients(model)
    totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm))
    optimizer.step()
    return totals


def rl_step(model, optimizer, episodes: list[Episode], rewards: list[Rewards], group_size: int,
            cfg: HRPOConfig, micro_batch: int = 8, ref_model=None,
            max_grad_norm: float = 1.0) -> dict:
    """One HRPO optimiser step on this rank's grouped rollouts. Returns the update's metrics.

    Groups with no signal (all advantages zero) are dropped first (dynamic sampling); when no
    rank has any signal left, no update is made (``updated`` = 0).
    """
    device = next(model.parameters()).device
    a_stream, a_deep = advantages(rewards, group_size, cfg.lam, cfg.std_eps)
    signal = ((a_stream != 0) | (a_deep != 0)).view(-1, group_size).any(1)      # (B,)
    keep = signal.repeat_interleave(group_size).nonzero().flatten().tolist()
    n_tokens = int(global_sum(float(sum(sum(episodes[i].policy) for i in keep)), device))
    metrics = {"zero_signal": 1.0 - float(signal.float().mean())}
    if n_tokens == 0:
        return {**metrics, "updated": 0.0}
    batch = collate([episodes[i] for i in keep], device, a_stream[keep], a_deep[keep]) \
        if keep else None

    def loss_of(mb, logp):
        ref_logp = None
        if cfg.kl_beta:
            with torch.no_grad():
                ref_logp, _ = policy_logprobs(ref_model, mb, cfg.temperature)
        return clipped_loss(logp, _at_policy(mb, mb.old_logp), _at_policy(mb, mb.adv), n_tokens,
                            cfg.eps_low, cfg.eps_high, ref_logp, cfg.kl_beta)

    totals = _step(model, optimizer, batch, micro_batch, n_tokens, cfg.temperature, loss_of,
                   max_grad_norm)
    for k in ("clip_low", "clip_high", "kl"):
        totals[k] = global_sum(totals.get(k, 0.0), device) / n_tokens
    return {**metrics, **totals, "updated": 1.0}


def sft_step(model, optimizer, episodes: list[Episode], micro_batch: int = 8,
             max_grad_norm: float = 1.0) -> dict:
    """One supervised step: next-token cross-entropy on the policy tokens of gold episodes
    (observations are context, never targets), averaged over all policy tokens of the step."""
    device = next(model.parameters()).device
    batch = collate(episodes, device)
    n_tokens = int(global_sum(float(batch.n_tokens), device))
    return _step(model, optimizer, batch, micro_batch, n_tokens, 1.0,
                 lambda mb, logp: (-logp.sum() / n_tokens, {}), max_grad_norm)
