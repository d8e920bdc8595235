"""The MM-CoF visual search agent: a thought/action loop that finds where to look, then summarizes the search into
a Chain-of-Focus training trajectory.

The paper (arXiv 2505.15436, project page, `assets/visual_agent.jpg`) builds its SFT data with a ReAct-style agent
(locate -> VLM look -> adjust box -> verify, then "summarize the visual search steps"); that agent was never
released. This is our version. Tools are plain callables on a `World` (one image + one question at one resolution):

    locate(world)            -> box          where the asked-about object is (absolute px of the resized image)
    look(world, view)        -> Look         answer from what the model would see (the main view or a zoom view)
    adjust_box(world, box)   -> box | None   a tighter box on the detail (None: nothing better to try)
    verify(world, look)      -> bool         is the answer right (and does the crop hold the whole target)

Two backends: `OracleTools` (scene annotations of data/synth.py; `look` READS the pixels with synth.read_pattern,
so "not legible" is measured) and `ModelTools` (our model.py Qwen2.5-VL, prompted for boxes / answers / yes-no;
for real images with V*-style annotations and a large checkpoint).

What the model sees, exactly as the CoF loop feeds it (cof.py owns the rules; nothing is copied here):
  main image  = the image LANCZOS-resized to cof.main_size (min 112^2, max 3840^2 px): the frame of every box;
  zoom image  = cof.parse_zoom(tool-call text) (x1.5 about the centre, clipped, int), cropped from the main image,
                LANCZOS-resized to cof.zoom_size (x2, smart-resized);
  model view  = either of them smart-resized by the model's image processor (crop_kernels.smart_resize with the
                processor's min/max pixels, BICUBIC). With the released 7B (max 12,845,056 px) the view is the image
                itself; the tiny preset caps it at 112 x 112, which is what makes zooming necessary there.

The summary keeps the first box and the final one (as the paper's figure does) and writes the released message
format: system prompt, `<image> Question: ...` user turn, assistant turns `<think>...</think>` + `<tool_call>`
JSON with `bbox_2d`, each crop as a new user turn `<image>` + USER_PROMPT, and a final `<answer>`.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

import checks
import cof
import crop_kernels
import decode
import evaluate as E
import tokenizer as T
from data import synth

TOOL_NAME = "image_zoom_in_tool"
TINY_VIEW_MAX_PIXELS = 112 * 112            # the tiny preset's processor cap: a 448 scene is seen as 112 x 112
QWEN_VIEW_MAX_PIXELS = crop_kernels.PROCESSOR_MAX_PIXELS
VIEW_MIN_PIXELS = crop_kernels.PROCESSOR_MIN_PIXELS   # 56 * 56


# ----------------------------------------------------------------------------------------------------------------
# The world: one image at one resolution, as the CoF loop and the model see it


@dataclass
class View:
    """An image the model sees. crop_box: integer box in the main-image frame (None for the main view).
    scale: (sx, sy) from main-image px to view px; origin: crop_box's top-left (0, 0 for the main view)."""
    image: Image.Image          # after the processor resize: exactly the model's pixels
    sent: Image.Image           # what the CoF loop sends (the main image or the zoom image), stored in datasets
    crop_box: tuple | None
    scale: tuple
    origin: tuple

    def from_main(self, box):
        """A box in main-image px -> view px."""
        (sx, sy), (ox, oy) = self.scale, self.origin
        return ((box[0] - ox) * sx, (box[1] - oy) * sy, (box[2] - ox) * sx, (box[3] - oy) * sy)

    def to_main(self, box):
        """A box in view px -> main-image px."""
        (sx, sy), (ox, oy) = self.scale, self.origin
        return (box[0] / sx + ox, box[1] / sy + oy, box[2] / sx + ox, box[3] / sy + oy)


class World:
    """One question about one image at one working resolution.

    image: PIL RGB source; resolution: long side to resize to first (None: keep); view_max_pixels / view_min_pixels:
    the model processor's limits. scene: a synth.Scene when the image is a toy-V* scene (oracle tools need it).
    target_box: the asked-about box in SOURCE px (V* `bbox`), target_name: what to locate (V* `target_object`).
    acuity: the finest stripe period, in px of a model view, that the model is taken to read (0: whatever survives
    in the pixels, the ideal reader). A view can hold a texture that a small-patch model does not make out until it
    is magnified: that, not lost pixels, is why zooming helps Qwen2.5-VL-7B on an image it sees at full size.
    restate_options: the trajectory's last thought restates the options before the letter (_conclusion).
    min_box: the smallest side, in main-image px, of a box the oracle zooms on (0: the object's own box): a small
    box is grown about its centre, inside the image. The crop rule blows a small crop up to at least 112 x 112 px;
    a box of at least 38 px keeps every zoom at twice the main image's scale.
    """

    def __init__(self, image, question, label=None, options=None, resolution=None, view_max_pixels=TINY_VIEW_MAX_PIXELS,
                 view_min_pixels=VIEW_MIN_PIXELS, scene=None, target_box=None, target_name=None, acuity=0.0,
                 restate_options=True, min_box=0):
        self.question, self.label, self.scene, self.acuity, self.min_box = question, label, scene, acuity, min_box
        self.restate_options = restate_options
        self.options = options if options is not None else E.parse_options(question)
        self.view_max_pixels, self.view_min_pixels = view_max_pixels, view_min_pixels
        src_w, src_h = image.size
        img = image.convert("RGB")
        if resolution:          # the evaluation-resolution sweep's resize (evaluate.py's, on the uint8 tensor)
            img = crop_kernels.to_pil(E.resize_long_side(crop_kernels.from_pil(img), resolution))
        h, w = cof.main_size(img.height, img.width)
        self.main = img if (w, h) == img.size else img.resize((w, h), Image.Resampling.LANCZOS)
        self.resolution = resolution or max(src_w, src_h)
        self.src_scale = (w / src_w, h / src_h)             # source px -> main px
        self.target_box = self.from_source(target_box) if target_box is not None else None
        self.target_name = target_name or (scene.name if scene is not None else "object in question")

    @property
    def size(self):
        return self.main.size

    def from_source(self, box):
        sx, sy = self.src_scale
        return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)

    def grown(self, box):
        """`box` (main-image px) grown about its centre to at least min_box px a side, shifted inside the image."""
        out = list(box)
        for lo, size in ((0, self.size[0]), (1, self.size[1])):
            side = max(out[lo + 2] - out[lo], min(self.min_box, size))
            start = min(max(0, (out[lo] + out[lo + 2] - side) / 2), size - side)
            out[lo], out[lo + 2] = start, start + side
        return tuple(out)

    def _processor(self, img):
        h, w = crop_kernels.smart_resize(img.height, img.width, crop_kernels.FACTOR, self.view_min_pixels,
                                         self.view_max_pixels)
        return img if (w, h) == img.size else img.resize((w, h), Image.Resampling.BICUBIC)

    def main_view(self):
        v = self._processor(self.main)
        return View(v, self.main, None, (v.width / self.main.width, v.height / self.main.height), (0, 0))

    def zoom(self, tool_text):
        """The view the CoF loop produces for an assistant turn `tool_text`, or None for an invalid box."""
        W, H = self.size
        box = cof.parse_zoom(tool_text, W, H)
        if box is None:
            return None
        h, w = cof.zoom_size(box)
        sent = self.main.crop(box).resize((w, h), Image.Resampling.LANCZOS)
        v = self._processor(sent)
        return View(v, sent, box, (v.width / (box[2] - box[0]), v.height / (box[3] - box[1])), (box[0], box[1]))


def tool_call_text(box):
    """The assistant's tool call, as in the released traces."""
    return "<tool_call>\n" + json.dumps({"name": TOOL_NAME, "arguments": {"bbox_2d": [int(v) for v in box]}}) + \
        "\n</tool_call>"


def contains(outer, inner, tol=0.5):
    return (outer[0] <= inner[0] + tol and outer[1] <= inner[1] + tol and outer[2] >= inner[2] - tol
            and outer[3] >= inner[3] - tol)


# ----------------------------------------------------------------------------------------------------------------
# Tool results


@dataclass
class Look:
    """What `look` saw. answer: option text or None (not legible); letter: its option letter;
    contrast: per read texture (oracle); note: free text (model backend's raw reply)."""
    view: View
    answer: str | None
    letter: str | None
    contrast: list = field(default_factory=list)
    note: str = ""


def _letter(options, answer):
    for k, v in options.items():
        if v == answer:
            return k
    return None


class OracleTools:
    """Tools backed by a toy-V* scene's annotations; `look` reads the rendered pixels (synth.read_texture)."""

    def locate(self, world):
        """The target object's box grown to the 28 px sub-grid (a big object's whole cell, a small object's own
        box), in main-image px."""
        return _round_box(world.grown(world.from_source(synth.snap(world.scene.object_box))))

    def adjust_box(self, world, box):
        """The detail region on the 28 px sub-grid (the tag, the striped centre, the two patches), in main-image
        px; None when `box` is already that tight."""
        new = _round_box(world.grown(world.from_source(world.scene.detail_box)))
        return None if tuple(new) == tuple(box) else new

    def look(self, world, view):
        """Read every detail in `view` (synth.read_texture); a stripe period under world.acuity view px counts as
        not legible however clear the pixels are."""
        sx, sy = world.src_scale
        readings, contrast = [], []
        for t in world.scene.details:
            ori, c, ok = synth.read_texture(view.image, t, lambda b: view.from_main((b[0] * sx, b[1] * sy,
                                                                                    b[2] * sx, b[3] * sy)))
            ok = ok and t.period * sx * view.scale[0] >= world.acuity
            readings.append(ori if ok else None)
            contrast.append(round(c, 3))
        ans = synth.answer_from_reading(world.scene, readings)
        return Look(view, ans, _letter(world.options, ans) if ans else None, contrast)

    def verify(self, world, look):
        """Right answer, and (for a zoom) the crop holds the whole asked-about box."""
        if look.answer is None or look.letter != world.label:
            return False
        return look.view.crop_box is None or contains(look.view.crop_box, world.target_box)


def _round_box(b):
    return [int(round(v)) for v in b]


_NUMS = re.compile(r"-?\d+(?:\.\d+)?")


def parse_box_reply(text):
    """The first four numbers after "bbox_2d" (Qwen2.5-VL grounding JSON), else the first [a, b, c, d] list."""
    i = text.find("bbox_2d")
    for chunk in ([text[i + len("bbox_2d"):]] if i >= 0 else []) + re.findall(r"\[[^\[\]]*\]", text):
        nums = _NUMS.findall(chunk)
        if len(nums) >= 4:
            x0, y0, x1, y1 = (float(v) for v in nums[:4])
            if x1 > x0 and y1 > y0:
                return (x0, y0, x1, y1)
    return None


class ModelTools:
    """Tools backed by a Qwen2.5-VL of model.py (greedy). Boxes come back in the pixels of the view the model saw
    and are mapped to main-image px. For real images: give World a target_name (V* `target_object`)."""

    def __init__(self, model, tokenizer, max_new_tokens=128):
        self.model, self.tok, self.max_new_tokens = model, tokenizer, max_new_tokens

    def ask(self, images, text, min_pixels=VIEW_MIN_PIXELS, max_pixels=QWEN_VIEW_MAX_PIXELS):
        """One user turn [images..., text] -> the model's reply (special tokens stripped). `images` are what the CoF
        loop sends (View.sent); crop_kernels.preprocess_image applies the processor limits, as in cof.py's loop."""
        pv, grids = [], []
        for img in images:
            p, g = crop_kernels.preprocess_image(crop_kernels.from_pil(img), min_pixels=min_pixels, max_pixels=max_pixels)
            pv.append(p)
            grids.append(g)
        msgs = [{"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]}]
        grid = torch.cat(grids) if grids else None
        ids, _ = T.tokenize_chat(self.tok, msgs, image_grid_thw=grid, add_generation_prompt=True)
        dev = self.model.device
        out = decode.generate(self.model, torch.tensor([ids], device=dev),
                              pixel_values=torch.cat(pv).to(dev) if pv else None,
                              image_grid_thw=grid.to(dev) if grid is not None else None,
                              max_new_tokens=self.max_new_tokens, eos_token_id=[self.tok.im_end_id, self.tok.eos_id])
        return self.tok.decode(out[0].tolist(), skip_special_tokens=True).strip()

    def _ask(self, world, view, text):
        return self.ask([view.sent], text, world.view_min_pixels, world.view_max_pixels)

    def _box(self, world, view, what):
        reply = self._ask(world, view, f"Locate the {what} in the image, output its bbox coordinates using JSON "
                                       f"format.")
        b = parse_box_reply(reply)
        if b is None:
            return None
        W, H = view.image.size          # the model's boxes are in the pixels it saw
        b = (max(0, b[0]), max(0, b[1]), min(W, b[2]), min(H, b[3]))
        return _round_box(view.to_main(b)) if b[2] > b[0] and b[3] > b[1] else None

    def locate(self, world):
        return self._box(world, world.main_view(), world.target_name)

    def adjust_box(self, world, box):
        view = world.zoom(tool_call_text(box))
        if view is None:
            return None
        new = self._box(world, view, f"part of the {world.target_name} needed to answer: "
                                     f"{world.question.splitlines()[0]}")
        return None if new is None or new == list(box) else new

    def look(self, world, view):
        reply = self._ask(world, view, f"{world.question}\nIf the details needed to answer cannot be seen clearly in "
                                       f"this image, reply \"unclear\". Otherwise answer with the option's letter.")
        m = re.search(r"\(?\b([A-L])\b\)?", reply)
        if "unclear" in reply.lower() or not m or m.group(1) not in world.options:
            return Look(view, None, None, note=reply)
        return Look(view, world.options[m.group(1)], m.group(1), note=reply)

    def verify(self, world, look):
        if look.letter is None:
            return False
        reply = self._ask(world, look.view, f"{world.question}\nProposed answer: ({look.letter}) {look.answer}. "
                                            f"Is the proposed answer correct for this image? Reply yes or no.")
        ok = reply.strip().lower().startswith("yes")
        if ok and world.label is not None:
            ok = look.letter == world.label          # with ground truth: a "yes" to a wrong answer never passes
        return ok


# ----------------------------------------------------------------------------------------------------------------
# The search loop and the summary


@dataclass
class Step:
    """One thought/action of the search log (kept for inspection; the summary keeps a subset)."""
    thought: str
    action: str                 # "look" | "locate" | "adjust_box"; `ok` is the verify verdict of a look
    box: list | None = None     # the box proposed (main-image px)
    look: Look | None = None
    ok: bool | None = None


@dataclass
class Search:
    world: World
    steps: list
    zooms: list                 # the (box, Look) pairs of the successful path, in order
    final: Look | None
    success: bool


def search(world, tools, max_zooms=3, always_zoom=False):
    """Run the thought/action loop. Answers from the main view when `look` reads it there and `verify` agrees;
    otherwise locates the target, zooms, and tightens the box (adjust_box) until the answer verifies or no tighter
    box is left (at most `max_zooms` zooms). always_zoom: never answer from the main view (the always-zoom
    baseline's trajectories, like the proactive models the paper compares with)."""
    steps = []
    first = tools.look(world, world.main_view())
    ok = first.answer is not None and tools.verify(world, first) and not always_zoom
    steps.append(Step("Try to answer from the whole image.", "look", None, first, ok))
    if ok:
        return Search(world, steps, [], first, True)
    box = tools.locate(world)
    steps.append(Step(f"Locate the {world.target_name}.", "locate", box))
    path = []
    for _ in range(max_zooms):
        if box is None:
            break
        view = world.zoom(tool_call_text(box))
        if view is None:
            steps.append(Step("The box is not valid for this image.", "look", box, None, False))
            break
        seen = tools.look(world, view)
        ok = seen.answer is not None and tools.verify(world, seen)
        steps.append(Step("Look at the zoomed region.", "look", box, seen, ok))
        path.append((box, seen))
        if ok:
            return Search(world, steps, path, seen, True)
        box = tools.adjust_box(world, box)
        steps.append(Step("The detail is still unclear: tighten the box.", "adjust_box", box))
    return Search(world, steps, path, None, False)


def relabel(result, scene):
    """`result` (a search of a toy-V* scene) as if `scene` (the same item with its options in another order, e.g.
    synth.rotate_options) had been asked: the same views and readings, the final letter of the new order."""
    world = copy.copy(result.world)
    world.question, world.label, world.scene = scene.question, scene.label, scene
    world.options = dict(zip("ABCD", scene.options))
    final = result.final and replace(result.final, letter=_letter(world.options, result.final.answer))
    return replace(result, world=world, final=final)


_REL = {"left": "to the left", "right": "to the right", "above": "above", "below": "below"}  # ends on the option word


def _where(world, box):
    if world.scene is not None:
        return "in the " + synth.where(world.scene)
    W, H = world.size
    cx, cy = (box[0] + box[2]) / 2 / W, (box[1] + box[3]) / 2 / H
    v = "upper" if cy < 1 / 3 else ("lower" if cy > 2 / 3 else "middle")
    h = "left" if cx < 1 / 3 else ("right" if cx > 2 / 3 else "centre")
    return f"in the {v} {h} part of the image"


def _conclusion(world, look, zoomed):
    """The last thought: what was read, ending on the option's own words, then the letter: "... are falling (D), so the
    answer is D." Where the options come in a shuffled order (world.restate_options) it first restates them, so that
    picking the letter is a short lookup: the word just written matches one entry of the list a few tokens back. The
    tiny model learns that lookup late, at the default 3,000 SFT steps not reliably; the built-in world therefore
    keeps one option order per question (synth.make_scene's shuffle_options)."""
    sc, L = world.scene, look.letter
    lead = "In the zoomed view" if zoomed else "At this resolution"
    if sc is None:
        seen = f"{lead} I can see the {world.target_name} clearly: the answer is {look.answer}"
    elif sc.category == "relative_position":
        seen = (f"{lead}, seen from the vertically striped patch, the horizontally striped patch is "
                f"{_REL[look.answer]}")
    else:
        what = f"the small tag of the {sc.name}" if sc.difficulty == "hard" else f"the {sc.name}"
        seen = f"{lead} the stripes on {what} are {look.answer}"
    options = ", ".join(f"({k}) {v}" for k, v in world.options.items())
    restated = f"The options are {options}. " if world.restate_options else ""
    return f"{restated}{seen} ({L}), so the answer is {L}."


def _first_thought(world, box):
    sc = world.scene
    if sc is None:
        return (f"The {world.target_name} is {_where(world, box)}, but it is too small to answer from this view. "
                f"I will zoom in on it.")
    loc = f"The {sc.name} is {_where(world, box)}"
    if sc.category == "relative_position":
        return f"{loc}, but the two striped patches on it are too small to tell apart here. I will zoom in on it."
    if sc.difficulty == "hard":
        return f"{loc}, but its small tag is too small to read here. I will zoom in on the {sc.target_obj.shape} first."
    return f"{loc}, but its stripes are too fine to make out here. I will zoom in on it."


def _again_thought(world):
    sc = world.scene
    if sc is not None and sc.difficulty == "hard" and sc.category == "direct_attributes":
        return (f"The zoomed view shows the tag on the {sc.name}, but its stripes are still too fine. "
                f"I will zoom in on the tag.")
    return f"The zoomed view shows the {world.target_name}, but the detail is still too small. I will zoom in closer."


def summarize(result):
    """The CoF trajectory of a successful search: (assistant texts, images) where images[0] is the main image and
    images[k] the zoom image after assistant turn k. Keeps the first zoom and the last one, like the paper's
    summary (`assets/visual_agent.jpg`)."""
    if not result.success:
        raise ValueError("summarize: the search did not succeed; there is nothing to summarize")
    world = result.world
    zooms = result.zooms if len(result.zooms) <= 2 else [result.zooms[0], result.zooms[-1]]
    images = [world.main]
    if not zooms:
        box = world.target_box or [0, 0, *world.size]
        t = f"The {world.target_name} is {_where(world, box)}. " + _conclusion(world, result.final, False)
        return [f"<think>{t}</think>\n<answer>{result.final.letter}</answer>"], images
    texts = []
    for k, (box, seen) in enumerate(zooms):
        t = _first_thought(world, box) if k == 0 else _again_thought(world)
        texts.append(f"<think>{t}</think>\n{tool_call_text(box)}")
        images.append(seen.view.sent)
    texts.append(f"<think>{_conclusion(world, result.final, True)}</think>\n<answer>{result.final.letter}</answer>")
    return texts, images


def to_messages(question_with_options, label, assistant_texts):
    """ShareGPT messages in the released CoF-SFT layout (`<image>` placeholders, one per image)."""
    msgs = [{"role": "system", "content": cof.SYSTEM_PROMPT},
            {"role": "user", "content": cof.rl_prompt(question_with_options, label)}]
    for k, t in enumerate(assistant_texts):
        msgs.append({"role": "assistant", "content": t})
        if k < len(assistant_texts) - 1:
            msgs.append({"role": "user", "content": "<image>" + cof.USER_PROMPT})
    return msgs


def scene_world(scene, image=None, resolution=synth.SCENE, view_max_pixels=TINY_VIEW_MAX_PIXELS, acuity=0.0,
                restate_options=True, min_box=0):
    """A World for a toy-V* scene (rendered when `image` is None); restate_options: the trajectory's last thought
    restates the options before the letter (for shuffled options); min_box: see World."""
    image = image if image is not None else synth.render(scene)
    return World(image, scene.question, scene.label, dict(zip("ABCD", scene.options)), resolution, view_max_pixels,
                 scene=scene, target_box=scene.target_box, target_name=scene.name, acuity=acuity,
                 restate_options=restate_options, min_box=min_box)


# ----------------------------------------------------------------------------------------------------------------
# A picture of the world: one item of each question kind as the model sees it


def kinds_figure(path, seed=0, scale=2):
    """Draw one toy-V* item of each question kind (synth.QUESTION_KINDS) to a PNG, a row each: the 448 px scene
    with the asked-about box, then what the tiny model sees: the 112 px main view, and the view of each zoom the
    oracle agent makes (locate, then adjust_box while the reader cannot read the detail), shown `scale` x with
    nearest-neighbour so the pixels stay pixels. Items the reader reads in the main view get the zoom on the object
    too (what a zoom there would show). Returns `path`."""
    from PIL import ImageDraw, ImageFont
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:                            # Pillow without FreeType: the bitmap font
        font = ImageFont.load_default()
    tools, cell, pad, rows = OracleTools(), 112 * scale, 12, []
    for k, kind in enumerate(synth.QUESTION_KINDS):
        cat, diff = synth.KIND_TARGET[kind]
        sc = synth.make_scene(synth.scene_rng(seed, "test", 900_000 + k), category=cat, difficulty=diff)
        world = scene_world(sc)
        views, box = [("main view", world.main_view())], tools.locate(world)
        while box is not None and len(views) < 3 and (len(views) == 1 or tools.look(world, views[-1][1]).answer is None):
            views.append((f"zoom {len(views)}: {list(box)}", world.zoom(tool_call_text(box))))
            box = tools.adjust_box(world, box)
        rows.append((kind, sc, world, views))
    width = pad + (cell + pad) * 4
    canvas = Image.new("RGB", (width, pad + len(rows) * (cell + 3 * pad + 16)), "white")
    d = ImageDraw.Draw(canvas)
    for r, (kind, sc, world, views) in enumerate(rows):
        y = pad + r * (cell + 3 * pad + 16)
        d.text((pad, y), f"{kind}: {sc.question.splitlines()[0]}", fill="black", font=font)
        y += 16 + pad // 2
        scene = world.main.resize((cell, cell), Image.Resampling.LANCZOS)
        x0, y0, x1, y1 = (v * cell / world.size[0] for v in world.target_box)
        ImageDraw.Draw(scene).rectangle([x0, y0, x1, y1], outline=(255, 0, 255), width=2)
        canvas.paste(scene, (pad, y))
        d.text((pad, y + cell + 1), "scene (448 px), target box", fill="black", font=font)
        for j, (name, v) in enumerate(views, 1):
            im = v.image.resize((v.image.width * scale, v.image.height * scale), Image.Resampling.NEAREST)
            canvas.paste(im, (pad + j * (cell + pad), y))
            d.text((pad + j * (cell + pad), y + im.height + 1), f"{name} ({v.image.width} px)", fill="black",
                   font=font)
    canvas.save(path)
    return path


def main(argv=None):
    p = checks.ArgumentParser(description="Draw one toy-V* item of each question kind as the tiny model sees it.")
    p.add_argument("png", help="output path, e.g. docs/kinds.png")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(kinds_figure(a.png, a.seed))


if __name__ == "__main__":
    main()
