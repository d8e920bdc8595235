"""Build the toy-V* dataset: images, CoF SFT trajectories, CoF-RL prompts, V*-format val/test splits, data card.

    python -m data.build --out data/synth --n 2000 --seed 0     # searches and images in one process per CPU core

Writes under OUT:
  images/{split}/{uid}.webp      the main image of each item (the smart-resized image at its resolution)
  images/{split}/{uid}_z{k}.webp zoom images of the trajectories (exactly what cof.py sends back)
  sft_train.json, sft_val.json   released CoF-SFT ShareGPT rows (data/formats.py), one per successful search
  rl_train.jsonl                 released CoF-RL rows (prepare_zoomin_data.py layout): --rl prompts of their own,
                                 scenes the SFT rows never show (an SFT model knows its training scenes by heart)
  val.jsonl, test_questions.jsonl  the held-out splits in V*'s test_questions.jsonl layout (image, text, category,
                                 question_id, label) plus bbox ([x, y, w, h], V* per-image json style),
                                 target_object, difficulty, kind, uid; OUT is a V*-layout folder for `evaluate.py`
  test_by_kind.jsonl             a second held-out set in the same layout with --per_kind items of each kind
                                 (easy / medium / hard / relative), so per-kind rates are not read off a handful
  card.json, card.md             counts, zoom histogram, the measured legibility table, a sample trajectory
Same --seed, same files (byte for byte). Items are drawn per (seed, split, index), so --n only adds items.

What the trajectories teach: each item's kind is drawn with the weights of --kinds. The agent answers from the main
view where its reader reads the detail there AND the model reads that kind directly (--eyesight, measured: the tool-
banned accuracy of the default SFT model per kind, at least --eyesight_bar), except for the --oracle_share of a
kind's items, where it trusts its own reader alone: a teacher with sharper eyes than the model (on "edge" items by
default, the mistake GRPO's adaptive reward is there to undo). Each question's options come in one fixed order
(--shuffle_options false), so that the letter follows from what was read: with V*'s shuffled options the 2-layer
model has to look the letter up (the last thought restates the options; --option_orders N writes every search N
times with its options rotated, so the letters cannot be learnt by heart), and at 3,000 SFT steps it did not learn
that lookup reliably (README "The built-in run").

The resolution sweep's setting (sweep.py) is this build with a ladder of --resolutions, a generous
--view_max_pixels, other --periods, the agent's --acuity and --min_box, fewer --kinds, and an --eyesight given per
rung ("medium@168=0.85": the model's direct accuracy on that kind at that resolution); --always_zoom true writes its
always-zoom baseline.
"""
from __future__ import annotations

import contextlib
import functools
import json
import multiprocessing
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, replace

import numpy as np

import checks
import cof
import evaluate as E
import report
from data import agent, formats, synth


# Bumped whenever the same BuildConfig would write different files (scenes, rendering, trajectory text, formats);
# card.json records it, and sft.py rebuilds its default dataset when it differs.
VERSION = 11


# The default run's model's eyesight: per question kind, the share of test_by_kind.jsonl its greedy answers get right
# with the zoom tool banned (sft.py's end-of-run `eval_no_zoom` per kind, README "data/"). The agent answers from the
# main view only where this is at least --eyesight_bar and its own reader (synth.read_texture) reads the detail there.
EYESIGHT = "easy=0.865,edge=0.335,medium=0.02,hard=0.035,relative=0.1"


@dataclass
class BuildConfig:
    out: str = "data/synth"
    n: int = 2000                   # train items (SFT rows = the successful searches among them)
    rl: int = 2000                  # RL prompts (rl_train.jsonl), from their own scenes (split "rl")
    seed: int = 0
    val: int = 200
    test: int = 400
    kinds: str = "easy=0.25,edge=0.25,medium=0.15,hard=0.2,relative=0.15"   # weights of the train/val/test items' kinds
    rl_kinds: str = "easy=2,edge=2,medium=1.5,hard=1,relative=1"        # weights of the RL prompts' kinds
    resolutions: str = "448"        # comma list; item i uses resolutions[i % len]; e.g. "224,448,...,3840"
    view_max_pixels: int = agent.TINY_VIEW_MAX_PIXELS   # the model processor's cap (7B: agent.QWEN_VIEW_MAX_PIXELS)
    colours: str = ",".join(synth.DEFAULT_COLOURS)   # palette names the scenes draw from ("all": synth.PALETTE)
    max_zooms: int = 3
    periods: str = ""               # stripe periods replacing synth.PERIOD's, e.g. "medium=6,hard=4" (empty: PERIOD)
    acuity: float = 0.0             # finest period (px of a model view) the agent counts as legible (0: ideal reader)
    min_box: int = 0                # smallest side (main-image px) of a box the agent zooms on (0: the object's own)
    eyesight: str = EYESIGHT        # per kind, the model's measured direct accuracy ("": the agent's reader alone);
    #                                 "kind@R=acc" gives it for the items at resolution R only (a sweep's ladder)
    eyesight_bar: float = 0.8       # the main view counts as legible for a kind the model reads at least this well
    oracle_share: str = "edge=0.6"  # per kind, the share of items whose trajectory trusts the agent's reader alone
    #                                 (a teacher with sharper eyes than the model's: the mistake GRPO should undo)
    always_zoom: bool = False       # trajectories zoom on every question (the always-zoom baseline's data)
    shuffle_options: bool = False   # V*'s shuffled options (False: one order per question, the letter follows from
    #                                 the answer; True: the last thought restates them and the letter is looked up)
    option_orders: int = 1          # SFT rows per train search: its options rotated 0..N-1 places, so that no letter
    #                                 can be learnt from the scene, only from the options (images shared)
    table_items: int = 3            # scenes per kind for the legibility table (0: skip it)
    per_kind: int = 200             # items of each question kind in test_by_kind.jsonl (0: skip it)

    @classmethod
    def from_args(cls, argv=None):
        return checks.parse_config(cls, argv, description=__doc__)

    def parsed_kinds(self, name):
        """The option `name` ('kind=number,...') as {kind: float} over synth.QUESTION_KINDS; ValueError naming the
        option otherwise."""
        text, label, out = getattr(self, name), f"--{name}", {}
        for part in filter(None, checks.string(text, label, empty=True).split(",")):
            k, _, v = part.partition("=")
            if k.strip() not in synth.QUESTION_KINDS:
                raise ValueError(f"{label} {text!r}: unknown kind {k.strip()!r}; use {', '.join(synth.QUESTION_KINDS)}")
            out[k.strip()] = checks.parse_number(v, f"{label} {k.strip()}", lo=0)
        return out

    def parsed_eyesight(self):
        """--eyesight as {(kind, resolution or None): accuracy}: 'kind=acc' holds at every resolution, 'kind@R=acc'
        at resolution R (and wins there)."""
        out = {}
        for part in filter(None, checks.string(self.eyesight, "--eyesight", empty=True).split(",")):
            key, _, v = part.partition("=")
            kind, at, R = key.strip().partition("@")
            if kind not in synth.QUESTION_KINDS:
                raise ValueError(f"--eyesight {self.eyesight!r}: unknown kind {kind!r} in {part.strip()!r}; use "
                                 f"{', '.join(synth.QUESTION_KINDS)}, optionally with @resolution (easy@224=0.9)")
            R = checks.parse_number(R, f"--eyesight {key.strip()} resolution", lo=1, whole=True) if at else None
            out[(kind, R)] = checks.parse_number(v, f"--eyesight {key.strip()}", lo=0)
        return out

    def eyesight_at(self, kind, resolution):
        """The model's measured direct accuracy on `kind` at `resolution` (--eyesight), None where not given."""
        eye = self.parsed_eyesight()
        return eye.get((kind, resolution), eye.get((kind, None)))

    def parsed_periods(self):
        out = {}
        for part in filter(None, self.periods.split(",")):
            k, _, v = part.partition("=")
            try:
                out[k.strip()] = float(v)
            except ValueError:
                raise ValueError(f"--periods {self.periods!r}: {part!r} is not difficulty=px") from None
        return synth.check_periods(out)

    def parsed_colours(self):
        names = list(synth.PALETTE) if self.colours.strip() == "all" else [c.strip() for c in self.colours.split(",")]
        return synth.check_colours(names, what=f"--colours {self.colours!r} ('all' or a comma list):")

    def parsed_resolutions(self):
        return [checks.parse_number(r, "--resolutions", lo=1, whole=True) for r in self.resolutions.split(",")]

    # option -> (lowest, whether allowed[, highest, whether allowed]), checked with the types by checks.options
    LIMITS = dict(n=(0, True), rl=(0, True), seed=(0, True, checks.SEED_MAX, True), val=(0, True), test=(0, True),
                  view_max_pixels=(1, True), max_zooms=(0, True), acuity=(0, True), min_box=(0, True), eyesight_bar=(0, True, 1, True),
                  option_orders=(1, True), table_items=(0, True), per_kind=(0, True))

    def __post_init__(self):
        checks.options(self)
        for name in ("kinds", "rl_kinds"):
            if not any(v > 0 for v in self.parsed_kinds(name).values()):
                raise ValueError(f"--{name} {getattr(self, name)!r}: give some kind a weight > 0")
        for k, v in self.parsed_kinds("oracle_share").items():
            checks.number(v, f"--oracle_share {k}", 0, 1)
        for (k, R), v in self.parsed_eyesight().items():
            checks.number(v, f"--eyesight {k}" + (f"@{R}" if R else ""), 0, 1)
        self.parsed_periods(), self.parsed_colours(), self.parsed_resolutions()


def _items(cfg, split, n, weights="kinds"):
    """n items of `split`; item i's kind is drawn with the weights of the option `weights` (kinds / rl_kinds) from
    the item's own Generator, so the same (seed, split, index) always gives the same item."""
    w = cfg.parsed_kinds(weights)
    names = [k for k in synth.QUESTION_KINDS if w.get(k, 0) > 0]     # BuildConfig checked that there is one
    p = np.array([w[k] for k in names]) / sum(w[k] for k in names)
    colours, periods, out = cfg.parsed_colours(), cfg.parsed_periods(), []
    for i in range(n):
        rng = synth.scene_rng(cfg.seed, split, i)
        cat, diff = synth.KIND_TARGET[names[rng.choice(len(names), p=p)]]
        out.append(synth.make_scene(rng, uid=f"{split}-{i:06d}", category=cat, difficulty=diff, colours=colours,
                                    periods=periods, shuffle_options=cfg.shuffle_options))
    return out


def _items_by_kind(cfg, n):
    """n items of each question kind with a weight in --kinds (synth.QUESTION_KINDS), from their own seed stream
    (split "by_kind")."""
    colours, periods, weights, out = cfg.parsed_colours(), cfg.parsed_periods(), cfg.parsed_kinds("kinds"), []
    for k, kind in enumerate(synth.QUESTION_KINDS):
        if weights.get(kind, 0) <= 0:
            continue
        cat, diff = synth.KIND_TARGET[kind]
        for i in range(n):
            rng = synth.scene_rng(cfg.seed, "by_kind", k * 1_000_000 + i)
            out.append(synth.make_scene(rng, uid=f"by_kind-{kind}-{i:06d}", category=cat, difficulty=diff,
                                        colours=colours, periods=periods, shuffle_options=cfg.shuffle_options))
    return out


IMAGE_EXT = ".webp"


def _save_image(img, path):
    """Lossless WebP: the same pixels as PNG (tests decode every file and compare) in fewer bytes on these scenes.
    JPEG, which the released data uses, would blur the 4 px stripes the questions ask about. method=1 is libwebp's
    fast effort level."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, format="WEBP", lossless=True, quality=25, method=1)
    return path


def vstar_record(scene, image_rel, qid):
    """A V* test_questions.jsonl line for one item (plus our annotations)."""
    x0, y0, x1, y1 = scene.target_box
    return {"image": image_rel, "text": scene.text, "category": scene.category, "question_id": qid,
            "label": scene.label, "bbox": [[x0, y0, x1 - x0, y1 - y0]], "target_object": [scene.name],
            "difficulty": scene.difficulty, "kind": synth.question_kind(scene.category, scene.difficulty),
            "uid": scene.uid}


def main_view_allowed(cfg, kind, split, i, resolution=None):
    """Whether the agent may answer item i of `split` (of question kind `kind`, at `resolution`) from the main view
    (where its reader reads the detail there): the model reads this kind directly at this resolution at least
    --eyesight_bar of the time (a kind not given: always), or the item is one of the --oracle_share whose teacher
    trusts its own reader (a draw of the item's own, not the scene's)."""
    eye = cfg.eyesight_at(kind, resolution)
    if eye is None or eye >= cfg.eyesight_bar:
        return True
    draw = np.random.default_rng([cfg.seed, synth.SPLIT_IDS[split], i, 1]).random()
    return bool(draw < cfg.parsed_kinds("oracle_share").get(kind, 0.0))


# Below this many items a build runs in this process: starting worker processes (each imports torch) costs seconds.
POOL_MIN_JOBS = 200


def _pool(workers, n_jobs):
    """A pool of `workers` spawned processes (they inherit nothing of the caller's state: a process group, threads),
    or None (this process) for one worker or fewer than POOL_MIN_JOBS jobs."""
    if workers <= 1 or n_jobs < POOL_MIN_JOBS:
        return contextlib.nullcontext()
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def _map(fn, jobs, pool, desc):
    """[fn(job) for job in jobs], in order, in `pool` (None: this process), with a progress bar."""
    if pool is not None:
        try:
            return list(report.progress(pool.map(fn, jobs, chunksize=16), desc=desc, total=len(jobs)))
        except BrokenProcessPool as e:  # a worker died (out of memory; a __main__ that cannot be re-imported: stdin)
            print(f"{desc}: worker processes failed ({e}); doing them in this process")
    return [fn(job) for job in report.progress(jobs, desc=desc)]


def trajectories(cfg, scenes, split, tools=None, desc=None, orders=1, pool=None):
    """Run the agent on every scene -> (sft rows, per-item records). Saves main and zoom images. orders: rows per
    successful search, its options rotated 0 .. orders - 1 places (the same images and readings, other letters).
    pool: worker processes for the oracle's searches (a model backend `tools` stays in this process)."""
    pool = pool if tools is None else None
    search = functools.partial(_search, cfg, split, tools or agent.OracleTools(), orders)
    rows, recs = [], []
    for item_rows, rec in _map(search, list(enumerate(scenes)), pool, desc or f"{split} searches"):
        rows += item_rows
        recs.append(rec)
    return rows, recs


def _search(cfg, split, tools, orders, job):
    """Item (i, scene) of `split`: the agent's search -> (its SFT rows, its record); saves its images."""
    i, sc = job
    res = cfg.parsed_resolutions()
    R = res[i % len(res)]
    world = agent.scene_world(sc, synth.render(sc), R, cfg.view_max_pixels, cfg.acuity,
                              restate_options=cfg.shuffle_options, min_box=cfg.min_box)
    kind = synth.question_kind(sc.category, sc.difficulty)
    result = agent.search(world, tools, cfg.max_zooms, cfg.always_zoom or not main_view_allowed(cfg, kind, split, i, R))
    first = result.steps[0].look
    rec = {"uid": sc.uid, "category": sc.category, "difficulty": sc.difficulty, "kind": kind, "resolution": R,
           "success": result.success, "zooms": len(result.zooms) if result.success else None,
           "reader_direct": first.letter == sc.label}
    if not result.success:
        return [], rec
    texts, images = agent.summarize(result)
    rec["zooms"] = len(images) - 1
    paths = [_save_image(images[0], os.path.join(cfg.out, "images", split, f"{sc.uid}{IMAGE_EXT}"))]
    paths += [_save_image(im, os.path.join(cfg.out, "images", split, f"{sc.uid}_z{k}{IMAGE_EXT}"))
              for k, im in enumerate(images[1:], 1)]
    rows = []
    for k in range(orders):
        shown = synth.rotate_options(sc, k) if k else sc
        texts = agent.summarize(agent.relabel(result, shown))[0] if k else texts
        rows.append({"messages": agent.to_messages(shown.question, shown.label, texts), "images": paths})
    return rows, rec


def _rl_prompt(cfg, job):
    """RL prompt i: its main image (saved) -> its rl_train.jsonl record."""
    i, sc = job
    res = cfg.parsed_resolutions()
    path = os.path.join(cfg.out, "images", "rl", f"{sc.uid}{IMAGE_EXT}")
    _save_image(agent.scene_world(sc, synth.render(sc), res[i % len(res)]).main, path)
    return formats.rl_record(cof.SYSTEM_PROMPT, cof.rl_prompt(sc.question, sc.label),
                             formats.relative_image(path, cfg.out), sc.label, sc.question, i, "train",
                             extra={"kind": synth.question_kind(sc.category, sc.difficulty)})


def _held_out(cfg, split, job):
    """Held-out item i of `split`: its image (saved unless a search saved it) -> its V*-layout record."""
    i, sc = job
    path = os.path.join(cfg.out, "images", split, f"{sc.uid}{IMAGE_EXT}")
    if not os.path.exists(path):
        _save_image(synth.render(sc), path)
    return vstar_record(sc, formats.relative_image(path, cfg.out), i)


# ----------------------------------------------------------------------------------------------------------------
# The legibility table: how big the detail is, and whether it survives, per resolution (measured)

KINDS = tuple(synth.KIND_TARGET.values())      # (category, difficulty) of each question kind, in its order


def legibility_table(resolutions=E.SWEEP, view_max_pixels=agent.TINY_VIEW_MAX_PIXELS, n=12, seed=12345, acuity=0.0,
                     periods=None, min_box=0):
    """For each resolution and kind of item: the stripe period in px of the main image and of each model view
    (main view, zoom on the object's cell, zoom on the detail), the measured contrast left (fraction of the rendered
    RMS contrast) and the share of items whose texture is read correctly with contrast >= LEGIBLE_CONTRAST (and a
    period of at least `acuity` view px). Returns a list of dicts (one per resolution x kind)."""
    tools = agent.OracleTools()
    out = []
    scenes = {k: [synth.make_scene(synth.scene_rng(seed, "test", 1000 * j + i), category=k[0], difficulty=k[1],
                                   periods=periods) for i in range(n)] for j, k in enumerate(KINDS)}
    images = {k: [synth.render(s) for s in v] for k, v in scenes.items()}
    for R in resolutions:
        for kind in KINDS:
            stats = {"main": [], "cell": [], "detail": []}
            for sc, img in zip(scenes[kind], images[kind]):
                w = agent.scene_world(sc, img, R, view_max_pixels, acuity, min_box=min_box)
                views = {"main": w.main_view(), "cell": w.zoom(agent.tool_call_text(tools.locate(w)))}
                tight = tools.adjust_box(w, tools.locate(w))
                views["detail"] = w.zoom(agent.tool_call_text(tight)) if tight else views["cell"]
                for name, v in views.items():
                    look = tools.look(w, v)
                    p = sc.details[0].period * w.src_scale[0] * v.scale[0]
                    stats[name].append((p, min(look.contrast), look.answer == sc.answer))
            row = {"resolution": R, "main_px": w.size[0], "category": kind[0], "difficulty": kind[1],
                   "period_image_px": round(sc.details[0].period * w.src_scale[0], 2)}
            for name, s in stats.items():
                row[f"{name}_period_px"] = round(sum(x[0] for x in s) / len(s), 2)
                row[f"{name}_contrast"] = round(sum(x[1] for x in s) / len(s), 3)
                row[f"{name}_legible"] = round(sum(x[2] for x in s) / len(s), 3)
            out.append(row)
    return out


def table_markdown(rows):
    head = ("| long side | main image | item | stripe period in image | main view: period / contrast / legible | "
            "zoom on object | zoom on detail |\n|---|---|---|---|---|---|---|\n")
    body = ""
    for r in rows:
        cells = [f"{r[f'{v}_period_px']:.1f} px / {r[f'{v}_contrast']:.2f} / {100 * r[f'{v}_legible']:.0f}%"
                 for v in ("main", "cell", "detail")]
        body += (f"| {r['resolution']} | {r['main_px']} | {synth.question_kind(r['category'], r['difficulty'])} | "
                 f"{r['period_image_px']:.1f} px | " + " | ".join(cells) + " |\n")
    return head + body


# ----------------------------------------------------------------------------------------------------------------


def build(cfg, workers=None):
    """Write the dataset of `cfg` (module docstring); workers: processes for the searches and images (default: one
    per CPU core; the files are the same for any number)."""
    t0 = time.time()
    cfg = replace(cfg, out=os.path.abspath(cfg.out))  # image paths are made relative to OUT, not to the cwd
    os.makedirs(cfg.out, exist_ok=True)
    n_jobs = 2 * cfg.n + cfg.rl + 2 * cfg.val + cfg.test + len(synth.QUESTION_KINDS) * cfg.per_kind
    with _pool(workers or os.cpu_count() or 1, n_jobs) as pool:
        train, val, test = _items(cfg, "train", cfg.n), _items(cfg, "val", cfg.val), _items(cfg, "test", cfg.test)
        sft_train, rec_train = trajectories(cfg, train, "train", orders=cfg.option_orders, pool=pool)
        sft_val, rec_val = trajectories(cfg, val, "val", pool=pool)
        formats.write_sft(os.path.join(cfg.out, "sft_train.json"), sft_train)
        formats.write_sft(os.path.join(cfg.out, "sft_val.json"), sft_val)

        rl_items = _items(cfg, "rl", cfg.rl, "rl_kinds")
        rl = _map(functools.partial(_rl_prompt, cfg), list(enumerate(rl_items)), pool, "rl images")
        formats.write_rl(os.path.join(cfg.out, "rl_train.jsonl"), rl)

        names = {"val": "val.jsonl", "test": "test_questions.jsonl", "by_kind": "test_by_kind.jsonl"}
        by_kind = _items_by_kind(cfg, cfg.per_kind) if cfg.per_kind else []
        for split, scenes in (("val", val), ("test", test), ("by_kind", by_kind)):
            recs = _map(functools.partial(_held_out, cfg, split), list(enumerate(scenes)), pool, f"{split} images")
            if scenes:
                formats.write_jsonl(os.path.join(cfg.out, names[split]), recs)

    card = {"config": asdict(cfg), "version": VERSION, "counts": {"train_items": len(train), "sft_train_rows": len(sft_train),
                                              "sft_val_rows": len(sft_val), "rl_rows": len(rl),
                                              "val_items": len(val), "test_items": len(test),
                                              "test_by_kind_items": len(by_kind)},
            "zooms": zoom_histogram(rec_train), "zooms_by_kind": zoom_by_kind(rec_train),
            "kinds": kind_summary(cfg, rec_train),
            "test_mix": dict(Counter(synth.question_kind(s.category, s.difficulty) for s in test))}
    if cfg.table_items:
        card["legibility"] = legibility_table(view_max_pixels=cfg.view_max_pixels, n=cfg.table_items,
                                              acuity=cfg.acuity, periods=cfg.parsed_periods(), min_box=cfg.min_box)
        if cfg.view_max_pixels != agent.QWEN_VIEW_MAX_PIXELS:
            card["legibility_qwen"] = legibility_table(view_max_pixels=agent.QWEN_VIEW_MAX_PIXELS, n=cfg.table_items,
                                                       periods=cfg.parsed_periods())
    if sft_train:
        card["sample"] = {"images": [formats.relative_image(p, cfg.out) for p in sft_train[0]["images"]],
                          "messages": sft_train[0]["messages"][1:]}
    card["seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(cfg.out, "card.json"), "w") as f:
        json.dump(card, f, indent=1)
    with open(os.path.join(cfg.out, "card.md"), "w") as f:
        f.write(card_markdown(card))
    return card


def zoom_histogram(recs):
    c = Counter("failed" if not r["success"] else ("2+" if r["zooms"] >= 2 else str(r["zooms"])) for r in recs)
    return {k: c.get(k, 0) for k in ("0", "1", "2+", "failed")}


def zoom_by_kind(recs):
    c = Counter((r["category"], r["difficulty"], r["resolution"], r["zooms"] if r["success"] else "failed")
                for r in recs)
    return [{"category": a, "difficulty": b, "resolution": R, "zooms": z, "count": n}
            for (a, b, R, z), n in sorted(c.items(), key=str)]


def kind_summary(cfg, recs):
    """Per question kind of the train items: how many, the share whose main view the agent's reader reads (the
    FFT reader's eyesight), the model's measured direct accuracy (--eyesight), and the share of the trajectories that
    answer from the main view, with their mean zooms."""
    out = []
    for kind in synth.QUESTION_KINDS:
        rs = [r for r in recs if r["kind"] == kind]
        ok = [r for r in rs if r["success"]]
        if rs:
            out.append({"kind": kind, "items": len(rs), "reader_direct": sum(r["reader_direct"] for r in rs) / len(rs),
                        "eyesight": _eyesight_label(cfg, kind), "direct": sum(r["zooms"] == 0 for r in ok) / max(len(ok), 1),
                        "mean_zooms": sum(r["zooms"] for r in ok) / max(len(ok), 1)})
    return out


def _eyesight_label(cfg, kind):
    """--eyesight for `kind` as the card shows it: its accuracy, "by resolution" when given per rung, or None."""
    if cfg.eyesight_at(kind, None) is not None:
        return cfg.eyesight_at(kind, None)
    return "by resolution" if any(k == kind for k, _ in cfg.parsed_eyesight()) else None


def kind_markdown(card):
    bar = card["config"]["eyesight_bar"]
    s = (f"Per question kind (train items): what the agent's reader (synth.read_texture) reads in the main view, the "
         f"model's measured direct accuracy (--eyesight; the main view counts as legible where it is >= {bar:g}, "
         f"or for the --oracle_share {card['config']['oracle_share']!r} of the items), and what the trajectories "
         f"do.\n\n| kind | items | reader reads the main view | model reads it (measured) | trajectories answering "
         f"directly | mean zooms |\n|---|---|---|---|---|---|\n")
    for r in card.get("kinds", []):
        eye = {None: "-"}.get(r["eyesight"], r["eyesight"])
        eye = f"{100 * eye:.0f}%" if isinstance(eye, float) else eye
        s += (f"| {r['kind']} | {r['items']} | {100 * r['reader_direct']:.0f}% | {eye} | {100 * r['direct']:.0f}% | "
              f"{r['mean_zooms']:.2f} |\n")
    return s + "\n"


def card_markdown(card):
    z = card["zooms"]
    s = (f"Items: {card['counts']['train_items']} train ({card['counts']['sft_train_rows']} SFT trajectories), "
         f"{card['counts']['val_items']} val, {card['counts']['test_items']} test. "
         f"Trajectories zooming 0 / 1 / 2+ times: {z['0']} / {z['1']} / {z['2+']} (failed searches: {z['failed']}).\n\n")
    s += kind_markdown(card)
    for key, who in (("legibility", f"a model view of at most {card['config']['view_max_pixels']} px"),
                     ("legibility_qwen", f"Qwen2.5-VL-7B's processor (at most {agent.QWEN_VIEW_MAX_PIXELS} px)")):
        if key in card:
            s += (f"Legibility with {who}: stripe period in px and contrast left (share of the rendered RMS "
                  f"contrast); legible = read right by synth.read_pattern with contrast >= {synth.LEGIBLE_CONTRAST} "
                  f"({card['config']['table_items']} items per row).\n\n" + table_markdown(card[key]) + "\n")
    if "sample" in card:
        s += "Sample: " + ", ".join(card["sample"]["images"]) + "\n\n```\n"
        s += "\n---\n".join(f"[{m['role']}] {m['content']}" for m in card["sample"]["messages"]) + "\n```\n"
    return s


def main(argv=None):
    cfg = BuildConfig.from_args(argv)
    with checks.one_line_errors("python -m data.build", OSError, formats.DataError):   # e.g. an --out that is a file
        card = build(cfg)
    print(card_markdown(card))
    print(f"wrote {cfg.out} in {card['seconds']} s")


if __name__ == "__main__":
    main()
