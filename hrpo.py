"""hrpo.py — Hierarchical Relative Policy Optimisation: advantages, the clipped loss, the updates.

For a group of G rollouts of one problem (docs/method.md §4):

    Â^g_i = (R_i   − mean R)   / (std R   + ε)      global reward, as in GRPO
    Â^s_i = (R^s_i − mean R^s) / (std R^s + ε)      streaming-phase reward
    Â^d_i = (R^d_i − mean R^d) / (std R^d + ε)      deep-phase reward
    A_{i,t} = λ·Â^s_i + (1−λ)·Â^g_i                 for policy tokens of the streaming phase
    A_{i,t} = λ·Â^d_i + (1−λ)·Â^g_i                 for policy tokens of the deep phase
    loss = −1/N Σ_{i,t} min(ρ_{i,t} A_{i,t}, clip(ρ_{i,t}, 1−ε_low, 1+ε_high) A_{i,t})

ρ = π_θ/π_old per token under the sampling temperature, N the policy tokens of the optimiser
step. λ = 0 is exactly GRPO. One rollout batch gives ``mini_batches`` optimiser steps of whole
groups (DAPO / verl's mini-batches), all against the rollout's log-probs: the first has ρ = 1
exactly, the later ones are where the clip acts.

Design decisions
* The token mean is per optimiser step (DAPO): N is counted on the whole mini-batch before it is
  split into micro-batches, so accumulation gives exactly the mini-batch's gradient.
* A group whose rewards are equal (std ≤ ε) gets exactly zero advantage: no signal, and dynamic
  sampling (train.py) replaces it; ε also keeps rounding noise from becoming a full advantage.
* An optional k3 KL to a frozen reference (``kl_beta``, 0 by default) is a loss term; the logged
  ``kl_rollout`` only measures how far the updates moved from the policy that rolled out.
* [ours] λ = 0.25 by default: a quarter of phase-local signal teaches skipping without letting
  group-normalised length differences outvote the answer (docs/results.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from adasr import DEEP, Episode
from model import token_logprobs
from parallel import sync_gradients
from rewards import Rewards


@dataclass(frozen=True)
class HRPOConfig:
    """Knobs of the HRPO update; the defaults are every program's. ``lam`` = 0 is GRPO."""
    lam: float = 0.25
    eps_low: float = 0.2
    eps_high: float = 0.28
    kl_beta: float = 0.0
    temperature: float = 1.0
    mini_batches: int = 4
    std_eps: float = 1e-4
    credit: str = "stage"           # where the phase advantages act: CREDITS


# [ours, the paper's granularity ablation] stage: every token of a phase gets its phase's
# advantage; chunk: each streaming unit (the thought or skip after chunk k) its own, from a reward
# per unit normalised across the group at the same chunk (rewards.chunk_rewards); boundary: the
# phase advantages act only on the tokens that decide the protocol — the first token after each
# chunk (<EOT> for a skip, or a thought's first word) and the deep phase's first — and every other
# token gets the global one. λ = 0 is GRPO for all three. docs/method.md §4.
CREDITS = ("stage", "chunk", "boundary")


# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------

def group_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """(B, G) rewards → (B, G) advantages, normalised within each group (row). Below ``eps`` the
    std is rounding noise (0.2 + 0.2 + 0.2 is not 3 × 0.2): the group gets exactly zero."""
    if x.numel() == 0:                  # no group at all (a step whose groups all lacked signal)
        return x
    std = x.std(1, unbiased=False, keepdim=True)
    return torch.where(std > eps, (x - x.mean(1, keepdim=True)) / (std + eps), 0.0)


def advantages(rewards: list[Rewards], group_size: int, lam: float, eps: float = HRPOConfig.std_eps
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


def token_advantages(episodes: list[Episode], rewards: list[Rewards], group_size: int,
                     cfg: HRPOConfig) -> list[torch.Tensor]:
    """The advantage of every token of every rollout (0 at observations), for ``cfg.credit``."""
    a_stream, a_deep = advantages(rewards, group_size, cfg.lam, cfg.std_eps)
    if cfg.credit == "chunk":
        a_units = chunk_advantages(rewards, group_size, cfg)
    if cfg.credit == "boundary":
        a_global, _ = advantages(rewards, group_size, 0.0, cfg.std_eps)
    out = []
    for i, ep in enumerate(episodes):
        adv = torch.zeros(len(ep.tokens))
        previous_policy = False
        for t, (pol, ph, k) in enumerate(zip(ep.is_policy, ep.phase, ep.chunk)):
            if pol:
                a = a_deep[i] if ph == DEEP else a_stream[i]
                if cfg.credit == "chunk" and ph != DEEP:
                    a = a_units[i][k]
                elif cfg.credit == "boundary" and previous_policy:   # not a decision token
                    a = a_global[i]
                adv[t] = a
            previous_policy = pol
        out.append(adv)
    return out


def chunk_advantages(rewards: list[Rewards], group_size: int, cfg: HRPOConfig) -> list[torch.Tensor]:
    """Per rollout, the advantage of each streaming unit: λ·Â^c_{i,k} + (1−λ)·Â^g_i, with the
    unit rewards (``Rewards.chunks``) normalised across the group at the same chunk k."""
    if any(r.chunks is None for r in rewards):
        raise ValueError("credit 'chunk' needs per-chunk rewards (a synthetic task's problems)")
    g = group_normalize(torch.tensor([r.total for r in rewards], dtype=torch.float64)
                        .view(-1, group_size), cfg.std_eps)
    out = []
    for b in range(len(rewards) // group_size):
        group = rewards[b * group_size:(b + 1) * group_size]
        units = torch.tensor([r.chunks for r in group], dtype=torch.float64)     # (G, K)
        c = group_normalize(units.T, cfg.std_eps).T                              # across G per k
        out += [(cfg.lam * c[i] + (1 - cfg.lam) * g[b, i]).float() for i in range(group_size)]
    return out


def group_signal(episodes: list[Episode], rewards: list[Rewards], group_size: int,
                 cfg: HRPOConfig) -> list[bool]:
    """For each group of rollouts, does it carry any signal (a non-zero token advantage)?"""
    adv = token_advantages(episodes, rewards, group_size, cfg)
    return [any(bool(a.any()) for a in adv[b:b + group_size])
            for b in range(0, len(adv), group_size)]


# ---------------------------------------------------------------------------------------------
# From episodes to tensors, and log-probs at policy positions
# ---------------------------------------------------------------------------------------------

@dataclass
class Batch:
    """Episodes as right-padded tensors, all (N, T). Position t holds token t; ``is_policy[t]``
    says the model wrote it, so its log-prob is read from the logits at position t-1."""
    ids: torch.Tensor           # long
    is_policy: torch.Tensor     # bool: the model wrote the token; False on padding
    old_logp: torch.Tensor      # float, sampling log-probs (0 where not policy)
    adv: torch.Tensor           # float, per-token advantage (0 where not policy)
    lengths: torch.Tensor       # (N,) long, tokens of each episode

    @property
    def n_tokens(self) -> int:
        return int(self.is_policy.sum())

    def rows(self, idx: torch.Tensor) -> Batch:
        """The episodes ``idx`` (N',), cut to the longest of them."""
        width = int(self.lengths[idx].max())
        return Batch(self.ids[idx, :width], self.is_policy[idx, :width], self.old_logp[idx, :width],
                     self.adv[idx, :width], self.lengths[idx])


def collate(episodes: list[Episode], device, advantages: list[torch.Tensor] | None = None) -> Batch:
    """Pad episodes and their per-token advantages into a Batch (without advantages, SFT: 0)."""
    N, T = len(episodes), max((len(ep.tokens) for ep in episodes), default=0)
    ids = torch.zeros(N, T, dtype=torch.long)
    is_policy = torch.zeros(N, T, dtype=torch.bool)
    old_logp = torch.zeros(N, T)
    adv = torch.zeros(N, T)
    for i, ep in enumerate(episodes):
        n = len(ep.tokens)
        ids[i, :n] = torch.tensor(ep.tokens)
        is_policy[i, :n] = torch.tensor(ep.is_policy)
        old_logp[i, :n] = torch.tensor(ep.logprobs)
        if advantages is not None:
            adv[i, :n] = advantages[i] * is_policy[i, :n]
    lengths = torch.tensor([len(ep.tokens) for ep in episodes])
    return Batch(ids.to(device), is_policy.to(device), old_logp.to(device), adv.to(device),
                 lengths.to(device))


def policy_logprobs(model, batch: Batch, temperature: float, max_logits: int = 2 ** 24,
                    entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) of the policy tokens of ``batch`` under ``model``.

    Returns (logp, entropy), each (P,) with P = batch.n_tokens, in row-major order of the policy
    positions (``model.token_logprobs``). The forward computes each episode's real tokens only
    (``lengths``: no matmul on padding), and the prefix the episodes share (the instruction) once.
    """
    # the last token of an episode is never an input: position t predicts token t+1
    hidden = model(batch.ids[:, :-1], return_hidden=True, lengths=batch.lengths - 1)  # (N, T-1, D)
    target_mask = batch.is_policy[:, 1:]
    h = hidden[target_mask]                                         # (P, D)
    targets = batch.ids[:, 1:][target_mask]                         # (P,)
    return token_logprobs(model, h, targets, temperature, max_logits, entropy)


# ---------------------------------------------------------------------------------------------
# The clipped loss
# ---------------------------------------------------------------------------------------------

def clipped_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, n_tokens: int,
                 eps_low: float, eps_high: float, ref_logp: torch.Tensor | None = None,
                 kl_beta: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The PPO/DAPO clipped surrogate, summed over these P tokens and divided by ``n_tokens``.

    logp, old_logp, adv, ref_logp: (P,). Returns (loss, stats) where stats holds sums (not means)
    over these tokens, so micro-batches add up: ``clip_low`` / ``clip_high`` count the tokens whose
    ratio left the range on the side that matters for their advantage's sign (below 1−ε_low with
    A < 0, above 1+ε_high with A > 0: the tokens the clip switched off), ``ratio_dev`` sums
    |ρ − 1| and ``kl_rollout`` the k3 estimate of KL(π_old ‖ π_θ).
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
                 "ratio_dev": float((ratio - 1).abs().sum()),
                 "kl_rollout": float((ratio - 1 - log_ratio).sum())}
    return per_token.sum() / n_tokens, stats


# ---------------------------------------------------------------------------------------------
# Optimiser steps
# ---------------------------------------------------------------------------------------------

def _at_policy(batch: Batch, x: torch.Tensor) -> torch.Tensor:
    """Values of a per-token (N, T) tensor at the policy positions, in ``policy_logprobs`` order."""
    return x[:, 1:][batch.is_policy[:, 1:]]


def _step(model, optimizer, batch: Batch, micro_batch: int, n_tokens: int, temperature: float,
          loss_of, max_grad_norm: float, with_entropy: bool) -> dict:
    """One optimiser step: gradients accumulated over micro-batches of ``batch``'s rows, clipped.

    ``loss_of(mb, logp) -> (loss, stats)`` gives a micro-batch's loss already divided by
    ``n_tokens`` (the step's policy tokens) and its stats as sums, which add up here."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    totals: dict[str, float] = {"loss": 0.0}
    # Micro-batches of episodes of similar length (sorted), each cut to its longest episode: the
    # attention, which alone works on the padded layout, then wastes little.
    order = batch.lengths.argsort()
    for start in range(0, len(order), micro_batch):
        mb = batch.rows(order[start:start + micro_batch])
        if mb.n_tokens == 0:
            continue
        logp, entropy = policy_logprobs(model, mb, temperature, entropy=with_entropy)
        loss, stats = loss_of(mb, logp)
        loss.backward()
        stats = {"loss": loss.item(), **stats}
        if with_entropy:
            stats["entropy"] = entropy.sum().item()
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + v
    sync_gradients(model)              # data parallel: add up the ranks' gradients (else nothing)
    totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm))
    optimizer.step()
    return totals


def split_groups(n_groups: int, parts: int) -> list[range]:
    """Groups 0..n_groups-1 split into ``parts`` contiguous runs of near-equal size (the first
    ones one longer); a run is empty when there are fewer groups than parts."""
    size, extra = divmod(n_groups, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + size + (i < extra))
    return [range(bounds[i], bounds[i + 1]) for i in range(parts)]


STATS = ("loss", "entropy", "clip_low", "clip_high", "ratio_dev", "kl_rollout")


def rl_update(model, optimizer, episodes: list[Episode], rewards: list[Rewards], group_size: int,
              cfg: HRPOConfig, *, micro_batch: int, ref_model=None, max_grad_norm: float = 1.0,
              mine=lambda rows: rows) -> dict:
    """The HRPO update of one rollout batch: grouped ``episodes`` (B*G) and their ``rewards``.

    The advantages are computed here, once; then ``cfg.mini_batches`` mini-batches of whole
    groups, one optimiser step each, all against π_old = the rollout's log-probs. Every group
    given is trained on (choosing groups with signal is dynamic sampling's job). ``mine(rows)`` is the part of a mini-batch this process computes (data
    parallel: its share; all of it in one process). Returns sums over those tokens of ``STATS``
    (``means`` turns them into the logged metrics) and over updates of ``grad_norm``.
    """
    adv = token_advantages(episodes, rewards, group_size, cfg)
    device = next(model.parameters()).device
    sums = {"updates": 0, "policy_tokens": 0, "grad_norm": 0.0, **{k: 0.0 for k in STATS}}
    for part in split_groups(len(episodes) // group_size, cfg.mini_batches):
        rows = [g * group_size + i for g in part for i in range(group_size)]
        n_tokens = sum(sum(episodes[r].is_policy) for r in rows)   # N, all of the mini-batch's
        if n_tokens == 0:
            continue
        rows = mine(rows)
        batch = collate([episodes[r] for r in rows], device, [adv[r] for r in rows])

        def loss_of(mb, logp):
            ref_logp = None
            if cfg.kl_beta:
                with torch.no_grad():
                    ref_logp, _ = policy_logprobs(ref_model, mb, cfg.temperature)
            return clipped_loss(logp, _at_policy(mb, mb.old_logp), _at_policy(mb, mb.adv),
                                n_tokens, cfg.eps_low, cfg.eps_high, ref_logp, cfg.kl_beta)

        step = _step(model, optimizer, batch, micro_batch, n_tokens, cfg.temperature, loss_of,
                     max_grad_norm, with_entropy=True)
        sums["updates"] += 1
        sums["policy_tokens"] += n_tokens
        for k in ("grad_norm", *STATS):
            sums[k] += step.get(k, 0.0)
    return sums


def means(sums: dict) -> dict:
    """``rl_update``'s sums (over every process, when data parallel) → the logged metrics:
    ``loss`` and ``grad_norm`` per update, the others per policy token, ``updates`` as is."""
    n, u = max(sums["policy_tokens"], 1), max(sums["updates"], 1)
    return {"updates": float(sums["updates"]), "loss": sums["loss"] / u,
            "grad_norm": sums["grad_norm"] / u, **{k: sums[k] / n for k in STATS if k != "loss"}}


def sft_update(model, optimizer, episodes: list[Episode], micro_batch: int,
               max_grad_norm: float = 1.0, mine=lambda rows: rows) -> dict:
    """One supervised step: next-token cross-entropy on the policy tokens of gold episodes
    (observations are context, never targets), averaged over all policy tokens of the step.
    ``mine`` as in ``rl_update``; the loss returned is this process's part of the mean."""
    n_tokens = sum(sum(ep.is_policy) for ep in episodes)
    batch = collate([episodes[r] for r in mine(list(range(len(episodes))))],
                    next(model.parameters()).device)
    m = _step(model, optimizer, batch, micro_batch, n_tokens, 1.0,
              lambda mb, logp: (-logp.sum() / n_tokens, {}), max_grad_norm, with_entropy=False)
    return {"loss": m["loss"], "grad_norm": m["grad_norm"]}
