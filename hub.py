"""Hugging Face checkpoint directories as files: a hub id fetched or a local directory, its JSON files, its
safetensors shards (one file or an index), the generation config, and writing the same layout back.

Reproduces what transformers' `from_pretrained` / `save_pretrained` read and write for Qwen2.5-VL (the hub's file
names, `model.safetensors.index.json`'s weight map, the tensor names both transformers layouts use) and refuses what
they would trip over later: a shard path outside the directory, a truncated file, JSON that is not an object. The
network and its explicit name -> shape table stay in model.py; every problem here is a CheckpointError (or
FileNotFoundError) naming the file.
"""
from __future__ import annotations

import json
import os
import shutil

from huggingface_hub import snapshot_download
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import checks

class CheckpointError(ValueError):
    """A checkpoint directory that does not hold a loadable Qwen2.5-VL (message names the file and tensor)."""


def disk_name(name: str) -> str:
    """transformers >= 4.52 in-memory names (save_original_format=False) -> hub names; hub names pass through."""
    if name.startswith("model.visual."):
        return name[len("model."):]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    return name


PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.json", "chat_template.jinja",
                    "preprocessor_config.json", "generation_config.json", "special_tokens_map.json", "vocab.json",
                    "merges.txt", "processor_config.json")


def resolve_checkpoint(path_or_id: str) -> str:
    """A local directory as is; otherwise a hub id fetched (config, safetensors, tokenizer files) via huggingface_hub."""
    path_or_id = os.fspath(checks.kind(path_or_id, "path_or_id", (str, os.PathLike), "a checkpoint directory or hub id"))
    if os.path.isdir(path_or_id):
        return path_or_id
    if os.path.exists(path_or_id) or path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1:
        raise FileNotFoundError(f"{path_or_id!r} is not a directory. Pass a checkpoint directory containing config.json "
                                f"and model.safetensors (or model.safetensors.index.json), or a hub id like "
                                f"'Qwen/Qwen2.5-VL-7B-Instruct'.")
    try:
        return snapshot_download(path_or_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"])
    except Exception as e:  # offline, unknown repo, gated repo, ...
        raise OSError(f"could not fetch {path_or_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
                      f"If this machine is offline, download it elsewhere with "
                      f"`huggingface-cli download {path_or_id} --local-dir DIR`, copy DIR here and pass "
                      f"`from_pretrained('DIR')`.") from e


def path_inside(root: str, rel: str):
    """`rel` joined to `root` and normalised, or None when that leaves `root`. Lexical on purpose (no symlinks
    resolved): hub snapshots and benchmark folders link their files into a store elsewhere."""
    top = os.path.abspath(root)
    full = os.path.normpath(os.path.join(top, rel))
    return full if os.path.commonpath([full, top]) == top else None


def read_json(path: str, problem: str):
    """json.load of a checkpoint file; bad JSON -> CheckpointError naming the file, caused by the parser's error."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError; nesting too deep to parse
        raise CheckpointError(f"{path}: {problem} ({type(e).__name__}: {e})") from e


def sizes_vs_weights(directory: str, raw) -> str | None:
    """A message naming config.json's hidden_size / vocab_size when they disagree with the checkpoint's embedding
    tensor (model.embed_tokens.weight [vocab_size, hidden_size]); None when they agree or cannot be compared."""
    text = (raw.get("text_config") or raw) if isinstance(raw, dict) else {}
    try:
        files = checkpoint_files(directory)
        stored = next(k for k in files if disk_name(k) == "model.embed_tokens.weight")
        with safe_open(files[stored], framework="pt") as f:
            shape = dict(zip(("vocab_size", "hidden_size"), f.get_slice(stored).get_shape()))
    except (StopIteration, OSError, ValueError, SafetensorError):   # no readable embedding: nothing to compare
        return None
    if not isinstance(text, dict):
        return None
    wrong = [f"{k} {text[k]!r}" for k in shape if k in text and text[k] != shape[k]]
    if not wrong:
        return None
    return (f"{os.path.join(directory, 'config.json')}: {' and '.join(wrong)} "
            f"{'disagree' if len(wrong) > 1 else 'disagrees'} with the weights "
            f"(model.embed_tokens.weight is {list(shape.values())} = [vocab_size, hidden_size]); config.json and "
            f"model.safetensors must come from the same model")


def read_generation_config(directory: str, cfg):
    """(eos_token_id, pad_token_id) for decode.generate(): generation_config.json's when the checkpoint has one (the
    hub's stop list [<|im_end|>, <|endoftext|>] is what transformers' generate uses), else config.json's."""
    path = os.path.join(directory, "generation_config.json")
    gen = read_json(path, "not a valid generation config") if os.path.exists(path) else {}
    if not isinstance(gen, dict):
        raise CheckpointError(f"{path}: not a valid generation config (expected an object, got {type(gen).__name__})")
    return gen.get("eos_token_id", cfg.eos_token_id), gen.get("pad_token_id", cfg.pad_token_id)


def checkpoint_files(directory: str) -> dict[str, str]:
    """tensor name (as stored) -> file path, from model.safetensors or model.safetensors.index.json."""
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(index):
        wm = read_json(index, "not valid JSON; download the checkpoint again")
        wm = wm.get("weight_map") if isinstance(wm, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise CheckpointError(f"{index}: expected {{\"weight_map\": {{tensor name: shard file name}}}}")
        out = {}
        for k, fn in wm.items():
            out[k] = path_inside(directory, fn)
            if out[k] is None:
                raise CheckpointError(f"{index} names shard {fn!r} for {k}, which is outside the checkpoint directory "
                                      f"{os.path.abspath(directory)}; shards must sit in the checkpoint directory")
        for fn in set(out.values()):
            if not os.path.exists(fn):
                raise FileNotFoundError(f"{index} names shard {os.path.basename(fn)} but {fn} does not exist")
        return out
    if not os.path.exists(single):
        raise FileNotFoundError(f"{directory}: neither model.safetensors nor model.safetensors.index.json found")
    try:
        with safe_open(single, framework="pt") as f:
            return {k: single for k in f.keys()}
    except (SafetensorError, OSError) as e:  # an unreadable file; anything else (out of memory, ...) passes through
        raise CheckpointError(f"{single}: cannot read the safetensors header ({type(e).__name__}: {e}); if the file "
                              f"is truncated or corrupt, download it again") from e


def write_checkpoint(directory: str, config: dict, tensors: dict, max_shard_bytes: int, copy_from=None):
    """Write config.json and the tensors as model.safetensors (in order; sharded with an index above max_shard_bytes),
    then the tokenizer/processor files (PROCESSOR_FILES) of the directory `copy_from`, when it is another one."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    shards, size = [{}], 0  # a new shard when the next tensor would overflow this one
    for k, t in tensors.items():
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards, size = shards + [{}], 0
        shards[-1][k] = t
        size += t.nbytes
    for old in ("model.safetensors", "model.safetensors.index.json"):
        if os.path.exists(os.path.join(directory, old)):
            os.remove(os.path.join(directory, old))
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fn, shard in zip(names, shards):
        save_file(shard, os.path.join(directory, fn), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                 "weight_map": {k: fn for fn, shard in zip(names, shards) for k in shard}}
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    if copy_from and os.path.abspath(copy_from) != os.path.abspath(directory):
        for fn in PROCESSOR_FILES:
            src = os.path.join(copy_from, fn)
            if os.path.exists(src):
                shutil.copyfile(src, os.path.join(directory, fn))
