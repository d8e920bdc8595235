"""What the runs show a person: a progress bar, a zoom trace drawn on one picture, training curves (Pillow only).

Nothing here changes a result. `Progress` / `progress` are the one-line bar of the evaluation (evaluate.py), data.build,
sft.py and grpo.py (tqdm is not a runtime dependency); `draw_trace` draws one Chain-of-Focus conversation (a
cof.Trajectory run with keep_images=True): the image the model saw with its zoom boxes, the crops it got back and the
text of every turn, as the released code's `pred_output` records it in words; `draw_panel` / `plot_metrics` draw
grpo.py's curves (and sweep.py's panels) from metrics.jsonl.

This file sits low: it imports crop_kernels.py only, so cof.py, data.build and the trainers may all use it.
"""
from __future__ import annotations

import json
import sys
import textwrap
import time

from PIL import Image, ImageDraw, ImageFont

import crop_kernels as ck

# ----------------------------------------------------------------------------------------------------------------
# Progress bar


class Progress:
    """A one-line progress bar on stderr (tqdm is not a runtime dependency): `desc done/total [####....] stats
    elapsed<eta`. It redraws in place on a terminal; without one (CI, a log file) it prints a plain line every ~2%
    of the work instead. Used by evaluate.py, data.build, sft.py and grpo.py."""

    def __init__(self, total, desc="", start=0, enabled=True):
        self.total, self.desc, self.done, self.start = total, desc, start, start
        self.enabled = enabled and total > start
        self.stream, self.clock, self.t0 = sys.stderr, time.time, time.time()
        self.tty = self.stream.isatty()
        self.every, self.last_print = max(1, (total - start) // 50), start

    def update(self, k=1, **stats):
        """Advance by k units of work; stats (e.g. loss=0.3) are shown after the bar."""
        self.done += k
        if not self.enabled:
            return
        el = self.clock() - self.t0
        frac = (self.done - self.start) / (self.total - self.start)
        eta = el / frac - el if frac > 0 else 0.0
        bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
        text = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items())
        line = f"{self.desc} {self.done}/{self.total} [{bar}] {text} {_hms(el)}<{_hms(eta)}".lstrip()
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K" + ("\n" if self.done >= self.total else ""))
            self.stream.flush()
        elif self.done - self.last_print >= self.every or self.done >= self.total:
            self.last_print = self.done
            print(line, file=self.stream, flush=True)

    def close(self):
        """End the bar's line early (before other output) on a terminal."""
        if self.enabled and self.tty and self.done < self.total:
            self.stream.write("\n")


def progress(items, desc="", total=None):
    """Iterate over items with a Progress bar."""
    bar = Progress(len(items) if total is None else total, desc)
    for x in items:
        yield x
        bar.update()


def _hms(s):
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


# ----------------------------------------------------------------------------------------------------------------
# Trace: the chain drawn on one PNG

_COLORS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230)]


def draw_trace(traj, path, panel=640, thumb=220, width_chars=110):
    """Draw a cof.Trajectory (run with keep_images=True) to a PNG: the image the model saw with every crop box (numbered,
    one colour per zoom), the crops it got back beside it, and the text of every turn below."""

    if not all(hasattr(traj, a) for a in ("images", "turns", "main_size", "original_size", "answer")):
        raise TypeError(f"traj must be a Trajectory (what cof.run returns), got {type(traj).__name__}")
    if not traj.images:
        raise ValueError("draw_trace needs the images: run the loop with CofConfig(keep_images=True)")
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:                        # Pillow without FreeType: the bitmap font
        font = ImageFont.load_default()
    main = ck.to_pil(traj.images[0])     # may be the model's (smaller) view of the main image
    H, W = traj.main_size                 # boxes are in main-image pixels
    s = panel / max(H, W)
    left = main.resize((max(1, round(W * s)), max(1, round(H * s))), Image.Resampling.BICUBIC)
    d = ImageDraw.Draw(left)
    crops, k = [], 0
    for n, t in enumerate(traj.turns):
        if not t.get("tool_call"):
            continue
        color = _COLORS[k % len(_COLORS)]
        if t.get("box") and t.get("status") in ("ok", "limit"):
            x0, y0, x1, y1 = (v * s for v in t["box"])
            d.rectangle([x0, y0, x1, y1], outline=color, width=3)
            d.text((x0, y0 - 17) if y0 >= 17 else (x0, y1 + 2), str(k + 1), fill=color, font=font)
        if t.get("status") in ("ok", "none", "error") and 1 + len(crops) < len(traj.images):
            crops.append((traj.images[1 + len(crops)], color, f"zoom {k + 1} ({t.get('status')}): crop "
                          f"{t.get('box') or 'whole image'} -> {t.get('crop_size')}"))
        k += 1
    lines = []
    for n, t in enumerate(traj.turns):
        head = f"turn {n + 1} ({t['n_tokens']} tokens)" + (f", zoom {t.get('status')}" if t.get("tool_call") else "")
        lines.append(head + ":")
        for para in t["text"].splitlines() or [""]:
            lines += textwrap.wrap(para, width_chars) or [""]
    lines.append(f"answer: {traj.answer!r}   zooms: {traj.n_zooms}   generated tokens: {traj.n_generated}")
    lines = lines[:80]
    line_h = 18
    col_w = thumb + 20
    cap_w = max([font.getlength(c[2]) for c in crops] or [0]) if hasattr(font, "getlength") else 8 * 60
    width = int(max(left.width + col_w + 30, left.width + 40 + cap_w, 8 * width_chars))
    crops_h = sum(min(thumb, round(thumb * c[0].shape[1] / max(c[0].shape[1:]))) + 30 for c in crops)
    top = max(left.height, crops_h) + 40
    canvas = Image.new("RGB", (width, top + line_h * len(lines) + 20), "white")
    dc = ImageDraw.Draw(canvas)
    dc.text((10, 8), f"image seen by the model: {traj.main_size[1]}x{traj.main_size[0]} (original "
            f"{traj.original_size[1]}x{traj.original_size[0]})", fill="black", font=font)
    canvas.paste(left, (10, 30))
    y = 30
    for img, color, caption in crops:
        im = ck.to_pil(img)
        sc = thumb / max(im.size)
        im = im.resize((max(1, round(im.width * sc)), max(1, round(im.height * sc))), Image.Resampling.BICUBIC)
        x = left.width + 30
        dc.text((x, y), caption, fill=color, font=font)
        canvas.paste(im, (x, y + 20))
        dc.rectangle([x - 2, y + 18, x + im.width + 1, y + 21 + im.height], outline=color, width=3)
        y += im.height + 30
    for i, line in enumerate(lines):
        dc.text((10, top + i * line_h), line, fill="black", font=font)
    canvas.save(path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Curves: line charts of metrics.jsonl (grpo.py) and of the resolution sweep (sweep.py)

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 140, 140)]


def draw_panel(d, box, title, series, y_range, x_range, x_ticks):
    """One line chart on the ImageDraw `d` inside `box` (x0, y0, x1, y1) with room above for the title and legend:
    series = [(label, colour, [(x, y), ...])]; y clipped to y_range; x_ticks = [(x, text)] under the axis."""
    black, font = (0, 0, 0), ImageFont.load_default()
    (lo, hi), (x0, x1) = y_range, x_range
    d.rectangle(box, outline=black)
    d.text((box[0], box[1] - 37), title, fill=black, font=font)
    for frac in (0, 0.5, 1):
        d.text((box[0] - 45, box[3] - frac * (box[3] - box[1]) - 6), f"{lo + frac * (hi - lo):g}", fill=black,
               font=font)
    for x, text in x_ticks:
        d.text((box[0] + (x - x0) / (x1 - x0) * (box[2] - box[0]) - 10, box[3] + 5), text, fill=black, font=font)
    for j, (label, colour, pts) in enumerate(series):
        d.text((box[0] + 70 * j, box[1] - 21), label, fill=colour, font=font)              # legend under the title
        xy = [(box[0] + (x - x0) / (x1 - x0) * (box[2] - box[0]),
               box[3] - (min(max(v, lo), hi) - lo) / (hi - lo) * (box[3] - box[1])) for x, v in pts if v == v]
        if len(xy) > 1:
            d.line(xy, fill=colour, width=2)
        for x, y in xy if len(xy) < 12 else []:
            d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)


def plot_metrics(path, png, smooth=10):
    """Training curves from metrics.jsonl as a PNG (Pillow only): reward, and the rollouts' zoom rate and accuracy per
    question kind (each a mean over the last `smooth` steps: a step holds only a few prompts of a kind), against the
    step; and the held-out accuracy per kind at each evaluation."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    train_rows = [r for r in rows if "reward" in r]
    eval_rows = [r for r in rows if "eval/accuracy" in r]
    kinds = sorted({k.split("/")[0] for r in train_rows for k in r if k.endswith("/zoom_rate")})
    black = (0, 0, 0)
    panels = [(f"reward (mean of {smooth} steps)", train_rows, [("reward", "reward", black)], (0, 1)),
              (f"zoom rate of the rollouts, % (mean of {smooth} steps)", train_rows,
               [(f"{k}/zoom_rate", k, None) for k in kinds], (0, 100)),
              (f"accuracy of the rollouts, % (mean of {smooth} steps)", train_rows,
               [(f"{k}/accuracy", k, None) for k in kinds], (0, 100)),
              ("held-out accuracy, % (greedy CoF loop)", eval_rows,
               [(f"eval/{k}/accuracy", k, None) for k in kinds] + [("eval/accuracy", "all", black)], (0, 100))]
    W, H, pad = 560, 300, 50
    img = Image.new("RGB", (2 * W, 2 * H), "white")
    d = ImageDraw.Draw(img)
    x1 = max([r["step"] for r in rows] + [1])
    for n, (title, source, keys, y_range) in enumerate(panels):
        ox, oy = (n % 2) * W, (n // 2) * H
        series = []
        for j, (key, label, colour) in enumerate(keys):
            pts = [(r["step"], r[key]) for r in source if key in r and r[key] == r[key]]
            if source is train_rows:                                                      # trailing mean
                win = [[v for _, v in pts[max(0, i - smooth + 1):i + 1]] for i in range(len(pts))]
                pts = [(st, sum(w) / len(w)) for (st, _), w in zip(pts, win)]
            series.append((label, colour or PALETTE[j % len(PALETTE)], pts))
        draw_panel(d, (ox + pad, oy + 45, ox + W - 20, oy + H - 30), title, series, y_range, (0, x1),
                   [(0, "step 0"), (x1 - 40 * x1 / (W - pad - 20), f"step {x1}")])
    img.save(png)
    return png
