"""Tests of adasr.py, rewards.py, rollout.py, hrpo.py and train.py (to be merged)."""
import json
import math

import pytest
import torch

from adasr import DEEP, INSTRUCTION, MARKERS, STREAM, Episode, Protocol, add_markers
from data import Problem, make_synthetic
from hrpo import (Batch, HRPOConfig, advantages, clipped_loss, collate, policy_logprobs,
                  rl_step, sft_step)
from model import Transformer, init_weights, tiny_config, train_bpe
from rewards import (RewardConfig, Rewards, answers_match, boxed_contents, extract_answer,
                     normalize_answer, score, summarize)
from rollout import rollout

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tiny():
    """A random tiny model, its BPE tokenizer (with the markers) and a protocol."""
    problems = make_synthetic(48, seed=1)
    texts = [INSTRUCTION] + [" ".join([p.question, *p.chunks, *p.thoughts, p.deep, p.rtt_deep])
                             for p in problems]
    tok = train_bpe(texts, 320, special_tokens=MARKERS)
    torch.manual_seed(0)
    model = Transformer(tiny_config(tok.vocab_size, dim=32, n_layers=2))
    init_weights(model, 0)
    add_markers(model, tok)
    return model.eval(), tok, Protocol(tok, wpm=150, decode_tps=20), problems


# =============================================================================================
# rewards.py — answer extraction and normalisation
# =============================================================================================

@pytest.mark.parametrize("text, boxes", [
    (r"so \boxed{5}", ["5"]),
    (r"\box{285}.", ["285"]),
    (r"\boxed{\frac{1}{2}} then \boxed{3}", [r"\frac{1}{2}", "3"]),
    (r"\boxed{{nested} braces}", ["{nested} braces"]),
    (r"\boxed{unclosed", []),
    ("no box at all", []),
])
def test_boxed_contents(text, boxes):
    assert boxed_contents(text) == boxes
    assert extract_answer(text) == (boxes[-1] if boxes else None)


@pytest.mark.parametrize("a, b, equal", [
    ("1,000", "1000", True), ("$1,000.00", "1000", True), ("12.0", "12", True),
    ("3/6", "1/2", True), (r"\frac{2}{4}", "0.5", True), (r"\dfrac{3}{4}", "0.75", True),
    ("50%", "50", True), ("5 apples", "5", True), (r"\text{5 km}", "5", True),
    ("-7", "-7.0", True), ("Paris.", "paris", True),
    ("5", "6", False), ("1, 2", "12", False), ("0.333", "1/3", False), ("", "0", False),
])
def test_normalize_answer(a, b, equal):
    assert (normalize_answer(a) == normalize_answer(b)) is equal
    assert answers_match(a, b) is equal
    assert not answers_match(None, b)


# =============================================================================================
# adasr.py — protocol, gold episodes, parsing, the latency clock
# =============================================================================================

def test_gold_stream_episode_structure(tiny):
    _, tok, protocol, problems = tiny
    p = problems[0]
    ep = protocol.gold(p, "stream")
    K = len(p.chunks)
    assert len(ep.tokens) == len(ep.policy) == len(ep.phase) == len(ep.chunk) == len(ep.logprobs)
    # observations are exactly the blocks, in order; policy tokens are exactly thoughts + deep
    obs = [t for t, pol in zip(ep.tokens, ep.policy) if not pol]
    assert obs == sum((ids for ids, _ in protocol.blocks(p, "stream")), [])
    assert not any(pol and t in (protocol.eos, protocol.eoq, protocol.eoi)
                   for t, pol in zip(ep.tokens, ep.policy))
    assert all(pol for t, pol in zip(ep.tokens, ep.policy) if t in (protocol.eot, protocol.eor))
    # one <EOT> per chunk, each in the streaming phase, labelled with its chunk
    eots = [(ph, ch) for t, ph, ch in zip(ep.tokens, ep.phase, ep.chunk) if t == protocol.eot]
    assert eots == [(STREAM, k) for k in range(K)]
    assert ep.tokens.index(protocol.eoi) < ep.tokens.index(protocol.eor)
    assert all(ph == DEEP and ch == K for ph, ch, pol, t in
               zip(ep.phase, ep.chunk, ep.policy, range(len(ep.tokens)))
               if pol and t > ep.tokens.index(protocol.eoi))
    parsed = ep.parsed
    assert parsed.valid, parsed.stream_errors + parsed.deep_errors
    assert parsed.thoughts == [t.strip() for t in p.thoughts]
    assert parsed.skips == [t == "" for t in p.thoughts]
    assert parsed.answer == p.answer and parsed.deep == p.deep.strip()
    assert score(ep, RewardConfig()).acc == 1.0


def test_gold_read_then_think_puts_all_thinking_after_the_stream(tiny):
    _, _, protocol, problems = tiny
    p = problems[1]
    ep = protocol.gold(p, "read_then_think")
    eoi = ep.tokens.index(protocol.eoi)
    assert not any(ep.policy[:eoi + 1]) and all(ep.policy[eoi + 1:])
    assert set(ep.phase[eoi + 1:]) == {DEEP}
    assert ep.parsed.valid and ep.parsed.answer == p.answer
    assert ep.parsed.skips == [True] * len(p.chunks)
    assert ep.residual_tokens == ep.deep_tokens == sum(ep.policy)      # the user waits for all
    assert ep.residual_s == pytest.approx(sum(ep.policy) / protocol.decode_tps)


def _hand_episode(protocol, problem, thoughts, deep_ids, layout="stream", truncated=False):
    """Episode with the problem's real observation blocks and hand-written policy token lists."""
    ep = Episode(problem, layout)
    blocks = protocol.blocks(problem, layout)
    for j, (ids, chunks) in enumerate(blocks):
        ep.append(ids, policy=False, phase=STREAM if j < len(blocks) - 1 else DEEP, chunk=chunks)
        if j < len(blocks) - 1 and j < len(thoughts):
            ep.append(thoughts[j], policy=True, phase=STREAM, chunk=j)
    ep.append(deep_ids, policy=True, phase=DEEP, chunk=len(problem.chunks))
    ep.truncated = truncated
    return protocol.finish(ep)


def _format_cases(pr, tok):
    think, skip = tok.encode(" ok") + [pr.eot], [pr.eot]
    deep = tok.encode(" so") + [pr.eor] + tok.encode(r" \boxed{3}") + [pr.eoa]
    return {
        "valid": ([think, skip], deep, False, None),
        "marker in thought": ([tok.encode(" ok") + [pr.eor, pr.eot], skip], deep, False,
                              "marker <EOR> inside the thought"),
        "thought without <EOT> (stopped)": ([think, tok.encode(" ok") + [pr.eoa]], [], False,
                                            "does not end with <EOT>"),
        "two <EOR>": ([think, skip], tok.encode(" a") + [pr.eor, pr.eor] + tok.encode(r"\boxed{3}")
                      + [pr.eoa], False, "2 <EOR> markers"),
        "no box": ([think, skip], tok.encode(" a") + [pr.eor] + tok.encode(" 3") + [pr.eoa], False,
                   "0 boxed answers"),
        "two boxes": ([think, skip], tok.encode(" a") + [pr.eor] + tok.encode(r"\boxed{3} \boxed{4}")
                      + [pr.eoa], False, "2 boxed answers"),
        "no <EOA>": ([think, skip], deep[:-1], True, "does not end with <EOA>"),
        "truncated": ([think, skip], deep[:-1], True, "truncated at the token budget"),
        "<EOT> in deep": ([think, skip], tok.encode(" a") + [pr.eot, pr.eor] + tok.encode(r"\boxed{3}")
                          + [pr.eoa], False, "marker <EOT> inside the deep phase"),
    }


@pytest.mark.parametrize("case", ["valid", "marker in thought", "thought without <EOT> (stopped)",
                                  "two <EOR>", "no box", "two boxes", "no <EOA>", "truncated",
                                  "<EOT> in deep"])
def test_format_validity(tiny, case):
    _, tok, pr, _ = tiny
    problem = Problem("t", "How many?", ["Tom has 3.", "It rains."], "3", relevant=[True, False])
    thoughts, deep, truncated, error = _format_cases(pr, tok)[case]
    ep = _hand_episode(pr, problem, thoughts, deep, truncated=truncated)
    errors = ep.parsed.stream_errors + ep.parsed.deep_errors
    r = score(ep, RewardConfig())
    if error is None:
        assert ep.parsed.valid and ep.parsed.answer == "3" and ep.parsed.skips == [False, True]
        assert (r.fmt, r.acc) == (0.0, 1.0)
    else:
        assert any(error in e for e in errors), errors
        assert (r.fmt, r.acc) == (-1.0, 0.0)


def test_clock_hand_computed(tiny):
    """wpm 60 → 1 word/s; decode 2 tok/s → 0.5 s/token. Chunks of 2, 3, 1 words arrive at
    2, 5, 6 s. Thought 0 (2 tokens) runs 2→3: fits. Thought 1 (6 tokens) runs 5→8: the tokens
    finished at 6.5, 7, 7.5, 8 spill past a_last = 6. Chunk 2 arrives at 6 but waits for the model
    until 8; its skip finishes at 8.5. Deep (3 tokens) finishes at 9, 9.5, 10."""
    _, tok, pr, _ = tiny
    clock = Protocol(tok, wpm=60, decode_tps=2)
    problem = Problem("t", "How many?", ["a b", "c d e", "f"], "1")
    x = tok.encode(" x")[0]
    ep = _hand_episode(clock, problem, [[x, pr.eot], [x] * 5 + [pr.eot], [pr.eot]], [x, x, pr.eoa])
    assert ep.arrivals == [2.0, 5.0, 6.0]
    policy_times = [t for t, pol in zip(ep.times, ep.policy) if pol]
    assert policy_times == [2.5, 3.0, 5.5, 6.0, 6.5, 7.0, 7.5, 8.0, 8.5, 9.0, 9.5, 10.0]
    assert (ep.stream_tokens, ep.deep_tokens) == (9, 3)
    assert ep.spill_tokens == 5                      # 4 of thought 1 + the skip of chunk 2
    assert ep.residual_tokens == 8 and ep.residual_s == pytest.approx(4.0)
    # read-then-think on the same clock: every token after a_last = 6
    rtt = _hand_episode(clock, problem, [], [x] * 4 + [pr.eoa], layout="read_then_think")
    assert [t for t, pol in zip(rtt.times, rtt.policy) if pol] == [6.5, 7.0, 7.5, 8.0, 8.5]
    assert rtt.residual_tokens == 5 and rtt.residual_s == pytest.approx(2.5)


def test_rewards_hand_computed(tiny):
    _, tok, _, _ = tiny
    clock = Protocol(tok, wpm=60, decode_tps=2)
    pr = clock
    problem = Problem("t", "How many?", ["a b", "c d e", "f"], "3")
    x = tok.encode(" x")[0]
    deep = [x, pr.eor] + tok.encode(r"\boxed{3}") + [pr.eoa]
    ep = _hand_episode(clock, problem, [[x, pr.eot], [x] * 5 + [pr.eot], [pr.eot]], deep)
    cfg = RewardConfig(alpha=0.3, beta=0.05, budget=100)
    n_deep = len(deep)
    r = score(ep, cfg)
    resid = 5 + n_deep                                # spill 5 (see the clock test) + deep
    assert r == Rewards(fmt=0.0, acc=1.0, ada=pytest.approx(-0.3 * resid / 100 - 0.05 * 9 / 100),
                        total=pytest.approx(1 - 0.3 * resid / 100 - 0.05 * 9 / 100),
                        stream=pytest.approx(-0.05 * 9 / 100 - 0.3 * 5 / 100),
                        deep=pytest.approx(1 - 0.3 * n_deep / 100))
    wrong = _hand_episode(clock, problem, [[x, pr.eot], [pr.eot], [pr.eot]],
                          [x, pr.eor] + tok.encode(r"\boxed{4}") + [pr.eoa])
    rw = score(wrong, cfg)
    assert (rw.fmt, rw.acc) == (0.0, 0.0) and rw.deep < 0 < r.deep
    s = summarize([ep, wrong], [r, rw])
    assert s["accuracy"] == 0.5 and s["format_rate"] == 1.0 and s["n"] == 2
    assert math.isnan(s["skip_rate_irrelevant"])     # relevance unknown


# =============================================================================================
# rollout.py — the chunk-by-chunk loop
# =============================================================================================

def test_batched_rollout_equals_single_rows(tiny):
    model, _, protocol, problems = tiny
    batch = rollout(model, protocol, problems[:3], group_size=2, budget=40, temperature=0.0)
    for b, p in enumerate(problems[:3]):
        [alone] = rollout(model, protocol, [p], group_size=1, budget=40, temperature=0.0)
        for g in range(2):
            ep = batch[b * 2 + g]
            assert ep.problem is p
            assert ep.tokens == alone.tokens and ep.policy == alone.policy
            assert ep.phase == alone.phase and ep.chunk == alone.chunk
            assert ep.logprobs == pytest.approx(alone.logprobs, abs=1e-5)


def test_rollout_logprobs_equal_training_forward(tiny):
    """The first PPO ratio must be exactly 1: the log-probs recorded while sampling equal those of
    a teacher-forced forward over the finished sequences (same temperature)."""
    model, _, protocol, problems = tiny
    gen = torch.Generator().manual_seed(0)
    for layout in ("stream", "read_then_think"):
        episodes = rollout(model, protocol, problems[:4], group_size=3, layout=layout, budget=48,
                           temperature=0.7, generator=gen)
        batch = collate(episodes, "cpu")
        with torch.no_grad():
            logp, _ = policy_logprobs(model, batch, temperature=0.7, chunk=50)
        old = batch.old_logp[:, 1:][batch.policy[:, 1:]]
        assert logp.shape == old.shape and logp.numel() > 100
        assert (logp - old).abs().max() <= 1e-5


class _Steered(torch.nn.Module):
    """The tiny model with a large logit bonus on one token after given fed tokens (or after
    every token) — a way to make a random model skip, or never stop, without training it. The
    "hit" flag travels as an extra hidden feature so that ``return_hidden`` + ``logits`` work."""

    def __init__(self, model, after: set[int], bonus_token: int, everywhere: bool = False):
        super().__init__()
        self.model, self.after, self.bonus, self.everywhere = model, after, bonus_token, everywhere

    def new_cache(self, *a):
        return self.model.new_cache(*a)

    def forward(self, ids, cache=None, return_hidden=False):
        h = self.model(ids, cache=cache, return_hidden=True)
        hit = torch.ones_like(ids, dtype=torch.bool) if self.everywhere else \
            torch.isin(ids, torch.tensor(sorted(self.after)))
        h = torch.cat([h, hit[..., None].float()], -1)
        return h if return_hidden else self.logits(h)

    def logits(self, h):
        logits = self.model.logits(h[..., :-1]).clone()
        logits[..., self.bonus] += 100.0 * h[..., -1]
        return logits


def test_rollout_records_skips_observations_and_truncation(tiny):
    model, _, pr, problems = tiny
    p = problems[2]
    # Skip every chunk: a big <EOT> logit right after each chunk's <EOS>.
    [ep] = rollout(_Steered(model, {pr.eos}, pr.eot), pr, [p], budget=60, temperature=1.0,
                   generator=torch.Generator().manual_seed(0))
    assert ep.parsed.skips == [True] * len(p.chunks) and ep.stream_tokens == len(p.chunks)
    obs = [t for t, pol in zip(ep.tokens, ep.policy) if not pol]
    assert obs == sum((ids for ids, _ in pr.blocks(p, "stream")), [])   # env tokens never policy
    # A model that never closes its thought runs into the budget: truncated, invalid.
    [ep] = rollout(_Steered(model, set(), tok_x := pr.tok.encode(" x")[0], everywhere=True), pr,
                   [p], budget=10, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert ep.truncated and sum(ep.policy) == 10 and not ep.parsed.valid
    assert "truncated at the token budget" in ep.parsed.stream_errors
    assert all(t == tok_x for t, pol in zip(ep.tokens, ep.policy) if pol)


def test_read_then_think_rollout_thinks_after_the_last_chunk(tiny):
    model, _, pr, problems = tiny
    for ep in rollout(model, pr, problems[:2], group_size=2, layout="read_then_think", budget=30,
                      temperature=1.0, generator=torch.Generator().manual_seed(1)):
        eoi = ep.tokens.index(pr.eoi)
        assert not any(ep.policy[:eoi + 1]) and all(ep.policy[eoi + 1:])
        assert {(ph, ch) for ph, ch, pol in zip(ep.phase, ep.chunk, ep.policy) if pol} == \
            {(DEEP, len(ep.problem.chunks))}


def test_cli_runs_end_to_end(tiny, tmp_path, capsys):
    import adasr
    from model import save_checkpoint
    model, tok, _, problems = tiny
    save_checkpoint(model, tok, tmp_path / "ckpt")
    data = tmp_path / "st.json"
    data.write_text(json.dumps([{
        "Instruct_Context": {"context": "Tom has 3 apples.<EOS> Tom buys 2 apples.<EOS>",
                             "instruct": "How many apples does Tom have at the end?"},
        "streaming_reasoning": "q<EOQ> Tom starts with 3.<EOT> 3 + 2 = 5.<EOT>",
        "deep_reasoning": "The answer is 5.<EOR> \\boxed{5}<EOA>", "answer": "\\boxed{5}"}]))
    adasr.main(["--model", str(tmp_path / "ckpt"), "--data", str(data), "--json", "--budget", "24"])
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["chunks"] == ["Tom has 3 apples.", "Tom buys 2 apples."]
    assert rec["reference"] == "5" and rec["correct"] in (True, False)
    assert {"thoughts", "skips", "deep", "answer", "stream_tokens", "deep_tokens",
            "residual_tokens", "residual_s"} <= rec.keys()
    adasr.main(["--model", str(tmp_path / "ckpt"), "--problem",
                "Tom has 3 apples. It rains. How many apples does Tom have?", "--budget", "24"])
    shown = capsys.readouterr().out
    assert "Question: How many apples does Tom have?" in shown and "Tom has 3 apples." in shown
    assert "residual latency" in shown


# =============================================================================================
# hrpo.py — advantages, the clipped loss, RL and SFT steps
# =============================================================================================

def _rewards(totals, streams, deeps):
    return [Rewards(fmt=0, acc=0, ada=0, total=t, stream=s, deep=d)
            for t, s, d in zip(totals, streams, deeps)]


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_advantages_by_hand(lam):
    # one group of 4: R = [1, 0, 0, 1] → mean 0.5, std 0.5 → ±1
    #                 R^s = [0, 0, 0, 2] → mean 0.5, std √0.75
    #                 R^d = [3, 1, 1, 3] → ±1
    rewards = _rewards([1, 0, 0, 1], [0, 0, 0, 2], [3, 1, 1, 3])
    a_s, a_d = advantages(rewards, 4, lam, eps=0.0)
    g = torch.tensor([1.0, -1, -1, 1])
    s = (torch.tensor([0.0, 0, 0, 2]) - 0.5) / math.sqrt(0.75)
    d = torch.tensor([1.0, -1, -1, 1])
    assert torch.allclose(a_s, lam * s + (1 - lam) * g, atol=1e-6)
    assert torch.allclose(a_d, lam * d + (1 - lam) * g, atol=1e-6)


def test_advantages_zero_for_equal_groups_and_grpo_at_lambda_zero():
    rewards = _rewards([0.3] * 3 + [1, 2, 3], [0.1, 0.5, 0.9] + [0] * 3, [0.2] * 6)
    a_s, a_d = advantages(rewards, 3, 0.0)
    assert torch.equal(a_s[:3], torch.zeros(3)) and torch.equal(a_d[:3], torch.zeros(3))
    assert torch.equal(a_s, a_d)                     # λ=0: one sequence-level advantage (GRPO)
    grpo = (torch.tensor([1.0, 2, 3]) - 2) / (torch.tensor([1.0, 2, 3]).std(unbiased=False) + 1e-4)
    assert torch.allclose(a_s[3:], grpo)
    a_s, a_d = advantages(rewards, 3, 1.0)           # λ=1: the first group's stream rewards differ
    assert a_s[:3].abs().sum() > 0 and torch.equal(a_d[:3], torch.zeros(3))


def test_clipped_loss_by_hand():
    old = torch.zeros(6)
    ratio = torch.tensor([1.0, 1.1, 1.5, 0.5, 0.5, 1.5])
    adv = torch.tensor([2.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    logp = ratio.log().requires_grad_()
    loss, stats = clipped_loss(logp, old, adv, n_tokens=10, eps_low=0.2, eps_high=0.28)
    # per token: -min(ρA, clip(ρ)A)
    #   1.0·2 → -2 ; 1.1·-1 → 1.1 ; 1.5 clipped to 1.28 with A=1 → -1.28 (clipped)
    #   0.5·-1: min(-0.5, -0.8) → 0.8 (clipped) ; 0.5·1: min(0.5, 0.8) → -0.5 ; 1.5·-1 → 1.5
    expected = (-2 + 1.1 - 1.28 + 0.8 - 0.5 + 1.5) / 10
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-6)
    assert stats["clip_high"] == 1 and stats["clip_low"] == 1
    loss.backward()
    # clipped tokens (index 2 and 3) get no gradient; the others d/dlogp = -ρA/N
    assert torch.allclose(logp.grad, torch.tensor([-0.2, 0.11, 0.0, 0.0, -0.05, 0.15]), atol=1e-6)
    kl_loss, _ = clipped_loss(logp.detach(), old, adv, 10, 0.2, 0.28, ref_logp=old, kl_beta=0.1)
    d = -ratio.log()
    assert float(kl_loss) == pytest.approx(expected + 0.1 * float((d.exp() - d - 1).sum()) / 10,
                                           abs=1e-6)


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_micro_batches_give_the_full_batch_gradient(tiny):
    import copy
    model, _, pr, problems = tiny
    episodes = rollout(model, pr, problems[:3], group_size=4, budget=32, temperature=1.0,
                       generator=torch.Generator().manual_seed(3))
    rewards = [Rewards(0, 0, 0, total=float(i % 3), stream=float(i % 2), deep=float(i % 4))
               for i in range(len(episodes))]
    grads = []
    for micro in (12, 5):
        m = copy.deepcopy(model)
        rl_step(m, torch.optim.SGD(m.parameters(), lr=0.0), episodes, rewards, 4, HRPOConfig(),
                micro_batch=micro, max_grad_norm=float("inf"))
        grads.append(_grads(m))
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].abs().sum() > 0


def test_rl_step_raises_the_best_rollout_and_sft_lowers_its_loss(tiny):
    import copy
    model, _, pr, problems = tiny
    model = copy.deepcopy(model)
    episodes = rollout(model, pr, problems[:2], group_size=4, budget=32, temperature=1.0,
                       generator=torch.Generator().manual_seed(4))
    rewards = [Rewards(0, 0, 0, total=float(i == 1), stream=0.0, deep=0.0) for i in range(8)]
    before = [p.detach().clone() for p in model.parameters()]
    best = collate([episodes[1]], "cpu")
    with torch.no_grad():
        lp0 = policy_logprobs(model, best, 1.0)[0].sum()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    m = rl_step(model, opt, episodes, rewards, 4, HRPOConfig(lam=0.0))
    assert m["updated"] == 1.0 and m["zero_signal"] == 0.5     # the second group is all zero
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with torch.no_grad():
        assert policy_logprobs(model, best, 1.0)[0].sum() > lp0
    # SFT: a few steps on a fixed gold batch lower its loss
    gold = [pr.gold(p, "stream") for p in problems[:8]]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = [sft_step(model, opt, gold, micro_batch=3)["loss"] for _ in range(6)]
    assert losses[-1] < losses[0] * 0.9


# =============================================================================================
# train.py — run directory, resuming, the end-to-end job
# =============================================================================================

TINY_RUN = ["--n-train", "64", "--n-eval", "6", "--sft-batch", "4", "--rl-batch", "2",
            "--group", "2", "--budget", "24", "--tiny-dim", "32", "--tiny-layers", "1",
            "--vocab", "300", "--log-every", "1", "--micro-batch", "4"]


def test_killed_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    import train
    from model import load_pretrained
    args = TINY_RUN + ["--stage", "sft", "--sft-steps", "6", "--save-every", "2"]
    original_log = train.Run.log

    def log_then_stop(self, record):                 # Ctrl-C arrives during step 3
        original_log(self, record)
        if record["step"] == 3:
            self.stop = True
    monkeypatch.setattr(train.Run, "log", log_then_stop)
    with pytest.raises(SystemExit) as stopped:
        train.main(args + ["--out", str(tmp_path / "a")])
    assert stopped.value.code == 130
    state = torch.load(tmp_path / "a" / "checkpoint" / "trainer.pt", weights_only=False)
    assert state["step"] == 3 and state["job"] == "sft"
    monkeypatch.setattr(train.Run, "log", original_log)
    train.main(args + ["--out", str(tmp_path / "a"), "--resume"])
    steps = [json.loads(line)["step"] for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]
    train.main(args + ["--out", str(tmp_path / "b")])            # the same run, never killed
    resumed, _ = load_pretrained(tmp_path / "a" / "sft")
    straight, _ = load_pretrained(tmp_path / "b" / "sft")
    for (name, p), q in zip(resumed.named_parameters(), straight.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_end_to_end_compare_run_writes_every_file(tmp_path):
    import train
    out = tmp_path / "run"
    train.main(TINY_RUN + ["--compare", "--sft-steps", "3", "--rl-steps", "2", "--save-every", "1",
                           "--out", str(out)])
    for name in ["config.json", "metrics.jsonl", "eval.json", "curves.png", "traces.md",
                 "checkpoint/model.safetensors", "checkpoint/config.json",
                 "checkpoint/tokenizer.json", "checkpoint/trainer.pt",
                 "sft/model.safetensors", "hrpo/model.safetensors", "grpo/model.safetensors",
                 "read_then_think/model.safetensors"]:
        assert (out / name).exists(), name
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["methods"]) == {"read_then_think", "sft", "grpo", "hrpo"}
    for row in ev["methods"].values():
        assert row["n"] == 6 and 0 <= row["accuracy"] <= 1 and row["total_tokens"] > 0
    assert ev["methods"]["read_then_think"]["stream_tokens"] == 0
    assert json.loads((out / "config.json").read_text())["compare"] is True
    rl = [json.loads(line) for line in open(out / "metrics.jsonl")
          if json.loads(line)["stage"] == "rl"]
    assert {r["job"] for r in rl} == {"grpo", "hrpo"} and all("reward" in r for r in rl)
