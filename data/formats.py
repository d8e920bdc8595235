"""Read, write and validate the released Chain-of-Focus dataset formats.

SFT (xintongzhang/CoF-SFT-Data-5.4k, LLaMA-Factory "sharegpt" with role/content tags, `configs/dataset_info.json`):
a JSON list of rows `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...], "images": [path, ...]}`
where every image is an `<image>` placeholder in the text, in order (main image first, then one crop per zoom).
Image entries may be strings or `{"image": path}`; a leading "./" or "file://" is dropped (as the public download
scripts do). Relative paths are relative to the dataset root (default: the JSON file's folder).

RL (xintongzhang/CoF-RL-Data, rows of verl/recipe/zoomin/data_progress/prepare_zoomin_data.py): `{"data_source",
"agent_name": "tool_agent", "prompt": [system, user "<image> Question: ..."], "images": [{"image": "file://..."}],
"ability": "vision", "reward_model": {"style": "rule", "ground_truth"}, "extra_info": {...}}`. The release is parquet;
we write the same rows as JSON lines (parquet needs pyarrow, not a dependency) and read .jsonl, .json and, when
pandas + pyarrow are installed, .parquet.

Every problem raises DataError naming the file, the row and the field, and saying what to do; with skip_bad=True
the readers skip such rows and return how many they skipped. Image paths may not leave the dataset root.
"""
from __future__ import annotations

import json
import os

import checks
from tokenizer import VISION_TOKENS_TEXT   # special tokens only the processor writes: a row holding them is refused

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
IMAGE = "<image>"


class DataError(ValueError):
    """A bad record: `path`, `row` (0-based, None for the whole file) and `field` say where."""

    def __init__(self, path, row, field, problem):
        self.path, self.row, self.field, self.problem = path, row, field, problem
        where = f"{path}" + (f", row {row}" if row is not None else "") + (f", field '{field}'" if field else "")
        super().__init__(f"{where}: {problem}")


# ----------------------------------------------------------------------------------------------------------------
# Paths


def resolve_image(entry, root, path, row, field):
    """Absolute path of one image entry (str or {"image": str}); must be inside `root` and exist."""
    if isinstance(entry, dict):
        entry = entry.get("image")
    if not isinstance(entry, str) or not entry:
        raise DataError(path, row, field, f"expected an image path string or {{\"image\": path}}, got {entry!r}")
    if "\0" in entry:
        raise DataError(path, row, field, f"image path {entry!r} holds a NUL byte")
    p = entry[len("file://"):] if entry.startswith("file://") else entry
    while p.startswith("./"):
        p = p[2:]
    full = os.path.realpath(p if os.path.isabs(p) else os.path.join(root, p))
    root_real = os.path.realpath(root)
    if os.path.commonpath([full, root_real]) != root_real:
        raise DataError(path, row, field, f"image path {entry!r} leaves the dataset root {root_real}; keep images "
                                          f"under the root (or pass root= the folder that holds them)")
    if not os.path.isfile(full):
        raise DataError(path, row, field, f"image {entry!r} not found (looked for {full})")
    return full


def relative_image(full, root):
    """The path written into a dataset file for an image under `root`."""
    rel = os.path.relpath(os.path.realpath(full), os.path.realpath(root))
    if rel.startswith(".."):
        raise ValueError(f"image {full} is not under the dataset root {root}")
    return rel.replace(os.sep, "/")


def _load_rows(path):
    """Rows of a .json list or a .jsonl file (DataError on malformed JSON, with the line)."""
    if not os.path.isfile(path):
        raise DataError(path, None, None, "file not found")
    if path.endswith(".parquet"):
        try:
            import pandas as pd   # optional: only to read the released parquet files
        except ImportError as e:
            raise DataError(path, None, None, "reading parquet needs pandas + pyarrow (pip install pandas pyarrow), "
                                              "or convert the file to JSON lines") from e
        return [_plain(r) for r in pd.read_parquet(path).to_dict(orient="records")]
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(path, None, None, f"not UTF-8 text ({e}); save the file as UTF-8 (JSON files are UTF-8)") from None
    if path.endswith(".jsonl"):
        rows = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except (ValueError, RecursionError) as e:
                    raise DataError(path, len(rows), None, f"line {i + 1} is not valid JSON ({e})") from None
        return rows
    try:
        rows = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise DataError(path, None, None, f"not valid JSON ({e}); expected a JSON list of rows") from None
    if not isinstance(rows, list):
        raise DataError(path, None, None, f"expected a JSON list of rows, got {type(rows).__name__}")
    return rows


def _plain(x):
    """numpy arrays / scalars from parquet -> lists / Python values."""
    if hasattr(x, "tolist"):
        x = x.tolist()
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _read(path, check, skip_bad):
    rows, bad = [], 0
    for i, row in enumerate(_load_rows(path)):
        try:
            rows.append(check(row, i))
        except DataError:
            if not skip_bad:
                raise
            bad += 1
    return rows, bad


# ----------------------------------------------------------------------------------------------------------------
# SFT


def check_sft_row(row, path, i, root):
    """Validate one released-format SFT row; returns {"messages": [...], "images": [abs paths]} (+ other keys)."""
    if not isinstance(row, dict):
        raise DataError(path, i, None, f"a row must be a JSON object, got {type(row).__name__}")
    key = "messages" if "messages" in row else ("conversations" if "conversations" in row else None)
    if key is None:
        raise DataError(path, i, "messages", "missing; each row needs a 'messages' list of {role, content}")
    msgs = row[key]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(path, i, key, "must be a non-empty list of {role, content} objects")
    out = []
    for j, m in enumerate(msgs):
        f = f"{key}[{j}]"
        if not isinstance(m, dict):
            raise DataError(path, i, f, f"must be an object with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        role = SHAREGPT_ROLES.get(role, role) if "from" in m and "role" not in m else role
        if role not in ROLES:
            raise DataError(path, i, f + ".role", f"unknown role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(path, i, f + ".content", f"must be a string (with <image> placeholders), "
                                                     f"got {type(content).__name__}")
        if role == "system" and j != 0:
            raise DataError(path, i, f + ".role", "a system message may only come first")
        _check_text(content, path, i, f + ".content")
        out.append({"role": role, "content": content})
    turns = [m["role"] for m in out if m["role"] != "system"]
    if not turns or turns[0] != "user" or turns[-1] != "assistant":
        raise DataError(path, i, key, f"turns must start with 'user' and end with 'assistant', got {turns}")
    for a, b in zip(turns, turns[1:]):
        if a == b:
            raise DataError(path, i, key, f"two '{a}' turns in a row; user and assistant must alternate")
    images = row.get("images", [])
    if not isinstance(images, list):
        raise DataError(path, i, "images", f"must be a list of image paths, got {type(images).__name__}")
    n_ph = sum(m["content"].count(IMAGE) for m in out)
    if n_ph != len(images):
        raise DataError(path, i, "images", f"{n_ph} <image> placeholder(s) in the messages but {len(images)} "
                                           f"image(s) listed; they must match one to one, in order")
    full = [resolve_image(e, root, path, i, f"images[{k}]") for k, e in enumerate(images)]
    rest = {k: v for k, v in row.items() if k not in (key, "images")}
    return {**rest, "messages": out, "images": full}


def _check_text(text, path, i, field):
    for t in VISION_TOKENS_TEXT:
        if t in text:
            raise DataError(path, i, field, f"holds the special token text {t!r}, which only the image processor "
                                            f"may write; use <image> placeholders for images")


def read_sft(path, skip_bad=False, root=None):
    """Read a released-format SFT file (.json list or .jsonl) -> (rows, n_bad). Each row: {"messages": [{"role",
    "content"}], "images": [absolute paths]}, `<image>` placeholders kept in the text. root: the folder image paths
    are relative to (default: the file's folder). skip_bad: skip and count bad rows instead of raising DataError."""
    checks.kind(path, "path", (str, os.PathLike), "a file path")
    root = root if root is not None else os.path.dirname(os.path.abspath(path))
    return _read(path, lambda r, i: check_sft_row(r, path, i, root), skip_bad)


def write_sft(path, rows, root=None):
    """Write rows {"messages", "images": [paths]} as the released JSON list, image paths relative to `root`
    (default: the file's folder). Every row is validated first (DataError names the row)."""
    root = root if root is not None else os.path.dirname(os.path.abspath(path))
    out = []
    for i, r in enumerate(rows):
        rel = {**r, "images": [relative_image(p if os.path.isabs(p) else os.path.join(root, p), root)
                               for p in r.get("images", [])]}
        check_sft_row(rel, path, i, root)
        out.append({"messages": rel["messages"], "images": rel["images"],
                    **{k: v for k, v in r.items() if k not in ("messages", "images")}})
    write_atomic(path, json.dumps(out, ensure_ascii=False, indent=1))


def to_chat(messages):
    """Released ShareGPT messages -> tokenizer.tokenize_chat messages: `<image>` placeholders split into
    {"type": "image"} items, text kept byte for byte around them."""
    chat = []
    for m in checks.sequence(messages, "messages", empty=True):
        if IMAGE not in m["content"]:
            chat.append({"role": m["role"], "content": m["content"]})
            continue
        parts = m["content"].split(IMAGE)
        content = []
        for k, text in enumerate(parts):
            if k:
                content.append({"type": "image"})
            if text:
                content.append({"type": "text", "text": text})
        chat.append({"role": m["role"], "content": content})
    return chat


# ----------------------------------------------------------------------------------------------------------------
# RL


def rl_record(system, prompt, image, ground_truth, question, index, split="train", data_source="rl_multiresolution",
              extra=None):
    """One row exactly like prepare_zoomin_data.py's (image: the path as written, e.g. relative to the root); `extra`
    adds keys to extra_info (ours: the question's kind, which grpo.py breaks its metrics down by)."""
    return {
        "data_source": data_source, "agent_name": "tool_agent",
        "prompt": [{"role": "system", "content": system}, {"role": "user", "content": prompt}],
        "images": [{"image": f"file://{image}"}], "ability": "vision",
        "reward_model": {"style": "rule", "ground_truth": ground_truth},
        "extra_info": {"split": split, "index": index, "answer": ground_truth, "question": question,
                       "need_tools_kwargs": True,
                       "tools_kwargs": {"image_zoom_in_tool": {
                           "create_kwargs": {"question": question, "image_path": image, "ground_truth": ground_truth},
                           "execute_kwargs": {"image_path": image}}}, **(extra or {})},
    }


def check_rl_row(row, path, i, root):
    """Validate one released-format RL row -> {"prompt": messages, "images": [abs], "ground_truth", "question",
    "data_source", "row": the row as read}."""
    if not isinstance(row, dict):
        raise DataError(path, i, None, f"a row must be a JSON object, got {type(row).__name__}")
    prompt = row.get("prompt")
    if not isinstance(prompt, list) or not prompt:
        raise DataError(path, i, "prompt", "missing or empty; expected [{role: system, ...}, {role: user, ...}]")
    for j, m in enumerate(prompt):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise DataError(path, i, f"prompt[{j}].role", f"unknown role {m.get('role') if isinstance(m, dict) else m!r}"
                                                          f"; use one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise DataError(path, i, f"prompt[{j}].content", "must be a string")
        _check_text(m["content"], path, i, f"prompt[{j}].content")
    if prompt[-1]["role"] != "user":
        raise DataError(path, i, "prompt", "the last prompt message must be the user turn")
    rm = row.get("reward_model")
    if not isinstance(rm, dict) or "ground_truth" not in rm:
        raise DataError(path, i, "reward_model.ground_truth", "missing; the reward needs the ground truth answer")
    if not isinstance(rm["ground_truth"], str) or not rm["ground_truth"].strip():
        raise DataError(path, i, "reward_model.ground_truth", f"must be the answer as a non-empty string (a letter "
                                                              f"such as \"A\" or a word), got {rm['ground_truth']!r:.80}")
    images = row.get("images")
    if not isinstance(images, list) or not images:
        raise DataError(path, i, "images", "must be a non-empty list of {\"image\": \"file://...\"}")
    n_ph = sum(m["content"].count(IMAGE) for m in prompt)
    if n_ph != len(images):
        raise DataError(path, i, "images", f"{n_ph} <image> placeholder(s) in the prompt but {len(images)} image(s)")
    full = [resolve_image(e, root, path, i, f"images[{k}]") for k, e in enumerate(images)]
    extra = row.get("extra_info") or {}
    if not isinstance(extra, dict):
        raise DataError(path, i, "extra_info", f"must be a JSON object, got {type(extra).__name__}")
    for key in ("question", "kind"):
        if extra.get(key) is not None and not isinstance(extra[key], str):
            raise DataError(path, i, f"extra_info.{key}", f"must be a string (or absent), got {extra[key]!r:.80}")
    return {"prompt": prompt, "images": full, "ground_truth": rm["ground_truth"],
            "question": extra.get("question"), "kind": extra.get("kind"), "data_source": row.get("data_source"),
            "row": row}


def read_rl(path, skip_bad=False, root=None):
    """Read RL prompt records (.jsonl, .json list, or .parquet with pandas) -> (rows, n_bad); see check_rl_row."""
    checks.kind(path, "path", (str, os.PathLike), "a file path")
    root = root if root is not None else os.path.dirname(os.path.abspath(path))
    return _read(path, lambda r, i: check_rl_row(r, path, i, root), skip_bad)


def write_rl(path, rows, root=None):
    """Write RL records (rl_record dicts) as JSON lines, after validating each."""
    root = root if root is not None else os.path.dirname(os.path.abspath(path))
    for i, r in enumerate(rows):
        check_rl_row(r, path, i, root)
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_jsonl(path, rows):
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_atomic(path, text):
    """Write `text` to `path` so that a crash leaves the old file or the new one, never half of one: write a
    temporary file beside it, fsync it, rename it over `path`, fsync the folder. The one atomic writer (datasets,
    checkpoints' `latest`, metrics, recipes)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
