"""The resolution sweep: does CoF zoom where it must and look directly where it can, as the image's resolution grows?

The paper's two claims (arXiv 2505.15436, sections 4-5; ../shared/reference/cof-paper.md): CoF beats the base model on
V* at each of 8 resolutions from 224 to 3840 px, and the adaptive model "automatically transitions from iterative
zooming to direct observation" as resolution rises, with far fewer zooms and tokens than always-zoom models. This
file reproduces the experiment in miniature on the synthetic task, on a CPU, with one command:

    python sweep.py                      # data, three trainings, 4 x 7 evaluations, tables and plot

The setting. Qwen2.5-VL-7B sees an image at its own size (its processor caps at 12.8 M px), so a crop adds no pixels
the model did not have: zooming helps because the small detail, blown up, covers more patches. Here:
  * the scene (data/synth.py, 448 px, 4 x 4 cells) is resized to each rung of LADDER (long side 56 to 224 px) and
    seen at that size (VIEW_MAX_PIXELS = 224 x 224; the loop shows rungs under 112 px at 112, blurred): 16 tokens
    at the bottom, 64 at the top, few enough for a 2-layer model to find the target among;
  * two kinds of direction question (KIND_WEIGHTS): easy (a big object, stripes of 16 px of the scene) and medium
    (a small object, one token at the top rung, 14 px), so that each kind's stripes go from gone (under ~2 px of
    the image) to legible only after a zoom to legible directly as the rung grows (results.md's last table,
    measured with the agent's reader); the tag and patch kinds are left out: the tiny model read them near chance;
  * the search agent answers from the main view only where the model reads that kind directly at that rung at
    least EYESIGHT_BAR of the time (EYESIGHT: the tool-banned accuracy, on items of another seed, of a CoF-SFT
    model trained with the reader's rule alone, 5 px acuity) and its reader reads it there; elsewhere it zooms.
    results.md prints this table next to the direct model's accuracy in this run.
Both SFT models are fine-tuned from the default run's SFT checkpoint (`python sft.py`, trained first if missing), which
already reads stripes of 5-7 px, knows the colours, the grid words and the tool-call format. Trained from scratch on
this setting's rows, the tiny model learnt where to zoom but read no better than chance in 2,500 steps
(docs/notes.md). MIN_BOX keeps every zoom at about twice the main image's scale, so the stripes a zoom is needed
for (2.5-5 px in the main view) show at 5-10 px, the scale it reads.

The four models, all evaluated greedily through cof.py's loop on the same balanced test items (data/build.py's
test_by_kind: `per_kind` of each kind) resized to each rung:
  (a) direct      CoF-SFT with <tool_call> banned (CofConfig.direct): the model forced to answer from the image;
  (b) always-zoom SFT on trajectories that zoom on every question (data.build --always_zoom);
  (c) CoF-SFT     SFT on the agent's adaptive trajectories;
  (d) CoF-GRPO    (c) after grpo.py (AGAR) on RL prompts of the same rungs and kinds.

Every stage is skipped when its output is complete and resumes when it was cut (sft.py / grpo.py --resume auto,
evaluate.evaluate's per-question file); a trained stage is recognised by its last checkpoint only, so other training
options want another --out. Stages that do not need each other run side by side (`parallel`, on by default: two
1-thread jobs make better use of 2 cores than one 2-thread job does for a model this small); the trainers print to
OUT/logs/<job>.log and the sweep prints each running job's progress once a minute. Outputs under OUT (runs/sweep):
data/, data-always/, sft-cof/, sft-always/, grpo/, logs/, eval/<model>.jsonl (every trajectory),
results.json, results.md, results.png.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import torch
from PIL import Image, ImageDraw

import checks
import cof
import evaluate as E
import grpo
import report
import sft
from checks import option
from data import build, synth, tiny

LADDER = (56, 84, 112, 140, 168, 196, 224)   # long side, px (the scene is 448)
VIEW_MAX_PIXELS = 224 * 224                  # the model processor's cap: no rung is shrunk for the model
ACUITY = 5.0                                 # finest stripe period (px of a model view) the agent's reader counts
PERIODS = "easy=16,medium=14"                # stripe periods (px of the 448 scene) of this setting
MIN_BOX = 38                                 # smallest box the agent zooms on (main-image px): every zoom x2 or more
KIND_WEIGHTS = "easy=1,medium=1"             # the question kinds of the train / val / test items
RL_KIND_WEIGHTS = "easy=1,medium=1"          # the RL prompts' kinds
KINDS = tuple(build.BuildConfig(kinds=KIND_WEIGHTS).parsed_kinds("kinds"))
MODELS = ("direct", "always-zoom", "cof-sft", "cof-grpo")
# The model's eyesight: per kind, its direct (tool-banned) accuracy at each rung of LADDER, measured on 70 items a
# kind (build --seed 1 --per_kind 70, every item at every rung: not the test items) by a CoF-SFT fine-tune on this
# setting's rows built with the reader's rule alone (--eyesight "", 6,000 scenes, easy / medium / hard; docs/notes.md).
# The agent answers from the main view where this reaches EYESIGHT_BAR (and its reader reads it there): the model's
# zoomed reading of these kinds is 40-80%, so a direct answer it gets right 60% of the time is worth keeping.
EYESIGHT = {"easy": (0.043, 0.043, 0.043, 0.643, 0.829, 0.8, 0.786),
            "medium": (0.043, 0.071, 0.071, 0.214, 0.629, 0.771, 0.7)}
EYESIGHT_BAR = 0.6


def eyesight_option():
    """EYESIGHT as data.build's --eyesight value ('kind@R=accuracy,...')."""
    return ",".join(f"{k}@{R}={a:g}" for k, accs in EYESIGHT.items() for R, a in zip(LADDER, accs))


@dataclasses.dataclass
class SweepConfig:
    out: str = option("runs/sweep", "output directory (every stage's files; reused and resumed on a second run)")
    seed: int = option(0, "seed of the data, the trainings and the sampling")
    base: str = option("", "checkpoint both SFT runs start from; empty = the default run's (`sft.py`, trained if missing)")
    train_items: int = option(6000, "training scenes (SFT rows = the successful searches among them)")
    rl_items: int = option(2000, "RL prompts")
    per_kind: int = option(105, "test items of each question kind; each is asked at every rung")
    sft_steps: int = option(1500, "optimizer steps of each SFT fine-tune (batch 32)")
    sft_lr: float = option(1e-3, "peak learning rate of the SFT fine-tunes")
    grpo_steps: int = option(150, "GRPO steps (16 prompts x 6 samples each)")
    eval_batch: int = option(50, "questions decoded together in the evaluation")
    threads: int = option(1, "torch CPU threads of each job (fixed, so that the numbers do not depend on `parallel`)")
    parallel: bool = option(True, "run stages that do not need each other side by side (two at a time)")
    compile: bool = option(True, "decode the evaluation and the rollouts through decode.py's compiled step")

    LIMITS = dict(seed=(0, True, checks.SEED_MAX, True), train_items=(1, True), rl_items=(1, True), per_kind=(1, True),
                  sft_steps=(1, True), sft_lr=(0, False), grpo_steps=(1, True), eval_batch=(1, True),
                  threads=(1, True, checks.THREADS_MAX, True))

    def __post_init__(self):
        checks.options(self)
        has = [os.path.isfile(os.path.join(self.base, f)) for f in ("config.json", "model.safetensors",
                                                                     "model.safetensors.index.json")]
        if self.base and not (has[0] and (has[1] or has[2])):
            raise ValueError(f"--base {self.base}: not a checkpoint directory (config.json and model.safetensors); "
                             f"name a ckpt-NNNNNN directory an SFT run wrote, or leave --base empty for the default "
                             f"run's")

    from_dict = classmethod(checks.from_dict)


def log(msg):
    print(f"[sweep {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ stages

def build_data(cfg, always_zoom):
    """The synthetic set of this setting under OUT/data (adaptive trajectories, RL prompts, val and test) or
    OUT/data-always (always-zoom trajectories only); rebuilt only when its recipe changed."""
    out = os.path.join(os.path.abspath(cfg.out), "data-always" if always_zoom else "data")
    bcfg = build.BuildConfig(out=out, n=cfg.train_items, rl=0 if always_zoom else cfg.rl_items, seed=cfg.seed,
                             val=200, test=0, per_kind=0 if always_zoom else cfg.per_kind,
                             resolutions=",".join(map(str, LADDER)), view_max_pixels=VIEW_MAX_PIXELS,
                             kinds=KIND_WEIGHTS, rl_kinds=RL_KIND_WEIGHTS, periods=PERIODS, acuity=ACUITY,
                             min_box=MIN_BOX, eyesight=eyesight_option(), eyesight_bar=EYESIGHT_BAR, oracle_share="",
                             always_zoom=always_zoom,
                             table_items=0 if always_zoom else 3)
    card = os.path.join(out, "card.json")
    if E.matches_record(card, {"config": dataclasses.asdict(bcfg), "version": build.VERSION}):
        log(f"reusing {out}")
    else:
        log(f"building {out}")
        build.build(bcfg)
    return out


def _die_with_parent():
    """In the child, before it runs: ask Linux to send it SIGTERM when the sweep dies, however it dies (a killed sweep
    must not leave a trainer running that the next sweep would start again on the same directory)."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):                # not Linux: stop() still ends the children on an exception
        pass


class Job:
    """A trainer run as its own process (the command a reader would type; `procs` > 1: under torchrun), unless `done`
    (its last checkpoint) exists. Its output goes to OUT/logs/NAME.log, so that two jobs side by side do not
    interleave their progress bars."""

    def __init__(self, cfg, name, argv, done, procs=1):
        self.name, self.done, self.proc = name, done, None
        if os.path.exists(done):
            log(f"reusing {done}")
            return
        self.log_path = os.path.join(cfg.out, "logs", f"{name}.log")
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        log(f"{name}: " + " ".join(argv) + f"  (output: {self.log_path})")
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), argv[0])
        launch = [sys.executable] + (["-m", "torch.distributed.run", f"--nproc_per_node={procs}"] if procs > 1 else [])
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(launch + [script] + argv[1:], stdout=out, stderr=subprocess.STDOUT,
                                         preexec_fn=_die_with_parent)
        self.t0 = time.time()

    def last_line(self):
        """The job's latest progress line (progress bars rewrite their line with a carriage return)."""
        with open(self.log_path, "rb") as f:
            f.seek(max(0, os.path.getsize(self.log_path) - 4096))
            lines = [ln.strip() for ln in re.split(r"[\r\n]", f.read().decode(errors="replace"))]
        return next((ln for ln in reversed(lines) if ln), "")

    def wait(self, others=(), every=60.0):
        """Block until the job ends, printing every `every` s the progress of it and of the `others` running."""
        last = time.time()
        while self.proc is not None and self.proc.poll() is None:
            time.sleep(1.0)
            if time.time() - last >= every:
                last = time.time()
                for job in (self,) + tuple(others):
                    if job.proc is not None and job.proc.poll() is None:
                        log(f"{job.name}: {job.last_line()}")
        if self.proc is not None:
            if self.proc.returncode != 0:
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}; its last line: "
                                   f"{self.last_line()!r} (whole output: {self.log_path})")
            log(f"{self.name}: done in {(time.time() - self.t0) / 60:.1f} min")
            self.proc = None
        if not os.path.exists(self.done):
            raise RuntimeError(f"{self.name} finished without writing {self.done}")
        return self.done

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()


def _common(cfg, data):
    """Options both trainers take in this setting (the tiny preset's, with the generous view)."""
    return ["--eval.processor_min_pixels", str(tiny.TINY_MIN_PIXELS), "--eval.processor_max_pixels",
            str(VIEW_MAX_PIXELS), "--eval.system", "false", "--eval_data", os.path.join(data, "val.jsonl"), "--eval_n",
            "100", "--eval.max_new_tokens", "96", "--eval_batch", str(cfg.eval_batch), "--eval.question_format",
            "train", "--threads", str(cfg.threads), "--seed", str(cfg.seed), "--resume", "auto"]


def default_run(cfg):
    """The checkpoint both SFT runs start from: --base, or the default run's (`sft.py` with no options, trained
    first when missing: the 112 px world, where the tiny model learns to read stripes of 5-7 px)."""
    if cfg.base:
        return Job(cfg, "sft-default", [], cfg.base)
    done = os.path.join(sft.TINY_PRESET["out"], f"ckpt-{sft.TINY_PRESET['max_steps']:06d}")
    return Job(cfg, "sft-default", ["sft.py"], done, procs=2)


def train_sft(cfg, start, data, name):
    """Start the SFT run NAME (a Job) from START on the trajectories in DATA, with the default run's recipe
    (sft.TINY_PRESET) at `sft_steps` and `sft_lr`."""
    out = os.path.join(cfg.out, name)
    recipe = {k: sft.TINY_PRESET[k] for k in ("batch_size", "grad_accum", "warmup_ratio", "min_lr_ratio",
                                                "weight_decay", "clip_grad", "answer_weight")}
    argv = ["sft.py", "--model", start, "--data", os.path.join(data, "sft_train.json"), "--out", out,
            "--max_steps", str(cfg.sft_steps), "--lr", str(cfg.sft_lr), "--freeze_vision", "no",
            "--eval_every", "0", "--save_every", "250", "--eval_no_zoom", "false",
            "--max_len", "2048"]
    argv += [a for k, v in recipe.items() for a in (f"--{k}", str(v))] + _common(cfg, data)
    return Job(cfg, name, argv, os.path.join(out, f"ckpt-{cfg.sft_steps:06d}"))


def train_grpo(cfg, start, data):
    """Start GRPO (a Job) from the CoF-SFT checkpoint START."""
    out = os.path.join(cfg.out, "grpo")
    preset = {k: grpo.TINY_GRPO_PRESET[k] for k in ("prompts_per_step", "group_size", "micro_batch", "lr", "beta",
                                                    "rollout.max_new_tokens")}
    argv = ["grpo.py", "--model", start, "--data", os.path.join(data, "rl_train.jsonl"), "--out", out,
            "--max_steps", str(cfg.grpo_steps), "--freeze_vision", "yes", "--freeze_merger", "--eval_start", "false",
            "--eval_every", "0", "--save_every", "25", "--rollout.compile", str(cfg.compile).lower(),
            "--rollout.processor_min_pixels", str(tiny.TINY_MIN_PIXELS), "--rollout.processor_max_pixels",
            str(VIEW_MAX_PIXELS), "--rollout.system", "false", "--rollout.max_model_len", "2048"]
    argv += [a for k, v in preset.items() for a in (f"--{k}", str(v))] + _common(cfg, data)
    return Job(cfg, "grpo", argv, os.path.join(out, f"ckpt-{cfg.grpo_steps:06d}"))


def evaluate(cfg, name, ckpt, items):
    """Every test item at every rung through the CoF loop (greedy); trajectories in OUT/eval/<name>.jsonl, resumed
    question by question. A file left by another checkpoint is started over."""
    path = os.path.join(cfg.out, "eval", f"{name}.jsonl")
    model, tok = E.load(ckpt, device="cpu", dtype="fp32")
    ccfg = cof.CofConfig(processor_min_pixels=tiny.TINY_MIN_PIXELS, processor_max_pixels=VIEW_MAX_PIXELS,
                         max_turns=6, max_new_tokens=96, system=False, question_format="train",
                         compile=cfg.compile, direct=name == "direct")
    log(f"evaluating {name} ({ckpt}): {len(items)} questions x {len(LADDER)} rungs")
    E.evaluate(model, tok, items, path, ccfg, resolutions=LADDER, batch_size=cfg.eval_batch, bench=name,
               source=E.checkpoint_source(ckpt), restart=True)
    return list(E.load_results(path).values())


# ------------------------------------------------------------------------------------------------ results

def result_rows(records):
    """One row per (model, rung): accuracy overall and per kind, mean zooms, share answered without a zoom,
    generated tokens and seconds per question."""
    rows = []
    for name, recs in records.items():
        for R in LADDER:
            at = [r for r in recs if r["resolution"] == R]
            kinds = {k["kind"]: k for k in E.kind_table(at)}
            if not kinds:
                continue
            overall = kinds.get("overall") or next(iter(kinds.values()))
            row = dict(model=name, resolution=R, n=overall["n"], accuracy=overall["accuracy"],
                       **{f"acc_{k}": kinds[k]["accuracy"] if k in kinds else None for k in KINDS},
                       mean_zooms=overall["mean_zooms"], direct_share=overall["direct_share"],
                       gen_tokens=overall["gen_tokens"], s_per_q=sum(r["seconds"] for r in at) / len(at),
                       errors=overall["errors"])
            rows.append(row)
    return rows


def markdown(rows):
    """The full table, then accuracy and mean zooms pivoted (rung x model)."""
    f = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    s = ("| long side | model | accuracy | " + " | ".join(KINDS) + " | mean zooms | answered directly | tokens / q | "
         "s / q |\n" + "|---" * (len(KINDS) + 7) + "|\n")
    for r in rows:
        s += (f"| {r['resolution']} | {r['model']} | {f(r['accuracy'])} | "
              + " | ".join(f(r[f'acc_{k}'], 0) for k in KINDS)
              + f" | {f(r['mean_zooms'], 2)} | {f(r['direct_share'], 0)}% | {f(r['gen_tokens'], 0)} | "
              f"{f(r['s_per_q'], 3)} |\n")
    names = [m for m in MODELS if any(r["model"] == m for r in rows)]
    for key, title, d in (("accuracy", "Accuracy, %", 1), ("mean_zooms", "Mean zooms per question", 2)):
        s += f"\n{title}:\n\n| long side | " + " | ".join(names) + " |\n" + "|---" * (len(names) + 1) + "|\n"
        for R in LADDER:
            cells = [next((f(r[key], d) for r in rows if r["model"] == m and r["resolution"] == R), "-")
                     for m in names]
            s += f"| {R} | " + " | ".join(cells) + " |\n"
    return s


def eyesight_markdown(rows):
    """The agent's rule (EYESIGHT, measured before the run; `direct` where it reaches EYESIGHT_BAR) next to this
    run's direct model, per kind and rung (direct accuracy in %)."""
    s = (f"The eyesight rule: per kind and rung, the direct accuracy EYESIGHT was measured at (val items) -> this run's "
         f"direct model (test items), and what the agent's trajectories do there (direct where EYESIGHT >= "
         f"{100 * EYESIGHT_BAR:.0f}% and the reader reads the main view, else zoom):\n\n| kind | "
         + " | ".join(str(R) for R in LADDER) + " |\n" + "|---" * (len(LADDER) + 1) + "|\n")
    got = {r["resolution"]: r for r in rows if r["model"] == "direct"}
    for k, accs in EYESIGHT.items():
        cells = []
        for R, a in zip(LADDER, accs):
            now = got.get(R, {}).get(f"acc_{k}")
            cells.append(f"{100 * a:.0f} -> {'-' if now is None else f'{now:.0f}'} "
                         f"({'direct' if a >= EYESIGHT_BAR else 'zoom'})")
        s += f"| {k} | " + " | ".join(cells) + " |\n"
    return s


def plot(rows, png):
    """Accuracy, mean zooms and generated tokens against the rung, a line per model (Pillow only)."""
    names = [m for m in MODELS if any(r["model"] == m for r in rows)]
    ticks = [(i, str(R)) for i, R in enumerate(LADDER)]
    panels = [("accuracy, % (balanced test items)", "accuracy", (0, 100)),
              ("mean zooms per question", "mean_zooms", (0, 2)),
              ("generated tokens per question", "gen_tokens",
               (0, 50 * math.ceil(max([r["gen_tokens"] for r in rows] + [1]) / 50)))]
    W, H = 560, 300
    img = Image.new("RGB", (W * len(panels), H), "white")
    d = ImageDraw.Draw(img)
    for n, (title, key, y_range) in enumerate(panels):
        series = [(m, report.PALETTE[j % len(report.PALETTE)],
                   [(i, r[key]) for i, R in enumerate(LADDER) for r in rows if r["model"] == m and r["resolution"] == R])
                  for j, m in enumerate(names)]
        report.draw_panel(d, (n * W + 50, 45, n * W + W - 20, H - 30), title + " vs long side, px", series,
                          y_range, (0, len(LADDER) - 1), ticks)
    img.save(png)
    return png


def run(cfg):
    """The stages in dependency order. The default run (when missing) trains alone, two processes under torchrun, as
    the main job does. With `parallel`, stages that do not need each other then run side by side: the two SFT
    fine-tunes, then GRPO beside the evaluation of the other three models, each job with `threads` threads (1: two
    1-thread jobs keep 2 cores busier than one 2-thread job on a model this small). Thread counts never depend on
    `parallel`, so it changes the wall time, not a number."""
    t0 = time.time()
    torch.set_num_threads(cfg.threads)
    os.makedirs(cfg.out, exist_ok=True)
    running = []

    def start(job):
        running.append(job)
        if not cfg.parallel:
            job.wait()
        return job

    try:
        data, data_always = build_data(cfg, False), build_data(cfg, True)
        running.append(default_run(cfg))      # alone, on both cores
        base = running[-1].wait()
        sft_cof = start(train_sft(cfg, base, data, "sft-cof"))
        sft_always = start(train_sft(cfg, base, data_always, "sft-always"))
        ckpts = {"cof-sft": sft_cof.wait([sft_always])}
        grpo_job = start(train_grpo(cfg, ckpts["cof-sft"], data))
        ckpts["always-zoom"] = sft_always.wait([grpo_job])
        ckpts["direct"] = ckpts["cof-sft"]
        items = E.read_synthetic(os.path.join(data, "test_by_kind.jsonl"))
        records = {name: evaluate(cfg, name, ckpts[name], items) for name in ("direct", "always-zoom", "cof-sft")}
        ckpts["cof-grpo"] = grpo_job.wait()
        records["cof-grpo"] = evaluate(cfg, "cof-grpo", ckpts["cof-grpo"], items)
    finally:
        for job in running:
            job.stop()
    return write_results(cfg, {name: records[name] for name in MODELS}, ckpts, time.time() - t0)


def write_results(cfg, records, ckpts, seconds):
    """results.json, results.md (the table, the eyesight rule against this run's direct model, the legibility
    table) and results.png under OUT; returns the table's rows."""
    rows = result_rows(records)
    legible = build.legibility_table(LADDER, VIEW_MAX_PIXELS, n=3, acuity=ACUITY, min_box=MIN_BOX,
                                     periods=build.BuildConfig(periods=PERIODS).parsed_periods())
    legible = [r for r in legible if synth.question_kind(r["category"], r["difficulty"]) in KINDS]
    minutes = seconds / 60
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump({"config": dataclasses.asdict(cfg), "ladder": LADDER, "acuity": ACUITY, "periods": PERIODS,
                   "view_max_pixels": VIEW_MAX_PIXELS, "eyesight": EYESIGHT, "eyesight_bar": EYESIGHT_BAR,
                   "checkpoints": ckpts, "rows": rows, "legibility": legible, "minutes_this_run": round(minutes, 1)},
                  f, indent=1)
    table = markdown(rows)
    with open(os.path.join(cfg.out, "results.md"), "w") as f:
        f.write(table + "\n" + eyesight_markdown(rows)
                + f"\nLegibility in this setting (acuity {ACUITY:g} px; stripe period in px / contrast left / share "
                f"read right by the agent's reader, 3 items per row):\n\n" + build.table_markdown(legible))
    print(table)
    log(f"wrote {cfg.out}/results.md, results.json and {plot(rows, os.path.join(cfg.out, 'results.png'))} "
        f"({minutes:.1f} min)")
    return rows


def main(argv=None):
    cfg = checks.parse_config(SweepConfig, argv, None, __doc__.split("\n\n")[0])
    try:
        run(cfg)
    except (subprocess.CalledProcessError, RuntimeError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"sweep.py: error: {e}") from None


if __name__ == "__main__":
    main()
