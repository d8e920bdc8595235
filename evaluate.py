"""Evaluation: the benchmarks (V*, HR-Bench, our synthetic splits), the released judge, results files with resume,
summary tables, and the command line that runs a checkpoint through the zoom loop (cof.run).

Reproduces the released evaluation protocol around the loop (xtong-zhang/Chain-of-Focus `eval/vstar/
vllm_inference.py` for the V* items, `eval/vstar/judge_result.py` for scoring):

* V* Bench (craigwu/vstar_bench): `test_questions.jsonl`, images beside it; the question text already ends with the
  answer hint; HR-Bench (DreamMr/HR-Bench) TSV with base64 images, asked in V*'s layout (or VLMEvalKit's) and scored
  per option rotation as VLMEvalKit's report_acc_hrbench does;
* the answer is the loop's `judge_answer` (first `<answer>` of the final turn), matched by the judge's letter rules,
  then by VLMEvalKit's rule-based option inference standing in for the LLM judge (`match_answer`);
* the paper's resolution sweep: each image LANCZOS-resized to a long side of 224 ... 3840 px before the loop.

What is ours: results files (one JSON line per question, the whole trajectory) that resume and record what produced
them (`claim_results`), and a summary per resolution, category and question kind.

Above cof.py (it runs `cof.run`), below the trainers, bench.py and sweep.py; data/ uses its records
(`matches_record`) and the sweep's resize. Callers import it as `E` (`import evaluate as E`): sft.py and sweep.py
have an `evaluate` of their own.

    python evaluate.py --model DIR --bench vstar --data vstar_bench/ --out vstar.jsonl --sweep
    python evaluate.py ask --model DIR --image img.jpg --question "What colour is the cup?" --trace t.png
"""
from __future__ import annotations

import base64
import csv
import json
import os
import re
import statistics
import sys
import time
from dataclasses import asdict, fields, replace

import torch

import checks
import cof
import crop_kernels as ck
import hub
import model as M
import report
import tokenizer as T

# ----------------------------------------------------------------------------------------------------------------
# Judging an answer (judge_result.py's rules, then VLMEvalKit's option inference)


_OPTION = re.compile(r"\(([A-Z])\)\s+([^\n]+)")


def parse_options(question):
    """{"A": "rubber", ...} from V*-style "(A) rubber" lines (judge_result.extract_options, any letter)."""
    return {k: v.strip() for k, v in _OPTION.findall(question)}


def _norm(s):
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", s.lower())).strip()


def match_answer(pred, label, options=None):
    """Rule-based correctness of an extracted answer against the letter `label` (no LLM judge).

    The released rules first (judge_result.py): a 1-character answer equal to the letter, a 2-character answer
    with "." containing it ("A."), a 3-character answer with parentheses ("(A)"), or "(A) <option text>" inside
    the answer. Then, standing in for the LLM judge, VLMEvalKit's rule-based option inference (what HR-Bench's own
    evaluation uses): infer_option, else infer_option_text; an answer naming several options counts as none."""
    pred = checks.string("" if pred is None else pred, "pred", empty=True).strip()
    label = checks.string(label, "label").strip()
    options = checks.kind(options, "options", dict, "a dict of letter -> option text", none=True) or {}
    if len(pred) == 1:
        return pred == label
    if len(pred) == 2 and "." in pred:
        return label in pred
    if len(pred) == 3 and "(" in pred and ")" in pred:
        return label in pred
    if label in options and f"({label}) {options[label]}" in pred:
        return True
    return (infer_option(pred, options or dict.fromkeys("ABCD")) or infer_option_text(pred, options)) == label


def infer_option(answer, options):
    """VLMEvalKit's can_infer_option (vlmeval/utils/matching_util.py, its default non-verbose path): the characters
    .()[],:;!*#{} become spaces; if exactly one option letter is among the words, that letter ("Option A",
    "The answer is A.", "\\boxed{A}", "**A**" -> A; "A or B", "A B C D" -> None)."""
    words = answer
    for c in ".()[],:;!*#{}":
        words = words.replace(c, " ")
    found = [k for k in options if k in words.split()]
    return found[0] if len(found) == 1 else None


def infer_option_text(answer, options):
    """VLMEvalKit's can_infer_text: the one option whose text occurs in the answer (case ignored), None when none or
    several do or the answer is longer than twice all option texts together."""
    low = answer.lower()
    if not options or len(low) > 2 * sum(len(str(v)) for v in options.values()):
        return None
    found = [k for k, v in options.items() if str(v).lower() in low]
    return found[0] if len(found) == 1 else None


def is_correct(item, answer):
    """Rule-based scoring: letter labels through match_answer, free-form labels by normalised equality."""
    label = checks.string(checks.kind(item, "item", dict, "a benchmark item").get("label"), "item['label']",
                          empty=True)
    if len(label) == 1 and label.isalpha() and label.isupper():
        return match_answer(answer, label, item.get("options"))
    return bool(_norm(answer)) and _norm(answer) == _norm(label)


# ----------------------------------------------------------------------------------------------------------------
# Benchmarks: readers (V*, HR-Bench, our synthetic split), the resolution sweep

SWEEP = (224, 448, 672, 1024, 1344, 1920, 2560, 3840)   # long-side sizes of the resolution sweep


class BenchError(ValueError):
    """A benchmark file that cannot be read; the message names the file, the row and the field."""


def _need(row, keys, where):
    if not isinstance(row, dict):
        raise BenchError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in keys if k not in row or row[k] is None]
    if missing:
        raise BenchError(f"{where}: missing field(s) {missing}; have {sorted(row)}")


def read_vstar(root, categories=None):
    """V* Bench (craigwu/vstar_bench): `root/test_questions.jsonl` (or `root` itself when it is a .jsonl file in that
    layout), one JSON object per line with `image` (path relative to the file's folder, e.g.
    direct_attributes/sa_4690.jpg), `text` (question + options + answer hint), `label` (letter), `category`,
    `question_id`. Returns items dict(id, image (path), question, label, category, options)."""

    checks.kind(root, "root", (str, os.PathLike), "a folder or file path")
    if os.path.isfile(root):
        path, root = root, os.path.dirname(os.path.abspath(root))
    else:
        path = os.path.join(root, "test_questions.jsonl")
    if not os.path.exists(path):
        raise BenchError(f"{path} not found: point --data at the V* folder holding test_questions.jsonl")
    items = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = f.read().splitlines()
        except UnicodeDecodeError as e:
            raise BenchError(f"{path}: not UTF-8 text ({e})") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path} line {n}"
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as e:
                raise BenchError(f"{where}: not JSON ({e})") from None
            _need(row, ("image", "text", "label"), where)
            if not isinstance(row["text"], str) or not isinstance(row["label"], (str, int)):
                raise BenchError(f"{where}: 'text' must be a string and 'label' a letter, got "
                                 f"{type(row['text']).__name__} and {type(row['label']).__name__}")
            image = _inside(root, row["image"], where)
            cat = str(row.get("category") or os.path.dirname(row["image"]) or "all")
            if categories and cat not in categories:
                continue
            items.append(dict(id=str(row.get("question_id", n - 1)), image=image, question=row["text"],
                              label=str(row["label"]).strip(), category=cat, options=parse_options(row["text"]),
                              kind=row.get("kind")))
    return items


def _inside(root, rel, where):
    """The path of a benchmark image named relative to `root`; it must be a string, lie inside `root` (no "../" or
    absolute paths out of it) and exist."""

    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise BenchError(f"{where}: image must be a non-empty path string, got {rel!r}")
    full = hub.path_inside(root, rel)
    if full is None:
        raise BenchError(f"{where}: image {rel!r} leaves the benchmark folder {os.path.abspath(root)}; keep images "
                         f"inside it")
    if not os.path.isfile(full):
        raise BenchError(f"{where}: image {rel!r} not found under {root}")
    return full


def hrbench_question(question, options, style="vstar"):
    """HR-Bench question text. "vstar" (default): V*'s layout, which CoF was evaluated and trained with
    ("(A) ..." lines + cof.LETTER_HINT). "vlmeval": VLMEvalKit's "Options:\\nA. ...\\nPlease select ..." layout."""
    if style == "vstar":
        return question + "".join(f"\n({k}) {v}" for k, v in options.items()) + cof.LETTER_HINT
    if style == "vlmeval":
        return (question + "\nOptions:\n" + "".join(f"{k}. {v}\n" for k, v in options.items())
                + "Please select the correct answer from the options above. \n")
    raise ValueError(f"unknown HR-Bench prompt style {style!r}: use 'vstar' or 'vlmeval'")


def read_hrbench(path, style="vstar"):
    """HR-Bench (DreamMr/HR-Bench) TSV: columns index, question, answer (letter), category (single/cross), A, B,
    C, D, cycle_category (0-3: the same question with its options rotated), image (base64 JPEG; VLMEvalKit may
    store the index of another row holding the same image instead). Images stay base64 until used."""

    checks.kind(path, "path", (str, os.PathLike), "a file path")
    csv.field_size_limit(sys.maxsize)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except FileNotFoundError:
        raise BenchError(f"{path} not found: pass the HR-Bench .tsv file") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise BenchError(f"{path}: not a UTF-8 TSV file ({e})") from None
    if not rows:
        raise BenchError(f"{path}: no rows")
    by_index = {r.get("index"): r.get("image") for r in rows}
    items = []
    for n, row in enumerate(rows, 2):
        where = f"{path} row {n} (index {row.get('index')})"
        _need(row, ("index", "question", "answer", "image", "A", "B"), where)
        img = row["image"]
        if len(img) <= 64 and img in by_index:             # VLMEvalKit: a reference to another row's image
            img = by_index[img]
        options = {k: row[k] for k in "ABCDEFGH" if row.get(k) not in (None, "", "nan")}
        label = row["answer"].strip()
        if label not in options:
            raise BenchError(f"{where}: answer {label!r} is not one of the options {sorted(options)}")
        cyc = row.get("cycle_category")
        if cyc not in (None, "") and not str(cyc).strip().lstrip("-").isdigit():
            raise BenchError(f"{where}: cycle_category must be an integer (0-3), got {cyc!r}")
        items.append(dict(id=str(row["index"]), image_b64=img, question=hrbench_question(row["question"], options, style),
                          label=label, category=row.get("category") or "all", options=options,
                          cycle=int(cyc) if cyc not in (None, "") else None))
    return items


def read_synthetic(path):
    """Our synthetic test split (python -m data.build writes OUT/test.jsonl in V*'s test_questions.jsonl layout,
    images relative to OUT): a folder (its test.jsonl, else test_questions.jsonl), a .jsonl file in that layout, or a
    JSON / JSONL file of released CoF-RL input records {question, groundtruth, image_name, category?} (images
    relative to the file's folder; the question gets the RL recipe's hint, the letter hint for multiple choice)."""

    checks.kind(path, "path", (str, os.PathLike), "a folder or file path")
    if os.path.isdir(path):
        test = os.path.join(path, "test.jsonl")
        return read_vstar(test if os.path.exists(test) else path)
    root = os.path.dirname(os.path.abspath(path))
    if not os.path.isfile(path):
        raise BenchError(f"{path} not found: pass a synthetic folder, its test.jsonl, or a JSON / JSONL file of records")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        rows = json.loads(text) if path.endswith(".json") else [json.loads(l) for l in text.splitlines() if l.strip()]
    except (ValueError, RecursionError) as e:     # not UTF-8, not JSON, nested too deeply
        raise BenchError(f"{path}: not UTF-8 JSON / JSONL ({e})") from None
    if not isinstance(rows, list):
        raise BenchError(f"{path}: expected a list of records, got {type(rows).__name__}")
    if rows and isinstance(rows[0], dict) and "text" in rows[0] and "label" in rows[0]:
        return read_vstar(path)
    items = []
    for n, row in enumerate(rows):
        where = f"{path} record {n}"
        _need(row, ("question", "groundtruth", "image_name"), where)
        q, gt = row["question"], row["groundtruth"]
        if not isinstance(q, str) or not isinstance(gt, str) or not gt.strip():
            raise BenchError(f"{where}: 'question' and 'groundtruth' must be strings (the answer non-empty), got "
                             f"{type(q).__name__} and {gt!r:.60}")
        gt = gt.strip()
        hint = cof.rl_prompt(q, gt)[len("<image> Question: ") + len(q):-len(cof.USER_PROMPT)]
        image = _inside(root, row["image_name"], where)
        items.append(dict(id=str(row.get("id", n)), image=image, question=q + hint, label=gt,
                          category=row.get("category") or row.get("data_source") or "all", options=parse_options(q)))
    return items


def load_item_image(item):
    """uint8 [3, H, W] of a benchmark item (path or base64)."""

    if "image_b64" in item:
        return ck.load_image(base64.b64decode(item["image_b64"]))
    return ck.load_image(item["image"])


def resize_long_side(img_u8, size):
    """Resolution sweep: LANCZOS-resize uint8 [3, H, W] so the long side is `size` (aspect kept); None, or a size
    the image already has, keeps the image."""
    if size is None:
        return img_u8
    checks.number(size, "size", lo=1, whole=True)
    H, W = img_u8.shape[1:]
    s = size / max(H, W)
    h, w = max(1, round(H * s)), max(1, round(W * s))
    return img_u8 if (h, w) == (H, W) else ck.resize(img_u8, (h, w), "lanczos")


# ----------------------------------------------------------------------------------------------------------------
# Results files: one JSON line per question, resumed, with what produced them beside it


def _key(res, item):
    return f"{res or 'orig'}:{item['id']}"


def load_results(path):
    """Records of a results JSONL by key; a truncated last line (an interrupted run) is skipped."""

    out = {}
    if not os.path.exists(path):
        return out
    with open(path, "rb") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError):     # a torn line, junk, bytes that are not UTF-8
                continue
            if isinstance(rec, dict) and isinstance(rec.get("key"), str):   # a line of something else: skipped
                out[rec["key"]] = rec
    return out


def read_record(path):
    """The JSON object in the file at `path` (what a built artefact records about how it was made: a dataset's card,
    a model's recipe, a results file's .source), or None when the file is missing, unreadable, corrupt or holds
    something else."""
    try:
        with open(path, encoding="utf-8") as f:
            have = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    return have if isinstance(have, dict) else None


def matches_record(path, want):
    """Whether the record at `path` (read_record) holds every key of `want` with the same value."""
    have = read_record(path)
    return have is not None and {k: have.get(k) for k in want} == want


def checkpoint_source(directory):
    """What identifies a checkpoint's weights in a results file's .source: its folder, and the size and time of its
    weight files (a retrained checkpoint in the same folder is another source)."""
    files = [os.path.join(directory, f) for f in sorted(os.listdir(directory)) if f.endswith(".safetensors")]
    stats = [os.stat(f) for f in files]
    return {"checkpoint": os.path.abspath(directory), "bytes": sum(st.st_size for st in stats),
            "mtime": max((st.st_mtime for st in stats), default=0.0)}


def claim_results(out_path, source, restart=False):
    """Make the results file `out_path` hold results of `source` only (a JSON-ready dict of what produces them: the
    checkpoint, the loop's options, the benchmark), recorded beside it in `out_path`.source. Results of another
    source, or of an unknown one (no .source), are deleted when `restart` (saying so on stderr), else refused with
    a BenchError that says which keys differ and what to do. Returns "new", "resume" or "restart"."""
    meta = out_path + ".source"
    has_results = os.path.exists(out_path) and os.path.getsize(out_path) > 0
    if has_results and matches_record(meta, source):
        return "resume"
    what = "new"
    if has_results:
        old = read_record(meta)
        if old is not None:
            changed = _differences(old, source)
            why = f"{out_path} holds results of another source ({'; '.join(changed[:6])})"
        else:
            why = f"{out_path} holds results whose source is unknown ({meta} is missing or unreadable)"
        if not restart:
            raise BenchError(f"{why}; pick another --out, or pass --fresh (evaluate's restart=True) to delete them "
                             f"and start over")
        print(f"{why}: deleting them and starting over", file=sys.stderr, flush=True)
        os.remove(out_path)
        what = "restart"
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(meta, "w", encoding="utf-8") as f:
        json.dump(source, f)
    return what


def _differences(old, new, prefix=""):
    """`key old -> new` for every value that differs between two records (nested dicts key by key)."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} {a!r:.80} -> {b!r:.80}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Evaluation and summary tables


def evaluate(model, tokenizer, items, out_path, cfg=None, resolutions=(None,), batch_size=8, bench="bench",
             progress=True, source=None, restart=False):
    """Run the loop on every (resolution, item), appending one JSON line per question (the whole trajectory) to
    `out_path`; questions already in the file are skipped (resume). `source`: what produces the results (see
    claim_results): a file written by another source is refused, or with `restart` started over. Returns
    summarize(...) of the whole file."""

    cfg = cfg or cof.CofConfig()
    _check_eval_args(items, out_path, cfg, resolutions, batch_size)
    if source is not None:
        claim_results(out_path, source, restart)
    done = load_results(out_path)
    todo = [(res, it) for res in resolutions for it in items if _key(res, it) not in done]
    bar = report.Progress(len(todo), f"{bench}", enabled=progress)
    if os.path.exists(out_path) and os.path.getsize(out_path):
        with open(out_path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            cut = f.read(1) != b"\n"
        if cut:                                  # an interrupted write: end that line so the next record parses
            with open(out_path, "a", encoding="utf-8") as f:
                f.write("\n")
    with open(out_path, "a", encoding="utf-8") as f:
        for i in range(0, len(todo), batch_size):
            batch = todo[i:i + batch_size]
            t0 = time.time()
            try:
                trajs = _run_items(model, tokenizer, batch, cfg)
            except Exception:  # noqa: BLE001 - one bad item must not sink the run: retry one by one
                trajs = []
                for one in batch:
                    try:
                        trajs += _run_items(model, tokenizer, [one], cfg)
                    except Exception as e:  # noqa: BLE001 - recorded like the released loop's status "error"
                        trajs.append(e)
            dt = (time.time() - t0) / len(batch)
            n_ok = 0
            for (res, it), tr in zip(batch, trajs):
                base = dict(key=_key(res, it), bench=bench, id=it["id"], resolution=res, category=it["category"],
                            kind=it.get("kind"), cycle=it.get("cycle"), label=it["label"], seconds=dt)
                if isinstance(tr, Exception):
                    rec = dict(base, correct=False, error=f"{type(tr).__name__}: {tr}", question=it["question"],
                               answer="", n_zooms=0, n_generated=0, finished=False, turns=[])
                else:
                    rec = dict(base, correct=is_correct(it, tr.answer), **_record(tr))
                n_ok += rec["correct"]
                f.write(json.dumps(rec) + "\n")
            f.flush()
            bar.update(len(batch), batch_correct=f"{n_ok}/{len(batch)}")
    return summarize(list(load_results(out_path).values()))


def _record(traj):
    """What a results file keeps of a cof.Trajectory: the JSON-ready fields (no tensors)."""
    return dict(question=traj.question, answer=traj.answer, n_zooms=traj.n_zooms, n_generated=traj.n_generated,
                finished=traj.finished, original_size=list(traj.original_size), main_size=list(traj.main_size),
                turns=traj.turns)


def _check_eval_args(items, out_path, cfg, resolutions, batch_size):
    for i, it in enumerate(checks.sequence(items, "items", empty=True)):
        if not isinstance(it, dict) or not {"id", "question", "label"} <= set(it):
            raise TypeError(f"items[{i}] must be a benchmark item (a dict with id, question, label, image: what "
                            f"read_vstar / read_hrbench / read_synthetic return), got {it!r:.100}")
    if os.path.isdir(checks.string(out_path, "out_path")):
        raise ValueError(f"out_path {out_path} is a folder; name the results file (e.g. {out_path}/results.jsonl)")
    checks.kind(cfg, "cfg", cof.CofConfig, "a CofConfig")
    for r in checks.sequence(resolutions, "resolutions"):
        if r is not None:
            checks.number(r, "resolutions", lo=1, whole=True)
    checks.number(batch_size, "batch_size", lo=1, whole=True)


def _run_items(model, tokenizer, batch, cfg):
    imgs = [resize_long_side(load_item_image(it), res) for res, it in batch]
    return cof.run(model, tokenizer, imgs, [it["question"] for _, it in batch], cfg)


def summarize(records):
    """Per resolution: accuracy per category and overall (micro over questions; for HR-Bench, whose records carry a
    cycle, accuracy per option rotation averaged over the rotations as VLMEvalKit's report_acc_hrbench does),
    mean zooms, mean generated tokens, seconds per question. Returns a list of row dicts."""

    def acc(recs):
        cycles = sorted({r["cycle"] for r in recs if r.get("cycle") is not None})
        if cycles:
            return 100 * statistics.fmean(statistics.fmean(float(r["correct"]) for r in recs if r.get("cycle") == c)
                                     for c in cycles if any(r.get("cycle") == c for r in recs))
        return 100 * statistics.fmean(float(r["correct"]) for r in recs)

    rows = []
    for res in sorted({r["resolution"] for r in records}, key=lambda x: (x is not None, x or 0)):
        recs = [r for r in records if r["resolution"] == res]
        row = dict(resolution=res or "orig", n=len(recs))
        for cat in sorted({r["category"] for r in recs}):
            row[f"acc_{cat}"] = acc([r for r in recs if r["category"] == cat])
        row["acc_overall"] = acc(recs)
        row["errors"] = sum(1 for r in recs if r.get("error"))
        row["zooms"] = statistics.fmean(r["n_zooms"] for r in recs)
        row["gen_tokens"] = statistics.fmean(r["n_generated"] for r in recs)
        row["s_per_q"] = statistics.fmean(r["seconds"] for r in recs)
        rows.append(row)
    return rows


def kind_table(records):
    """How the model answers, per question kind (a record's `kind`, else its category) and over all records: n,
    accuracy, zoom rate (share of questions with at least one zoom), mean zooms, the share answered without any
    zoom and the accuracy of those direct answers, the accuracy after a zoom, generated tokens per question, and
    evaluation errors. Returns a list of row dicts (percentages in 0..100), the overall row last."""
    def row(name, recs):
        direct = [r for r in recs if r["n_zooms"] == 0]
        zoomed = [r for r in recs if r["n_zooms"] > 0]
        pct = lambda rs: 100 * sum(bool(r["correct"]) for r in rs) / len(rs) if rs else float("nan")  # noqa: E731
        return dict(kind=name, n=len(recs), accuracy=pct(recs), zoom_rate=100 * len(zoomed) / len(recs),
                    mean_zooms=_mean([r["n_zooms"] for r in recs]), direct_share=100 * len(direct) / len(recs),
                    direct_accuracy=pct(direct), zoomed_accuracy=pct(zoomed),
                    gen_tokens=_mean([r["n_generated"] for r in recs]), errors=sum(1 for r in recs if r.get("error")))

    if not records:
        return []
    kinds = {}
    for r in records:
        kinds.setdefault(r.get("kind") or r.get("category") or "all", []).append(r)
    return [row(k, v) for k, v in sorted(kinds.items())] + ([row("overall", records)] if len(kinds) > 1 else [])


def _mean(xs):
    return sum(xs) / max(1, len(xs))


def format_table(rows):
    """Markdown table of summarize() rows."""
    if not rows:
        return "(no results)"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: (f"{v:.2f}" if v == 0 or abs(v) >= 0.01 else f"{v:.1e}") if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Command line


def cfg_from_args(pairs, **base):
    """A cof.CofConfig from `key=value` strings (typed by the dataclass fields, as checks.parse_value reads a command
    line's values); ValueError naming `--cfg` and the pair for anything that is not a valid option (a command line
    turns it into argparse's error)."""
    types = {f.name: str(f.type) for f in fields(cof.CofConfig)}
    d = dict(base)
    for p in pairs or []:
        if "=" not in p:
            raise ValueError(f"--cfg expects key=value, got {p!r}")
        k, v = p.split("=", 1)
        if k not in types:
            raise ValueError(f"unknown --cfg key {k!r}; valid keys: {sorted(types)}")
        try:
            d[k] = checks.parse_value(v, k, types[k])
        except ValueError as e:
            raise ValueError(f"--cfg {p if len(p) <= 80 else p[:77] + '...'}: {e}") from None
    try:
        return cof.CofConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--cfg: {e}") from None


def load(model_path, device=None, dtype=None):
    """(model, tokenizer) of a checkpoint directory or hub id, on `device` (default CUDA if present) in `dtype`
    ("bf16" | "fp16" | "fp32"; default the checkpoint's)."""
    checks.one_of(dtype, "dtype", ("bf16", "fp16", "fp32", None))
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}[dtype]
    dev = checks.device(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    return M.Qwen25VL.from_pretrained(model_path, dtype=dt, device=dev).eval(), T.Tokenizer.from_pretrained(model_path)


def _common_options():
    common = checks.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, help="checkpoint directory or hub id")
    common.add_argument("--device", default=None, type=checks.arg(lambda t, n: str(checks.device(t, n))),
                        help="cuda / cpu (default: cuda when available)")
    common.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"])
    common.add_argument("--cfg", action="append", metavar="KEY=VALUE",
                        help="loop option, e.g. max_turns=6, invalid=text, max_pixels=1003520 (see CofConfig)")
    return common


def _cfg(p, a, **base):
    """The CofConfig of the parsed options' `--cfg` pairs over `base`; a bad one is argparse's one-line error (exit 2)."""
    try:
        return cfg_from_args(a.cfg, **base)
    except ValueError as e:
        p.error(str(e))


def eval_main(argv):
    """`evaluate.py`: a benchmark through the loop, one JSON line per question in --out (resumed when it was written
    by the same model, options and data; another source is refused unless --fresh), a summary table beside it."""
    p = checks.ArgumentParser(prog="evaluate.py", parents=[_common_options()],
                                description="Evaluate the CoF loop on a benchmark (JSONL per question + summary); "
                                            "`evaluate.py ask -h` for one image.")
    p.add_argument("--bench", required=True, choices=["vstar", "hrbench", "synthetic"])
    p.add_argument("--data", required=True, help="V* folder / HR-Bench .tsv / synthetic folder or RL JSON")
    p.add_argument("--out", required=True, help="results JSONL (appended; an existing file of the same model, "
                                                "options and data resumes; its source is kept in OUT.source)")
    p.add_argument("--fresh", action="store_true", help="delete results in --out written by another source and "
                                                        "start over (without it such an --out is refused)")
    p.add_argument("--resolutions", default=None, type=checks.arg(_resolutions),
                   help="comma-separated long sides to resize to before the loop ('orig' = as is)")
    p.add_argument("--sweep", action="store_true", help=f"the 8-size sweep {','.join(map(str, SWEEP))}")
    p.add_argument("--batch_size", type=checks.arg(lo=1, whole=True), default=8)
    p.add_argument("--limit", type=checks.arg(lo=1, whole=True), default=None, help="first N questions only")
    p.add_argument("--hr_prompt", default="vstar", choices=["vstar", "vlmeval"])
    a = p.parse_args(argv)
    cfg = _cfg(p, a)
    if os.path.isdir(a.out):
        p.error(f"--out {a.out} is a folder; name the results file, e.g. {os.path.join(a.out, 'results.jsonl')}")
    res = list(SWEEP) if a.sweep else (a.resolutions or [None])
    items = {"vstar": read_vstar, "synthetic": read_synthetic,
             "hrbench": lambda d: read_hrbench(d, a.hr_prompt)}[a.bench](a.data)[:a.limit]
    model, tok = load(a.model, a.device, a.dtype)
    source = dict(model=checkpoint_source(model.source_dir), dtype=a.dtype, cfg=asdict(cfg), bench=a.bench,
                  data=os.path.abspath(a.data), hr_prompt=a.hr_prompt)
    rows = evaluate(model, tok, items, a.out, cfg, res, a.batch_size, a.bench, source=source, restart=a.fresh)
    table = format_table(rows)
    recs = list(load_results(a.out).values())
    if len(res) == 1 and any(r.get("kind") for r in recs):      # our synthetic sets: how each kind is answered
        table += "\n\n" + format_table(kind_table(recs))
    print(table)
    with open(os.path.splitext(a.out)[0] + "_summary.md", "w") as f:     # beside --out, whatever dots its folders hold
        f.write(table + "\n")
    return rows


def _resolutions(text, name):
    """--resolutions: long sides (whole numbers >= 1) or 'orig', comma-separated."""
    return [None if r.strip() == "orig" else checks.parse_number(r.strip(), name, lo=1, whole=True)
            for r in text.split(",")]


def read_item(path):
    """`ask --item FILE`: {"image": path relative to FILE, "question": text, "cfg": {CofConfig field: value}}; a file
    of another shape is a BenchError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            item = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise BenchError(f"{path}: cannot read the item ({type(e).__name__}: {e})") from None
    if not isinstance(item, dict) or not isinstance(item.get("image"), str) or \
            not isinstance(item.get("question"), str) or not isinstance(item.get("cfg", {}), dict):
        raise BenchError(f"{path}: an item is an object with \"image\" and \"question\" strings and an optional "
                         f"\"cfg\" object")
    return dict(item, image=os.path.join(os.path.dirname(os.path.abspath(path)), item["image"]))


def ask_main(argv):
    """`evaluate.py ask --model M --image I --question Q` (or `--item FILE`): the loop on one image, each turn printed
    (and a trace PNG)."""
    p = checks.ArgumentParser(prog="evaluate.py ask", parents=[_common_options()],
                                description="Chain-of-Focus on one image: prints each turn; `evaluate.py -h` for "
                                            "benchmarks.")
    p.add_argument("--image", default=None)
    p.add_argument("--question", default=None)
    p.add_argument("--item", default=None, help="JSON file {image, question, cfg}: a question (the image's path "
                                                "relative to the file) and the loop options the model was trained "
                                                "with; --image, --question and --cfg override it")
    p.add_argument("--trace", default=None, help="write the chain as a PNG here")
    a = p.parse_args(argv)
    item = read_item(a.item) if a.item else {}
    a.image, a.question = a.image or item.get("image"), a.question or item.get("question")
    if not a.image or not a.question:
        p.error("give --image and --question, or --item FILE")
    cfg = _cfg(p, a, **item.get("cfg", {}))
    cfg = replace(cfg, keep_images=True) if a.trace else cfg
    model, tok = load(a.model, a.device, a.dtype)

    def show(row, t):
        print(f"--- turn {len(shown) + 1} ({t['n_tokens']} tokens, stop: {t['stop']})\n{t['text']}")
        if t.get("tool_call"):
            print(f"[zoom: {t.get('status')} box={t.get('box')} crop={t.get('crop_size')} {t.get('message', '')}]")
        shown.append(t)

    shown = []
    t0 = time.time()
    traj = cof.run(model, tok, [a.image], [a.question], cfg, on_turn=show)[0]
    print(f"=== answer: {traj.answer!r}  (zooms {traj.n_zooms}, generated tokens {traj.n_generated}, "
          f"image {traj.main_size[1]}x{traj.main_size[0]}, {time.time() - t0:.1f}s)")
    if a.trace:
        print(f"trace: {report.draw_trace(traj, a.trace)}")
    return traj


def main(argv=None):
    """`evaluate.py --model ... --bench ...` or `evaluate.py ask --model ... --image ... --question ...`. A bad option
    is argparse's one-line error (exit 2); a file that does not load (benchmark, image, checkpoint) one line
    `evaluate.py: error: ...` (exit 1)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with checks.one_line_errors("evaluate.py", BenchError, FileNotFoundError, hub.CheckpointError, ck.ImageError,
                                ck.ImageTooLargeError):
        return ask_main(argv[1:]) if argv[:1] == ["ask"] else eval_main(argv)


if __name__ == "__main__":
    main()
