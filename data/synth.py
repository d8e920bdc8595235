"""Toy V*: procedurally generated visual-search scenes whose asked-about detail needs a zoom at low resolution.

V* Bench (penghao-wu/vstar) asks multiple-choice questions about small objects in large images, in two categories,
`direct_attributes` and `relative_position`. This module makes a synthetic stand-in that a tiny Qwen2.5-VL can learn
on a CPU, deterministic from a seed, with the same question text style ("(A) ..." lines, options shuffled or in one
fixed order, "Answer with the option's letter from the given choices directly.").

The scene (grid-aligned on purpose, so that a box is "which cell" and costs a few tokens):
  * 448 x 448 px, a 4 x 4 grid of 112 px cells, at most one object per cell (8..16 objects), each a square or a
    circle with a flat fill colour, big (96 px) or small (the cell's middle 56 px), on a background of the image
    processor's mean colour. The target is the only object of its colour (3 colours by default: red, green,
    blue); the others are distractors of the same kinds in the other colours.
  * Every texture is light/dark stripes around the object's own fill colour (fill +- 50), so it averages back to
    the flat fill colour once the image is shrunk: at a low working resolution each object is a flat coloured blob
    (easy to find) whose texture is gone (impossible to read).
  * Questions (the answer is always a property of a texture):
      direct_attributes  "What is the direction of the stripes on the red circle?"  horizontal / vertical /
                         rising (a diagonal like /) / falling (like \\)
      relative_position  "Where is the horizontally striped patch relative to the vertically striped patch on the
                         red circle?"  left / right / above / below (two striped patches on a plain object)
  * Difficulty (the stripe period is in px of the 448 scene; "view" = the tiny model's 112 x 112 view):
      easy    big object, period 24                -> readable in the view without zooming (6 px there)
      medium  small object, period 4               -> exactly 1 px in the view: every view pixel averages one
                                                      whole period, so the texture is GONE (contrast 0.000), not
                                                      just faint; one zoom on the object shows it at 5.3 px
      hard    big object with a 28 px bordered tag, -> a zoom on the object shows the tag but not its stripes
              period 2.5 on the tag (attributes)      (1.6 px); a second zoom on the tag reads them (6.7 px)
  * Question kinds (QUESTION_KINDS, what metrics are broken down by): easy / medium / hard stripe directions, and
    the two relative-position kinds: "relative" (two 22 px patches of period 4 on a small object: gone in the view)
    and "edge" (two 36 px patches of period 8 on a big object: 2 px stripes in 9 px patches, which the FFT reader
    reads in the view and the tiny model does not: the edge of its eyesight; one zoom shows them at 5.2 px, the
    scale at which it reads the relative kind's patches).
  `periods` (make_scene) replaces these periods and nothing else: the same draws give the same scene with other
  stripe widths (the resolution sweep's setting, sweep.py, uses 20 / 7.5 / 5 px).
Legibility is measured, not assumed: `read_pattern` reads a texture from pixels (2-D FFT peak) and reports its
contrast relative to the rendered scene; data/build.py's `legibility_table` runs it through the real resizes
(LANCZOS to the evaluation resolution, cof.py's crop rule, the model processor's BICUBIC smart-resize).

Coordinates: boxes are (x0, y0, x1, y1) in pixels, x1/y1 exclusive, in the 448 scene unless said otherwise.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

import cof

SCENE = 448                 # scene side, px
GRID = 4                    # cells per side
CELL = SCENE // GRID        # 112 px; at a 112 px working view one cell = one merged 28 px Qwen token
OBJ_MARGIN = 8              # a big object's box inside its cell: [8, 104)
SMALL_MARGIN = 28           # a small object's box: [28, 84), the cell's middle 2 x 2 of 28 px sub-cells
AMPLITUDE = 50              # stripes are fill +- AMPLITUDE on every channel
SUPERSAMPLE = 4             # stripes are rendered antialiased (periods need not be whole pixels)
CATEGORIES = ("direct_attributes", "relative_position")
DIFFICULTIES = ("easy", "medium", "hard")
PERIOD = {"easy": 24.0, "edge": 8.0, "medium": 4.0, "hard": 2.5}   # "edge": the two patches of the edge kind

# The background is the image processor's normalisation mean (OPENAI_CLIP_MEAN x 255, rounded), so empty space
# enters the vision tower as (almost exactly) zero and every token's features come from the objects in its cell.
# Each cell's background is tinted (red channel by column, blue by row: +-16 or +-48 levels around the mean), a
# faint map grid: text far from the image cannot tell where an image token is from M-RoPE alone (the question's
# length varies), so the position has to be in the pixels.
BACKGROUND = (123, 117, 104)
CELL_TINT = 32
# Fill colours: every channel in [50, 205] so that fill +- AMPLITUDE stays inside [0, 255] (mean preserved).
PALETTE = {
    "red": (200, 55, 55), "green": (55, 160, 70), "blue": (60, 90, 200), "yellow": (205, 185, 55),
    "purple": (140, 65, 185), "orange": (205, 120, 50), "cyan": (55, 175, 185), "pink": (205, 105, 165),
    "brown": (130, 85, 55),
}
# Colours a scene draws from by default: few enough that a tiny model from scratch binds each colour word to an image
# colour within the CPU budget; pass `colours=tuple(PALETTE)` for the full palette.
DEFAULT_COLOURS = ("red", "green", "blue")
SHAPES = ("square", "circle")
TAG_SIZE, TAG_BORDER = 28, 2
TAG_BORDER_RGB, TAG_LIGHT, TAG_DARK = (25, 25, 25), 215, 45
# Orientation names (image coordinates, y down). "rising" = '/', constant along x + y; "falling" = '\', along x - y.
ORIENTATIONS = ("horizontal", "vertical", "rising", "falling")
RELATIONS = ("left", "right", "above", "below")
ROW_WORDS = ("top row", "second row", "third row", "bottom row")
COL_WORDS = ("first column", "second column", "third column", "fourth column")


# ----------------------------------------------------------------------------------------------------------------
# Scene description


@dataclass
class Texture:
    """Stripes inside `box` (scene px): orientation, period (px along the x / y axis), colours around `mean`."""
    box: tuple
    orientation: str
    period: float
    mean: tuple             # the colour the texture averages to
    amplitude: float        # +- per channel
    read_box: tuple | None = None   # where it is read (inside the object's shape); default: box

    def __post_init__(self):
        if self.read_box is None:
            self.read_box = self.box

    def to_dict(self):
        return {"box": list(self.box), "orientation": self.orientation, "period": self.period,
                "mean": list(self.mean), "amplitude": self.amplitude, "read_box": list(self.read_box)}


@dataclass
class Obj:
    cell: tuple             # (row, col)
    shape: str
    colour: str
    box: tuple              # the object's box in the scene
    textures: list = field(default_factory=list)
    tag: tuple | None = None    # box of a bordered tag (its stripes are one of `textures`)

    def to_dict(self):
        return {"cell": list(self.cell), "shape": self.shape, "colour": self.colour, "box": list(self.box),
                "textures": [t.to_dict() for t in self.textures], "tag": list(self.tag) if self.tag else None}


@dataclass
class Scene:
    """One toy-V* item: the objects, the question, its options and answer, and the boxes an agent needs.

    target_box: the box the question is about (the object, or the tag for hard attribute items) - V*'s `bbox`.
    object_box: the target object's box. detail_box: the smallest box that holds every texture the answer needs.
    details: the textures the answer is read from (1 for attributes, 2 marks for relative position).
    """
    uid: str
    category: str
    difficulty: str
    objects: list
    target: int
    question: str           # question + "(A) ..." lines, without the answer hint
    options: list           # option texts in display order
    label: str              # correct letter
    answer: str             # correct option text
    target_box: tuple
    object_box: tuple
    detail_box: tuple
    details: list

    @property
    def text(self):
        """The V* test_questions.jsonl `text`: question, options, answer hint."""
        return self.question + cof.LETTER_HINT

    @property
    def target_obj(self):
        return self.objects[self.target]

    @property
    def name(self):
        o = self.target_obj
        return f"{o.colour} {o.shape}"

    def to_dict(self):
        return {"uid": self.uid, "category": self.category, "difficulty": self.difficulty,
                "objects": [o.to_dict() for o in self.objects], "target": self.target, "question": self.question,
                "options": list(self.options), "label": self.label, "answer": self.answer,
                "target_box": list(self.target_box), "object_box": list(self.object_box),
                "detail_box": list(self.detail_box), "details": [t.to_dict() for t in self.details]}


# ----------------------------------------------------------------------------------------------------------------
# Generation


def _cell_box(r, c):
    return (c * CELL, r * CELL, (c + 1) * CELL, (r + 1) * CELL)


def _obj_box(r, c, size="big"):
    """A big object fills its cell but a margin ([8, 104) of the 112 px cell); a small one is the cell's middle
    56 px ([28, 84), on the 28 px sub-grid, so that a zoom box on it is exact and few distinct numbers)."""
    x0, y0, _, _ = _cell_box(r, c)
    m = OBJ_MARGIN if size == "big" else SMALL_MARGIN
    return (x0 + m, y0 + m, x0 + CELL - m, y0 + CELL - m)


def _centre_box(box, side):
    cx, cy = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
    return (cx - side // 2, cy - side // 2, cx - side // 2 + side, cy - side // 2 + side)


def _union(*boxes):
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def _tag_box(r, c):
    """A 28 px tag in the middle of the cell (inside any shape). Always in the middle, so that the second zoom of a
    hard item is a known place inside the first one (a tiny model need not learn where in the object the tag is)."""
    x0, y0, _, _ = _cell_box(r, c)
    m = (CELL - TAG_SIZE) // 2
    return (x0 + m, y0 + m, x0 + m + TAG_SIZE, y0 + m + TAG_SIZE)


def _tag_texture(tag, orientation, period):
    b = TAG_BORDER
    mid = (TAG_LIGHT + TAG_DARK) / 2
    return Texture((tag[0] + b, tag[1] + b, tag[2] - b, tag[3] - b), orientation, period, (mid, mid, mid),
                   (TAG_LIGHT - TAG_DARK) / 2)


def _mark_boxes(obj_box, axis, size):
    """Two square striped patches side by side (axis 'x') or stacked (axis 'y'), centred in the object:
    36 px with a 12 px gap on a big object, 22 px with a 4 px gap on a small one (inside a circle too)."""
    cx, cy = (obj_box[0] + obj_box[2]) // 2, (obj_box[1] + obj_box[3]) // 2
    s, gap = (36, 6) if size == "big" else (22, 2)
    if axis == "x":
        return ((cx - gap - s, cy - s // 2, cx - gap, cy + s // 2), (cx + gap, cy - s // 2, cx + gap + s, cy + s // 2))
    return ((cx - s // 2, cy - gap - s, cx + s // 2, cy - gap), (cx - s // 2, cy + gap, cx + s // 2, cy + gap + s))


def _make_obj(rng, r, c, colour, kind, size, period, orientation=None, axis=None, h_first=None):
    """An object of one of the three kinds: 'stripes' (striped all over), 'tag' (plain, a bordered striped tag;
    big only; `period` is the tag's) or 'marks' (plain, two striped patches: one horizontal, one vertical)."""
    box = _obj_box(r, c, size)
    shape = SHAPES[rng.integers(len(SHAPES))]
    fill = PALETTE[colour]
    if kind == "stripes":
        read = _centre_box(box, 48 if size == "big" else 36)
        return Obj((r, c), shape, colour, box, [Texture(box, orientation, period, fill, AMPLITUDE, read)])
    if kind == "tag":
        tag = _tag_box(r, c)
        return Obj((r, c), shape, colour, box, [_tag_texture(tag, orientation, period)], tag=tag)
    a, b = _mark_boxes(box, axis, size)
    first, second = ("horizontal", "vertical") if h_first else ("vertical", "horizontal")
    return Obj((r, c), shape, colour, box, [Texture(a, first, period, fill, AMPLITUDE),
                                            Texture(b, second, period, fill, AMPLITUDE)])


def _distractor(rng, r, c, colour, periods):
    kind = ("stripes", "stripes", "tag", "marks")[rng.integers(4)]
    size = "big" if kind == "tag" or rng.random() < 0.5 else "small"
    period = periods["easy"] if size == "big" and rng.random() < 0.5 else periods["medium"]
    period = periods["hard"] if kind == "tag" else period
    return _make_obj(rng, r, c, colour, kind, size, period, ORIENTATIONS[rng.integers(4)],
                     "x" if rng.random() < 0.5 else "y", bool(rng.random() < 0.5))


# What the target is, per (category, difficulty): kind and size (its stripe period is periods[difficulty], the edge
# kind's periods["edge"]).
TARGETS = {("direct_attributes", "easy"): ("stripes", "big"),
           ("direct_attributes", "medium"): ("stripes", "small"),
           ("direct_attributes", "hard"): ("tag", "big"),
           ("relative_position", "easy"): ("marks", "big"),
           ("relative_position", "medium"): ("marks", "small")}


def snap(box, g=TAG_SIZE):
    """A box grown outward to the 28 px sub-grid (the agent's zoom boxes: locate's box is snap(object_box))."""
    return (box[0] // g * g, box[1] // g * g, -(-box[2] // g) * g, -(-box[3] // g) * g)


def check_colours(colours, what="colours"):
    """`colours` as a tuple, or ValueError unless it holds at least 2 distinct PALETTE names (the target's colour is
    unique in the scene, so there must be another one for the distractors)."""
    if any(c not in PALETTE for c in colours) or len(set(colours)) < 2:
        raise ValueError(f"{what} {list(colours)}: need at least 2 distinct names from {list(PALETTE)}")
    return tuple(colours)


def check_periods(periods):
    """PERIOD with the entries of `periods` (a dict difficulty -> stripe period in px of the 448 scene) replaced, or
    ValueError for an unknown difficulty or a period that cannot be drawn (under 2 px: finer than a pixel pair)."""
    out = dict(PERIOD)
    for k, v in (periods or {}).items():
        if k not in PERIOD or not (isinstance(v, (int, float)) and 2 <= v <= 64):
            raise ValueError(f"stripe periods {periods}: each key one of {list(PERIOD)}, each period in [2, 64] px")
        out[k] = float(v)
    return out


def make_scene(rng, uid="0", category=None, difficulty=None, mix=None, colours=DEFAULT_COLOURS, periods=None,
               shuffle_options=True):
    """One random item. `rng`: numpy Generator. category/difficulty: fixed, or drawn (difficulty from `mix`, a dict
    difficulty -> weight; hard is attributes-only, relative_position items draw from easy/medium). `colours`: the
    PALETTE names to draw from (at least 2: the target's colour is unique in the scene). `periods`: stripe periods
    per difficulty replacing PERIOD's (the same draws, so the same scene with other stripe widths; the edge kind's
    patches use periods["edge"]). shuffle_options: V*'s options in a random order; False: in ORIENTATIONS / RELATIONS
    order, so that an option's letter is a function of the answer (the built-in run's world: the tiny model then
    spends its steps on seeing, not on looking up letters, README "The built-in run")."""
    check_colours(colours)
    periods = check_periods(periods)
    category = category or CATEGORIES[int(rng.random() < 0.35)]
    if difficulty is None:
        mix = dict(mix or DEFAULT_MIX)
        if category == "relative_position":
            mix.pop("hard", None)
        names = sorted(mix)
        w = np.array([mix[k] for k in names], dtype=float)
        difficulty = names[rng.choice(len(names), p=w / w.sum())]
    if (category, difficulty) not in TARGETS:
        raise ValueError(f"no {difficulty!r} level for {category!r}; have {sorted(TARGETS)}")

    n_obj = int(rng.integers(8, GRID * GRID + 1))
    cells = [(int(k) // GRID, int(k) % GRID) for k in rng.permutation(GRID * GRID)[:n_obj]]
    colours = list(colours)
    tcolour = colours[rng.integers(len(colours))]
    others = [c for c in colours if c != tcolour]
    objects = [_distractor(rng, r, c, others[rng.integers(len(others))], periods) for (r, c) in cells[1:]]

    r, c = cells[0]
    kind, size = TARGETS[(category, difficulty)]
    period = periods["edge" if (category, difficulty) == KIND_TARGET["edge"] else difficulty]
    ori = ORIENTATIONS[rng.integers(4)]
    axis, h_first = ("x" if rng.random() < 0.5 else "y"), bool(rng.random() < 0.5)
    target = _make_obj(rng, r, c, tcolour, kind, size, period, ori, axis, h_first)
    name = f"{tcolour} {target.shape}"
    details = target.textures
    if category == "direct_attributes":
        answer, choices = ori, list(ORIENTATIONS)
        if kind == "tag":
            q = f"What is the direction of the stripes on the small tag of the {name}?"
            target_box = detail_box = target.tag
        else:
            q = f"What is the direction of the stripes on the {name}?"
            target_box, detail_box = target.box, snap(_centre_box(target.box, 56))
    else:
        q = f"Where is the horizontally striped patch relative to the vertically striped patch on the {name}?"
        # where the horizontal patch (the first one if h_first) is, relative to the vertical one
        answer = {("x", True): "left", ("x", False): "right", ("y", True): "above", ("y", False): "below"}[
            (axis, h_first)]
        choices = list(RELATIONS)
        target_box, detail_box = target.box, snap(_union(*(t.box for t in details)))
    objects.insert(0, target)
    order = [int(i) for i in rng.permutation(len(objects))]
    objects = [objects[i] for i in order]
    tindex = order.index(0)
    opts = [choices[int(i)] for i in rng.permutation(len(choices))] if shuffle_options else choices
    letters = "ABCD"[:len(opts)]
    question = q + "".join(f"\n({L}) {o}" for L, o in zip(letters, opts))
    label = letters[opts.index(answer)]
    return Scene(uid, category, difficulty, objects, tindex, question, opts, label, answer, tuple(target_box),
                 tuple(target.box), tuple(detail_box), details)


def rotate_options(scene, k):
    """The same item with its options rotated by k places ((A) x, (B) y, ... -> (A) y, ...): a new question text and
    label, the same scene and answer."""
    k %= len(scene.options)
    opts = scene.options[k:] + scene.options[:k]
    letters = "ABCD"[:len(opts)]
    question = scene.question.split("\n")[0] + "".join(f"\n({L}) {o}" for L, o in zip(letters, opts))
    return dataclasses.replace(scene, question=question, options=opts, label=letters[opts.index(scene.answer)])


DEFAULT_MIX = {"easy": 0.3, "medium": 0.45, "hard": 0.25}
SPLIT_IDS = {"train": 0, "val": 1, "test": 2, "by_kind": 3, "rl": 4}
# What training and evaluation metrics are broken down by, and the (category, difficulty) of each kind's target.
KIND_TARGET = {"easy": ("direct_attributes", "easy"), "edge": ("relative_position", "easy"),
               "medium": ("direct_attributes", "medium"), "hard": ("direct_attributes", "hard"),
               "relative": ("relative_position", "medium")}
QUESTION_KINDS = tuple(KIND_TARGET)


def question_kind(category, difficulty):
    """The kind of a (category, difficulty): "easy" / "medium" / "hard" for the stripe-direction questions (coarse
    stripes on a big object / fine stripes on a small one / a tag), "relative" for the two patches on a small object
    and "edge" for the two patches on a big object (legible to the FFT reader in the main view, at the edge of the
    tiny model's eyesight)."""
    return next(k for k, t in KIND_TARGET.items() if t == (category, difficulty))


def scene_rng(seed, split, index):
    """The Generator for item `index` of `split`: independent of how many items are made."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), SPLIT_IDS[split], int(index)]))


def make_split(seed, split, n, mix=None, category=None, colours=DEFAULT_COLOURS, periods=None):
    """n items of a split; the same (seed, split, index) always gives the same item."""
    return [make_scene(scene_rng(seed, split, i), uid=f"{split}-{seed}-{i:06d}", category=category, mix=mix,
                       colours=colours, periods=periods) for i in range(n)]


# ----------------------------------------------------------------------------------------------------------------
# Rendering


def _stripe_fraction(box, orientation, period):
    """Fraction of each pixel of `box` covered by the light half of the stripes, from SUPERSAMPLE^2 samples per
    pixel. The pattern depends on one coordinate u (y, x, x + y or x - y), so it is computed once per value of u's
    integer part and broadcast: [h, w] float."""
    x0, y0, x1, y1 = box
    h, w = y1 - y0, x1 - x0
    off = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    i, j = np.arange(h)[:, None], np.arange(w)[None, :]

    def frac(base, two_d):          # base: [n] integer part of u; two_d: u sums two sample offsets
        sub = (off[:, None] + (off[None, :] if orientation == "rising" else -off[None, :])).ravel() \
            if two_d else off
        return (np.mod(base[:, None] + sub[None, :], period) < period / 2).mean(axis=1)

    if orientation == "horizontal":
        return np.broadcast_to(frac(y0 + np.arange(h, dtype=float), False)[:, None], (h, w))
    if orientation == "vertical":
        return np.broadcast_to(frac(x0 + np.arange(w, dtype=float), False)[None, :], (h, w))
    if orientation == "rising":     # u = x + y
        return frac(x0 + y0 + np.arange(h + w - 1, dtype=float), True)[i + j]
    k = np.arange(h + w - 1) - (h - 1)       # u = x - y, index j - i + (h - 1)
    return frac(x0 - y0 + k.astype(float), True)[j - i + (h - 1)]


def _shape_mask(obj):
    x0, y0, x1, y1 = obj.box
    if obj.shape == "square":
        return np.ones((y1 - y0, x1 - x0), bool)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    cx, cy, rad = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    return (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= rad ** 2


def background_tint(r, c):
    """The offset of cell (r, c)'s background from BACKGROUND: a faint map grid that tells where a cell is."""
    return np.array([CELL_TINT * (2 * c - GRID + 1) / 2, 0.0, CELL_TINT * (2 * r - GRID + 1) / 2], np.float32)


def render(scene):
    """The scene as a PIL RGB image, SCENE x SCENE."""
    img = np.empty((SCENE, SCENE, 3), np.float32)
    img[:] = BACKGROUND
    for r in range(GRID):
        for c in range(GRID):
            img[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] += background_tint(r, c)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        layer = np.empty((y1 - y0, x1 - x0, 3), np.float32)         # the object, then its shape mask
        layer[:] = PALETTE[obj.colour]
        boxes = ([obj.tag] if obj.tag is not None else []) + [t.box for t in obj.textures]
        fills = ([TAG_BORDER_RGB] if obj.tag is not None else []) + obj.textures
        for (bx0, by0, bx1, by1), what in zip(boxes, fills):
            sl = layer[by0 - y0:by1 - y0, bx0 - x0:bx1 - x0]
            if isinstance(what, Texture):
                f = _stripe_fraction(what.box, what.orientation, what.period)[..., None]     # [h, w, 1]
                sl[:] = np.asarray(what.mean, np.float32) + what.amplitude * (2 * f - 1)
            else:
                sl[:] = what
        mask = _shape_mask(obj)
        img[y0:y1, x0:x1][mask] = layer[mask]
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------------------------------------------
# Reading a texture from pixels (the legibility measurement)

LEGIBLE_CONTRAST = 0.4      # a texture counts as legible when its orientation is read right AND it keeps >= 40%
#                             of its rendered RMS contrast (the measured contrasts cluster near 0 or well above 0.5)


def _luma(img):
    return np.asarray(img, np.float32).mean(axis=2)


def read_pattern(img, box):
    """Read a stripe texture inside `box` (px of `img`, floats allowed) of a PIL image.

    Returns (orientation, rms): the orientation of the strongest 2-D Fourier peak (phase-free, so it does not matter
    where the stripes start) and the RMS of the luminance about its mean. The box is shrunk by one pixel on each
    side, so the object's own edge never counts. Orientation None when the region is under 3 x 3 px."""
    x0, y0, x1, y1 = math.ceil(box[0]) + 1, math.ceil(box[1]) + 1, math.floor(box[2]) - 1, math.floor(box[3]) - 1
    if x1 - x0 < 3 or y1 - y0 < 3:
        return None, 0.0
    L = _luma(img)[y0:y1, x0:x1]
    L = L - L.mean()
    rms = float(np.sqrt((L ** 2).mean()))
    h, w = L.shape
    n = 64 if max(h, w) <= 64 else 1 << (max(h, w) - 1).bit_length()
    P = np.abs(np.fft.fft2(L * np.outer(np.hanning(h + 2)[1:-1], np.hanning(w + 2)[1:-1]), s=(n, n))) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(n), np.fft.fftfreq(n), indexing="ij")
    P[np.hypot(fy * h, fx * w) < 1.5] = 0          # at least 1.5 cycles across the region: not a gradient
    k = np.unravel_index(np.argmax(P), P.shape)
    theta = math.atan2(fy[k], fx[k]) % math.pi     # direction in which the intensity varies
    cls = int(round(theta / (math.pi / 4))) % 4
    # intensity varying along x -> vertical stripes; along (1, 1) -> constant on x + y -> rising ('/')
    return ("vertical", "rising", "horizontal", "falling")[cls], rms


def texture_rms(texture):
    """RMS luminance contrast of a texture as rendered in the 448 scene (its reading reference)."""
    b = texture.read_box
    f = _stripe_fraction(b, texture.orientation, texture.period)[1:-1, 1:-1]
    v = texture.amplitude * (2 * np.clip(np.rint(f * 255) / 255, 0, 1) - 1)
    return float(np.sqrt(((v - v.mean()) ** 2).mean()))


def read_texture(img, texture, to_view):
    """(orientation read, relative contrast, legible) of `texture` in `img`; `to_view` maps a scene box into
    `img`'s pixel frame."""
    ori, rms = read_pattern(img, to_view(texture.read_box))
    contrast = rms / max(texture_rms(texture), 1e-6)
    return ori, contrast, (ori == texture.orientation and contrast >= LEGIBLE_CONTRAST)


def answer_from_reading(scene, readings):
    """The option text implied by what was read (None where something was not legible)."""
    if any(r is None for r in readings):
        return None
    if scene.category == "direct_attributes":
        return readings[0]
    a, b = scene.details
    if set(readings) != {"horizontal", "vertical"}:
        return None
    h, v = (a, b) if readings[0] == "horizontal" else (b, a)
    hx, hy = (h.box[0] + h.box[2]) / 2, (h.box[1] + h.box[3]) / 2
    vx, vy = (v.box[0] + v.box[2]) / 2, (v.box[1] + v.box[3]) / 2
    if abs(hx - vx) >= abs(hy - vy):
        return "left" if hx < vx else "right"
    return "above" if hy < vy else "below"


def where(scene):
    """'second row, third column' for the target object."""
    r, c = scene.target_obj.cell
    return f"{ROW_WORDS[r]}, {COL_WORDS[c]}"


def scale_box(box, sx, sy=None):
    sy = sx if sy is None else sy
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
