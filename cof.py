"""Chain-of-Focus: the released protocol and the zoom loop, in two forms: read `reference_run` first.

`reference_run` is the spec: one conversation run the way the released code runs it (xtong-zhang/Chain-of-Focus
`eval/vstar/vllm_inference.py`, vLLM): each turn the whole chat is encoded again and decoded, and a tool call is
answered with a crop as a new user turn. `run` is the same loop batched, the one everything else uses: ONE KV cache
per conversation (`model.extend` with ragged masks), many conversations as one batch, G samples of a prompt for GRPO
(`rollouts`); it gives each conversation exactly what `reference_run` gives it alone (tests/test_cof_loop.py).

The protocol (`vllm_inference.py`, `judge_result.py`; the RL recipe's `verl/recipe/zoomin/zoomin_vision_tool.py`,
`prepare_zoomin_data.py`):
* the system prompt with the `image_zoom_in_tool` schema and the user-prompt suffix, byte for byte;
* the main image smart-resized (qwen-vl-utils rules, min 112*112, max 3840*3840 pixels, LANCZOS);
* each turn's first `<tool_call>` JSON parsed for `arguments.bbox_2d` in absolute pixels of that resized image,
  validated like `check_absolute_bbox_format`, enlarged x1.5 about its centre, clipped, truncated to int;
* the crop taken from the resized main image (never from a previous crop), upscaled x2 and smart-resized in one
  LANCZOS resize, and sent back as a new user turn `[crop, USER_PROMPT]`;
* at most 6 generations (zooms), greedy, 512 new tokens per turn; the answer is the first `<answer>...</answer>` of
  the final turn (the V* judge's rule; the RL reward reads the last one, `extract_answer`).

Layout: protocol (prompts, sizes, box parsing, answers, crops) -> the loop's options and result -> the spec -> the
batched loop. Benchmarks, the judge's answer matching and the command line: evaluate.py; traces, progress: report.py.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace

import torch

import checks
import crop_kernels as ck
import decode
import logprobs
import model as M
import tokenizer as T

# ----------------------------------------------------------------------------------------------------------------
# Released strings (eval/vstar/vllm_inference.py; identical in verl/recipe/zoomin/data_progress/prepare_zoomin_data.py)

SYSTEM_PROMPT = """You are a helpful assistant.

# Tools
You may call one or more functions to assist with the user query.
You are provided with function signatures within <tools></tools> XML tags:
<tools>
{"type": "function", "function": {"name":"image_zoom_in_tool","description":"Zoom in on a specific region of an image by cropping it based on a bounding box (bbox_2d) and an optional object label.","parameters":{"properties":{"bbox_2d":{"type":"array","items":{"type":"number"},"minItems":4,"maxItems":4,"description":"The bounding box of the region to zoom in, as [x1, y1, x2, y2], where (x1, y1) is the top-left corner and (x2, y2) is the bottom-right corner."},"label":{"type":"string","description":"The name or label of the object in the specified bounding box (optional)."}},"required":["bbox_2d"], "type":"object"},"args_format": "Format the arguments as a JSON object."}}
</tools>

For the function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call>"""

USER_PROMPT = ("\nThink in the mind first, and then decide whether to call tools one or more times OR provide final "
               "answer. Format strictly as: <think>...</think> <tool_call>...</tool_call> <tool_call>...</tool_call> "
               "(if any tools needed) OR <answer>...</answer> (if no tools needed).")

# The RL prompt builder (prepare_zoomin_data.py) adds one of these between the question and USER_PROMPT.
LETTER_HINT = "\nAnswer with the option's letter from the given choices directly."
PHRASE_HINT = "\nAnswer the question using a single word or phrase."

# Released numbers (all are options of CofConfig below).
MAIN_MIN_PIXELS = 112 * 112      # --min_resolution 112 (slurm_jobs/eval/inference_vstar.sh)
MAIN_MAX_PIXELS = 3840 * 3840    # resize_image default
ENLARGE = 1.5                    # --enlarge_factor
SCALEUP = 2                      # --scaleup_factor
MAX_TURNS = 6                    # max_iterations: generations per question (each but the last may zoom)
MAX_NEW_TOKENS = 512             # --max_new_tokens
# vLLM hands the (already resized) image to the checkpoint's HF image processor, which smart-resizes it again
# with its own limits (crop_kernels.PROCESSOR_MIN/MAX_PIXELS: 4*28*28 .. 16384*28*28, BICUBIC). That is a no-op
# unless the first resize produced more than 12,845,056 pixels.

# ----------------------------------------------------------------------------------------------------------------
# Prompts / messages (HF-style dicts, rendered by tokenizer.tokenize_chat)

# Two layouts of the text after the image exist upstream: the released evaluation (vllm_inference.py) writes
# "Question: ...", the released SFT and RL rows (prepare_zoomin_data.py: "<image>" + " Question: " + ...) put a space
# before it. A 7B model does not notice; a model trained from scratch on one of them does (see README).
QUESTION_FORMATS = {"released": "Question: ", "train": " Question: "}


def question_text(question, question_format="released"):
    """The user text after the image: `Question: {text}{USER_PROMPT}` (the released eval; text already ends with
    the answer hint), or with question_format="train" the SFT / RL rows' ` Question: {text}{USER_PROMPT}`."""
    checks.one_of(question_format, "question_format", tuple(QUESTION_FORMATS))
    return f"{QUESTION_FORMATS[question_format]}{checks.string(question, 'question', empty=True)}{USER_PROMPT}"


def build_messages(question, system=True, question_format="released"):
    """The released first turns: system prompt, then the user turn `[image, "Question: ...USER_PROMPT"]`."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}] if system else []
    messages.append({"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": question_text(question, question_format)}]})
    return messages


def zoom_message():
    """The user turn that carries a crop back: `[crop, USER_PROMPT]` (vllm_inference.py)."""
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": USER_PROMPT}]}


def error_message(text):
    """The text-only user turn used instead of a crop when `invalid="text"` (the RL tool's behaviour)."""
    return {"role": "user", "content": text}


def rl_prompt(question, ground_truth):
    """The released RL user content (prepare_zoomin_data.py): `<image> Question: {q}{hint}{USER_PROMPT}`, with the
    letter hint when the ground truth is one letter A-L and the question lists options as (A)/(B) or A./B.,
    otherwise the single-word-or-phrase hint. `<image>` is the ShareGPT/verl image placeholder."""
    checks.string(question, "question", empty=True)
    gt = checks.string(ground_truth, "ground_truth")
    letter = (len(gt) == 1 and gt.lower() in "abcdefghijkl"
              and (("(A)" in question and "(B)" in question) or ("A." in question and "B." in question)))
    return "<image>" + " Question: " + question + (LETTER_HINT if letter else PHRASE_HINT) + USER_PROMPT


# ----------------------------------------------------------------------------------------------------------------
# Sizes: qwen-vl-utils' smart_resize (what the released code imports), the main-image rule and the crop rule

def released_smart_resize(height, width, factor=ck.FACTOR, min_pixels=MAIN_MIN_PIXELS, max_pixels=MAIN_MAX_PIXELS):
    """qwen_vl_utils.smart_resize -> (h, w), multiples of `factor`. Differs from transformers' version (crop_kernels.
    smart_resize) only in where it clamps to `factor`: here on the first rounding, not in the shrink branch.
    Raises ValueError for an aspect ratio above 200 and ZeroDivisionError for an empty side, as upstream does."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def main_size(height, width, min_pixels=MAIN_MIN_PIXELS, max_pixels=MAIN_MAX_PIXELS):
    """(h, w) the main image is LANCZOS-resized to before the model sees it (vllm_inference.resize_image)."""
    return released_smart_resize(height, width, ck.FACTOR, min_pixels, max_pixels)


def zoom_size(box, scale=SCALEUP, min_pixels=MAIN_MIN_PIXELS, max_pixels=MAIN_MAX_PIXELS):
    """(h, w) of the crop sent back for an integer box (x0, y0, x1, y1): the crop's size times `scale`, then
    smart_resize (do_crop). Raises (ValueError / ZeroDivisionError) where the released do_crop fails and falls
    back to the uncropped main image: an empty crop or an aspect ratio above 200."""
    x0, y0, x1, y1 = box
    if x1 < x0 or y1 < y0:        # an empty box raises in released_smart_resize, as upstream (zoom's fallback)
        raise ValueError(f"zoom_size: box {tuple(box)} is inverted: need x0 <= x1 and y0 <= y1")
    return released_smart_resize((y1 - y0) * scale, (x1 - x0) * scale, ck.FACTOR, min_pixels, max_pixels)


# ----------------------------------------------------------------------------------------------------------------
# Box parsing (find_absolute_bboxes + check_absolute_bbox_format)

def first_tool_call(text):
    """Content of the first `<tool_call>...</tool_call>` block, or None: what the released parser's
    `re.search(r"<tool_call>(.*?)</tool_call>", text, re.DOTALL)` finds, in linear time (that regex rescans the rest
    of the text from every `<tool_call>` that has no closing tag: quadratic on hostile model output)."""
    i = text.find("<tool_call>")
    if i < 0:
        return None
    j = text.find("</tool_call>", i + len("<tool_call>"))
    return None if j < 0 else text[i + len("<tool_call>"):j]


def _bbox_error(bbox, w, h):
    """check_absolute_bbox_format as a message (None when valid); wording of the RL tool's messages."""
    if not all(isinstance(c, (int, float)) for c in bbox):   # bools pass, as upstream (bool is an int)
        return f"Invalid bounding box: Bounding box must be a list of 4 numbers, but found non-numeric elements in: '{bbox}'"
    x0, y0, x1, y1 = bbox
    if not (0 <= x0 < w and 0 <= y0 < h and 0 < x1 <= w and 0 < y1 <= h):   # NaN fails every comparison
        issues = [s for ok, s in ((x0 < 0, f"x0 ({x0}) < 0"), (y0 < 0, f"y0 ({y0}) < 0"),
                                  (x1 > w, f"x1 ({x1}) > image width ({w})"), (y1 > h, f"y1 ({y1}) > image height ({h})"))
                  if ok]
        return (f"Invalid bounding box: Bounding box {bbox} coordinates out of image range [0,0,{w},{h}]. "
                f"Issues: {', '.join(issues)}")
    if x1 <= x0 or y1 <= y0:
        issues = [s for ok, s in ((x1 <= x0, f"x1 ({x1}) must be greater than x0 ({x0})"),
                                  (y1 <= y0, f"y1 ({y1}) must be greater than y0 ({y0})")) if ok]
        return f"Invalid bounding box: Bounding box {bbox} has invalid coordinates. Issues: {', '.join(issues)}"
    return None


def find_box(text, width, height, enlarge=ENLARGE):
    """Full result of the released box parser: (box, status, message).

    status "ok": box is the integer crop box. status "none": the released parser returned None (no tool call
    block, JSON that does not parse, a bbox that fails validation) and the released loop crops `None` = the whole
    image (then upscaled like any crop). status "error": the released parser raised (JSON that is not an object
    with arguments.bbox_2d, a bbox that does not unpack into 4 values, nesting too deep) and the released loop sent
    the resized main image as it is. `message` says what was wrong (the RL tool's wording where it has one).
    """
    checks.string(text, "text", empty=True)
    checks.number(width, "width", lo=1)
    checks.number(height, "height", lo=1)
    checks.number(enlarge, "enlarge", lo=1)      # below 1 would shrink the box, below 0 invert it
    body = first_tool_call(text)
    if body is None:
        return None, "none", "Invalid tool call: no <tool_call>...</tool_call> block found."
    try:
        data = json.loads(body.strip())
    except ValueError as e:   # JSONDecodeError, or an integer past Python's 4300-digit limit
        return None, "none", f"Invalid tool call: the <tool_call> content is not valid JSON ({e})."
    except RecursionError:
        return None, "error", "Invalid tool call: the <tool_call> JSON is nested too deeply."
    try:
        x0, y0, x1, y1 = data["arguments"]["bbox_2d"]
    except Exception as e:   # noqa: BLE001 - upstream lets any of these escape to its outer handler
        return None, "error", (f"Invalid tool call: expected {{\"name\": \"image_zoom_in_tool\", \"arguments\": "
                               f"{{\"bbox_2d\": [x1, y1, x2, y2]}}}} ({type(e).__name__}: {e}).")
    bbox = [x0, y0, x1, y1]
    err = _bbox_error(bbox, width, height)
    if err is not None:
        return None, "none", err
    if enlarge != 1:
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        bw, bh = (x1 - x0) * enlarge, (y1 - y0) * enlarge
        x0, y0 = max(0, cx - bw / 2), max(0, cy - bh / 2)
        x1, y1 = min(width, cx + bw / 2), min(height, cy + bh / 2)
    return (int(x0), int(y0), int(x1), int(y1)), "ok", "ok"


def parse_zoom(text, width, height, enlarge=ENLARGE):
    """The integer box (x0, y0, x1, y1) the released code crops for model output `text` on a (resized) image of
    `width` x `height`, or None where it finds no valid box. Only the first <tool_call> of the text counts."""
    return find_box(text, width, height, enlarge)[0]


def has_tool_call(text):
    """The released loop zooms whenever the turn contains `<tool_call>` (even without a closing tag)."""
    return "<tool_call>" in text


# ----------------------------------------------------------------------------------------------------------------
# Answers

_OPEN, _CLOSE = "<answer>", "</answer>"


def _answer_spans(text, newline_ok):
    r"""(start, end) of the groups `<answer>\s*(.*?)\s*</answer>` matches, left to right and non-overlapping, as
    `re.finditer` gives them (with re.DOTALL when newline_ok; without it `.` stops at a newline), in linear time.

    Why this equals the regex: from an `<answer>` at i, the leading `\s*` takes the whole whitespace run (to q); the
    lazy group then ends at the first place e >= q followed by whitespace and a `</answer>`, which is the first
    `</answer>` at or after q (k) with its whitespace run before it cut off. Without DOTALL the match from i fails
    when text[q:e] holds a newline (every later `</answer>` lies beyond that newline too), and the search moves on
    to the next `<answer>`. Both scans only move forward: `k` and the last newline before `e` are found once per
    `</answer>`."""
    spans, pos, k, ek, last_nl = [], 0, -1, -1, -1
    while True:
        i = text.find(_OPEN, pos)
        if i < 0:
            return spans
        q = i + len(_OPEN)
        while q < len(text) and text[q].isspace():
            q += 1
        if k < q:                      # the next </answer>, its whitespace run before it, the last newline before that
            k = text.find(_CLOSE, q)
            if k < 0:
                return spans
            ek = k
            while text[ek - 1].isspace():
                ek -= 1
            last_nl = -1 if newline_ok else text.rfind("\n", 0, ek)
        e = max(ek, q)
        if newline_ok or last_nl < q or e == q:
            spans.append((q, e))
            pos = k + len(_CLOSE)
        else:
            pos = i + 1


def extract_answer(text):
    r"""The RL reward's answer (zoomin_reward3.extract_answer): the content of the LAST `<answer>...</answer>`
    (newlines allowed), stripped; "" when there is none."""
    text = checks.string("" if text is None else text, "text", empty=True)
    spans = _answer_spans(text, newline_ok=True)
    return text[spans[-1][0]:spans[-1][1]].strip() if spans else ""


def judge_answer(text):
    r"""The released V* judge's answer (eval/vstar/judge_result.py extract_answer): `<|im_end|>` removed, then the
    FIRST `<answer>\s*(.*?)\s*</answer>` match without re.DOTALL (an answer spanning a newline does not count);
    "" when there is none. (The judge also replaces an answer holding `\boxed{` by the box's content before this
    step, which then finds no <answer> and hands its LLM judge an empty string; we have no LLM judge, so we skip
    that step and let evaluate.match_answer read the box.)"""
    text = checks.string("" if text is None else text, "text", empty=True).replace("<|im_end|>", "")
    spans = _answer_spans(text, newline_ok=False)
    return text[spans[0][0]:spans[0][1]] if spans else ""


# ----------------------------------------------------------------------------------------------------------------
# Images: main-image resize, crop -> pixels (crop_kernels), the released fallbacks

def prepare_main(image, cfg):
    """Load (path / bytes / PIL / uint8 [3,H,W]) and LANCZOS-resize the main image to its smart_resize size."""

    img = image if isinstance(image, torch.Tensor) else ck.load_image(image)
    ck.check_image(img, "image")
    h, w = main_size(img.shape[1], img.shape[2], cfg.min_pixels, cfg.max_pixels)
    return img, ck.resize(img, (h, w), "lanczos")


def _encode(img_u8, box, size, cfg, keep):
    """Crop `box` of img_u8, LANCZOS-resize to `size`, then the checkpoint processor's own smart_resize (BICUBIC,
    a no-op unless `size` is outside its pixel limits) -> (pixel_values, grid_thw [1,3], uint8 image or None)."""

    h, w = size
    ph, pw = ck.smart_resize(h, w, ck.FACTOR, cfg.processor_min_pixels or ck.PROCESSOR_MIN_PIXELS,
                             cfg.processor_max_pixels or ck.PROCESSOR_MAX_PIXELS)
    if (ph, pw) == (h, w):
        pv, grid = ck.crop_resize_patchify(img_u8, [box], [size], resample="lanczos")
        out = ck.resize(ck.crop(img_u8, box), size, "lanczos") if keep else None
        return pv, grid, out
    out = ck.resize(ck.resize(ck.crop(img_u8, box), size, "lanczos"), (ph, pw), "bicubic")
    pv, grid = ck.patchify(out)                  # on the CPU: moved to the image's device, as the kernels' path is
    return pv.to(img_u8.device), grid, out


def zoom(main_u8, text, cfg, keep=False):
    """What the environment sends back for a turn that contains <tool_call> (vllm_inference.do_crop + its caller).

    Returns dict(box, status, message, pixel_values, grid, image, size). status: "ok" (crop of box), "none" (no
    valid box: the whole image goes through the crop rule, i.e. re-sent at x2 within the pixel limits), "error"
    (the parser or the crop rule raised: the resized main image is re-sent as it is). With cfg.invalid == "text"
    every status but "ok" yields no image and `message` is sent as a text turn instead (RL tool behaviour)."""
    H, W = main_u8.shape[1], main_u8.shape[2]
    box, status, message = find_box(text, W, H, cfg.enlarge)
    message = message.replace("<|", "<").replace("|>", ">")   # echoed model text must not become special tokens
    crop_box = box if status == "ok" else (0, 0, W, H)
    size = None
    if status != "error":
        try:
            size = zoom_size(crop_box, cfg.scaleup, cfg.crop_min_pixels, cfg.crop_max_pixels)
        except (ValueError, ZeroDivisionError) as e:   # empty crop / aspect ratio > 200: do_crop's except branch
            status, message = "error", f"Error: {e}"
            size = None
    if status == "error":
        crop_box, size = (0, 0, W, H), (H, W)
    out = dict(box=box, status=status, message=message, size=size, pixel_values=None, grid=None, image=None)
    if status != "ok" and cfg.invalid == "text":
        return out
    out["pixel_values"], out["grid"], out["image"] = _encode(main_u8, crop_box, size, cfg, keep)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The loop's options and what it returns

@dataclass
class CofConfig:
    """Loop options; defaults are the released evaluation values (vllm_inference.py, inference_vstar.sh)."""
    min_pixels: int = checks.option(MAIN_MIN_PIXELS, "the main image's smart_resize lower bound (pixels)")
    max_pixels: int = checks.option(MAIN_MAX_PIXELS, "the main image's smart_resize upper bound (pixels)")
    enlarge: float = checks.option(ENLARGE, "a box is grown about its centre by this before cropping")
    scaleup: float = checks.option(SCALEUP, "a crop is upscaled by this before its smart_resize")
    crop_min_pixels: int = checks.option(MAIN_MIN_PIXELS, "a crop's smart_resize lower bound (pixels)")
    crop_max_pixels: int = checks.option(MAIN_MAX_PIXELS, "a crop's smart_resize upper bound (RL tool: 5120*28*28)")
    processor_min_pixels: int | None = checks.option(None, "the image processor's lower bound; none: the checkpoint's")
    processor_max_pixels: int | None = checks.option(None, "the image processor's upper bound; none: the checkpoint's")
    max_turns: int = checks.option(MAX_TURNS, "generations per conversation (a tool call in the last one ends it)")
    max_new_tokens: int = checks.option(MAX_NEW_TOKENS, "new tokens per turn")
    max_model_len: int = checks.option(32768, "tokens of a whole conversation (vLLM's max_model_len, released)")
    invalid: str = checks.option("image", "invalid box: image (the released eval's fallback) | text (RL's error turn)")
    do_sample: bool = checks.option(False, "sample (GRPO's rollouts); false: greedy")
    temperature: float = checks.option(1.0, "sampling temperature")
    top_p: float = checks.option(1.0, "nucleus sampling: the smallest set of tokens with this much probability")
    top_k: int = checks.option(0, "sample from the k most likely tokens; 0 = all")
    system: bool = checks.option(True, "send SYSTEM_PROMPT (the released eval does)")
    keep_images: bool = checks.option(False, "keep the uint8 main image and crops in the trajectory (traces, GRPO)")
    ban_vision_tokens: bool = checks.option(True, "never sample the vision tokens (see vision_token_ids)")
    question_format: str = checks.option("released", "released: the eval's 'Question:' | train: the rows' ' Question:'")
    compile: bool = checks.option(False, "one-token steps through decode.Decoder (torch.compile)")
    cuda_graphs: bool = checks.option(False, "... replayed as CUDA graphs (needs compile and a CUDA model)")
    direct: bool = checks.option(False, "never sample <tool_call>: forced direct answers (the no-zoom baseline)")

    # field -> (lowest allowed value, whether it may equal it[, highest, whether it may equal it]): checks.options
    LIMITS = dict(min_pixels=(1, True), max_pixels=(1, True), enlarge=(1, True), scaleup=(0, False),
                  crop_min_pixels=(1, True), crop_max_pixels=(1, True), processor_min_pixels=(1, True),
                  processor_max_pixels=(1, True), max_turns=(1, True), max_new_tokens=(1, True),
                  max_model_len=(1, True), temperature=(0, True), top_p=(0, False, 1, True), top_k=(0, True))
    CHOICES = dict(invalid=("image", "text"), question_format=tuple(QUESTION_FORMATS))

    def __post_init__(self):
        checks.options(self, label=lambda name: f"CofConfig.{name}")
        if self.cuda_graphs and not self.compile:
            raise ValueError("CofConfig.cuda_graphs replays the compiled decode step: set compile=true as well")
        for lo, hi in (("min_pixels", "max_pixels"), ("crop_min_pixels", "crop_max_pixels"),
                       ("processor_min_pixels", "processor_max_pixels")):
            if getattr(self, lo) is not None and getattr(self, hi) is not None and getattr(self, lo) > getattr(self, hi):
                raise ValueError(f"CofConfig.{lo} ({getattr(self, lo)}) is larger than CofConfig.{hi} "
                                 f"({getattr(self, hi)})")

    @classmethod
    def from_dict(cls, d):
        return checks.from_dict(cls, d)


def with_processor_limits(cfg, model):
    """cfg with processor_min/max_pixels filled from the model's image processor where they are None (a model
    without the attributes, e.g. a scripted stand-in, gets the released checkpoints' limits)."""
    lo = cfg.processor_min_pixels or getattr(model, "image_min_pixels", ck.PROCESSOR_MIN_PIXELS)
    hi = cfg.processor_max_pixels or getattr(model, "image_max_pixels", ck.PROCESSOR_MAX_PIXELS)
    return replace(cfg, processor_min_pixels=lo, processor_max_pixels=hi)


@dataclass
class Trajectory:
    """One conversation. `ids` is every token in order (prompt, generated turns, environment turns), exactly the
    sequence held in the KV cache, so a training forward over `ids` with `pixel_values` / `image_grid_thw` sees
    what the sampler saw. `gen_mask[i]` is True for tokens the model generated (the loss tokens), False for the
    prompt and for environment tokens (turn headers, crop tokens, USER_PROMPT, error text, a closing <|im_end|>
    added after a turn cut at max_new_tokens). `logprobs[i]` is log p(ids[i]) for generated tokens (0.0 elsewhere)
    under the policy that sampled it: the model's logits with the banned vision tokens at -inf (cfg.ban_vision_tokens),
    divided by the temperature when sampling (logprobs.policy_logprobs computes the same from a training forward)."""
    question: str
    ids: list
    gen_mask: list
    logprobs: list
    prompt_len: int
    pixel_values: object           # float [sum patches, 1176] on the CPU (a training forward moves them), images in
                                   # order: main image, then crops (on a GPU, G copies of the main image add up)
    image_grid_thw: object         # int64 [n_images, 3]
    turns: list                    # per generation: text, n_tokens, stop, tool_call, box, status, message, crop_size
    answer: str                    # judge_answer of the final turn ("" when the turn limit ended it)
    n_zooms: int                   # turns that called the tool (valid box or not)
    n_generated: int
    finished: bool                 # ended with a turn without tool call (False: turn limit)
    original_size: tuple           # (H, W) given
    main_size: tuple               # (h, w) the model saw
    images: list = field(default_factory=list)   # uint8 main image + crops (cfg.keep_images)
    group: int = 0                 # index of the question in the batch (rollouts: G rows per group)


def _device(model):
    return getattr(model, "device", None) or next(model.parameters()).device


def vision_token_ids(tokenizer):
    """Tokens the zoom loop never samples (CofConfig.ban_vision_tokens): an <|image_pad|> / <|video_pad|> the model
    wrote would be read back as an image placeholder without an image, and <|vision_start|> / <|vision_end|> only
    frame images the environment inserts. The released stack (vLLM / SGLang, skip_special_tokens) drops such tokens
    from the text it re-encodes; we keep the token ids as sampled, so we never sample them."""
    return [tokenizer.image_pad_id, tokenizer.video_pad_id, tokenizer.vision_start_id, tokenizer.vision_end_id]


def _token_sets(tokenizer, cfg):
    """(ids that end a turn: <|im_end|>, eos, pad; ids never sampled: vision tokens, <tool_call> with cfg.direct)."""
    stops = {i for i in (tokenizer.im_end_id, getattr(tokenizer, "eos_id", None), getattr(tokenizer, "pad_id", None))
             if i is not None}
    banned = vision_token_ids(tokenizer) if cfg.ban_vision_tokens else []
    if cfg.direct:
        if tokenizer.tool_call_id is None:
            raise ValueError("CofConfig.direct bans <tool_call>, but this tokenizer has no such token")
        banned = banned + [tokenizer.tool_call_id]
    return stops, banned


# ----------------------------------------------------------------------------------------------------------------
# The spec: one conversation, the whole chat encoded again every turn (the released loop's shape)

@torch.no_grad()
def reference_run(model, tokenizer, image, question, cfg=None, logits_processor=None):
    """One conversation, greedy, as the released loop runs it (vllm_inference.run_inference_loop): each turn encodes
    the whole chat so far (tokenize_chat, every image so far), prefills it into a fresh cache and decodes until the
    turn ends; a tool call gets `zoom`'s reply (the crop, or with cfg.invalid="text" the error) as a new user turn,
    until an answer or cfg.max_turns generations. The spec of `run`; `python bench.py cof` times it as the released
    cost. Unlike the released loop, and like `run`, the chat holds each turn's tokens as generated, not their text
    encoded again. logits_processor: as in `run` (row 0). Greedy, vision tokens banned; no context limit, no images."""
    cfg = with_processor_limits(cfg or CofConfig(), model)
    if cfg.do_sample or not cfg.ban_vision_tokens:
        raise ValueError("reference_run is greedy and bans vision tokens: pass do_sample=False, ban_vision_tokens=True")
    dev, (stops, banned) = _device(model), _token_sets(tokenizer, cfg)
    banned = torch.tensor(banned, dtype=torch.long, device=dev)
    orig, main = prepare_main(image, cfg)
    h, w = main.shape[1:]
    pv, grid, _ = _encode(main.to(dev), (0, 0, w, h), (h, w), cfg, keep=False)
    messages = build_messages(question, cfg.system, cfg.question_format)
    pixels, grids, said, turns = [pv], [grid], [], []                  # said: (tokens, log-probs) of each turn
    while True:
        blank = [dict(m, content="") if m["role"] == "assistant" else m for m in messages]   # said[k] goes there
        chat = T.tokenize_chat(tokenizer, blank, torch.cat(grids), add_generation_prompt=True)
        ids, gen, lps = _as_generated(*chat, said, tokenizer.im_end_id)
        turn, turn_lp = _greedy_turn(model, ids, pixels, grids, len(said), stops, banned, cfg, logits_processor)
        said.append((turn, turn_lp))
        text = tokenizer.decode(turn[:-1] if turn[-1] in stops else turn, skip_special_tokens=True)
        turns.append(dict(text=text, n_tokens=len(turn), stop="eos" if turn[-1] in stops else "length",
                          tool_call=has_tool_call(text)))
        messages.append({"role": "assistant", "content": text})
        if not turns[-1]["tool_call"]:
            break
        if len(turns) == cfg.max_turns:                              # the last generation's call is never executed
            turns[-1].update(box=parse_zoom(text, w, h, cfg.enlarge), status="limit", message="turn limit reached")
            break
        z = zoom(main.to(dev), text, cfg)
        turns[-1].update(box=z["box"], status=z["status"], message=z["message"],
                         crop_size=list(z["size"]) if z["size"] else None)
        messages.append(zoom_message() if z["pixel_values"] is not None else error_message(z["message"]))
        if z["pixel_values"] is not None:                            # no crop with cfg.invalid="text": the error only
            pixels, grids = pixels + [z["pixel_values"]], grids + [z["grid"]]
    done, gen = not turns[-1]["tool_call"], gen + [True] * len(turn)
    return Trajectory(question=question, ids=ids + turn, gen_mask=gen, logprobs=lps + turn_lp,
                      prompt_len=gen.index(True), pixel_values=torch.cat(pixels).cpu(),
                      image_grid_thw=torch.cat(grids), turns=turns,
                      answer=judge_answer(text) if done else "", n_zooms=sum(t["tool_call"] for t in turns),
                      n_generated=sum(len(t) for t, _ in said), finished=done, original_size=tuple(orig.shape[1:]),
                      main_size=(h, w))


def _as_generated(ids, assistant_mask, said, im_end_id):
    """tokenize_chat's (ids, assistant mask) of a chat of empty assistant turns (each one masked <|im_end|>), turn k
    replaced by said[k], the tokens it generated, closed by <|im_end|> if they are not -> (ids, gen mask, log-probs)."""
    out, gen, lps, turns = [], [], [], iter(said)
    for t, assistant in zip(ids, assistant_mask):
        toks, lp = next(turns) if assistant else ([t], [0.0])
        close = [im_end_id] if assistant and toks[-1] != im_end_id else []
        out += toks + close
        gen += [assistant] * len(toks) + [False] * len(close)
        lps += lp + [0.0] * len(close)
    return out, gen, lps


def _greedy_turn(model, ids, pixels, grids, k, stops, banned, cfg, logits_processor):
    """Turn k: the whole chat prefilled into a fresh cache, then greedy tokens until a stop -> (tokens, log-probs)."""
    dev = _device(model)
    cache = model.new_cache(1)
    logits = model.extend(cache, torch.tensor([ids], device=dev), pixel_values=torch.cat(pixels).to(dev),
                          image_grid_thw=torch.cat(grids).to(dev), last_only=True)[:, -1]           # [1, V]
    turn, lps = [], []
    while True:
        x = logits if logits_processor is None else logits_processor([(0, k, turn)], logits.clone())    # [1, V]
        t = x.index_fill(-1, banned, float("-inf")).argmax(-1)                                       # [1]
        turn.append(int(t))
        lps.append(float(logprobs.policy_logprobs(logits, t, banned)))
        if turn[-1] in stops or len(turn) == cfg.max_new_tokens:
            return turn, lps
        logits = model.extend(cache, t[:, None], last_only=True)[:, -1]                              # [1, V]


# ----------------------------------------------------------------------------------------------------------------
# The batched loop: one KV cache per conversation, many conversations per batch

def _temperature(cfg):
    return cfg.temperature if cfg.do_sample and cfg.temperature > 0 else 1.0


def _pick(logits, cfg, generator, banned=()):
    """Next token per row from logits [R, V] (decode.sample_next: greedy, or temperature -> top-k -> top-p; banned ids
    never) -> (ids [R], log p under the sampling policy [R])."""

    if len(banned):
        logits = logits.index_fill(-1, torch.as_tensor(banned, device=logits.device), float("-inf"))
    nxt = decode.sample_next(logits, cfg.do_sample, cfg.temperature, cfg.top_p, cfg.top_k, generator,
                             checked=True)                                                              # [R]
    return nxt, logprobs.policy_logprobs(logits, nxt, (), _temperature(cfg))                                  # [R], [R]


class _Turns:
    """Environment token chunks, rendered by tokenizer.tokenize_chat (the owner of the chat layout): each new turn is
    the whole-conversation rendering minus the rendering of a one-message prefix, so the ids are exactly those
    the chat template gives for the full conversation (special tokens split the text, so pieces never merge)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.base = T.tokenize_chat(tokenizer, [{"role": "system", "content": "x"}])[0]
        end = self.base.index(tokenizer.im_end_id)
        self.sep = self.base[end + 1:]                     # what follows <|im_end|> before the next <|im_start|>

    def turn(self, message, grid=None):
        ids = T.tokenize_chat(self.tok, [{"role": "system", "content": "x"}, message], image_grid_thw=grid,
                                   add_generation_prompt=True)[0]
        assert ids[:len(self.base)] == self.base, "tokenize_chat prefix changed: cannot splice turns"
        return ids[len(self.base):]

    def after_assistant(self, stop_token, message, grid=None):
        """Env tokens after a turn that ended with `stop_token` (None: cut at max_new_tokens)."""
        close = [] if stop_token == self.tok.im_end_id else [self.tok.im_end_id]
        return close + self.sep + self.turn(message, grid)


def run(model, tokenizer, images, questions, cfg=None, group_size=1, generator=None, messages=None, on_turn=None,
        logits_processor=None):
    """Run the Chain-of-Focus loop for a batch of questions on one KV cache.

    images: per question a path / bytes / PIL image / uint8 [3,H,W] (the original image; it is smart-resized here).
    questions: per question the text (V* style: options and the answer hint already in it).
    group_size: G trajectories per question (GRPO): the shared prompt is prefilled once and the cache is copied
      with cache.repeat_interleave(G); use cfg.do_sample=True and a torch.Generator for distinct samples.
    messages: optional per question first-turn message list (default build_messages(question, cfg.system)).
    on_turn: optional callback(row, turn_dict) called when a turn ends (the CLI prints with it).
    logits_processor: optional fn(views, logits [R, V]) -> logits applied before picking each token, where views[i] =
      (trajectory row, turn index, tokens of the current turn so far) for cache row i (e.g. to ban tokens; the
      benchmark uses it to force zooms on random weights). Recorded logprobs stay those of the raw model.
    Returns one Trajectory per row, rows ordered question-major (question i's G samples are rows i*G .. i*G+G-1).

    The loop, stage by stage: `_prompts` (main image, vision inputs, chat tokens per question) -> `_prefill` (one
    batched extend, copied G times) -> per step `_next_tokens` (one token for every live row), `_add_token` (to its
    turn), and at the end of a turn `_end_turn` (record it, run the zoom tool, build the environment's reply) ->
    `_compact` (drop finished rows) -> `_feed` the step's chunks (one token, or the last token + the environment's
    turn with its crop) back in one extend.
    """
    _check_run_args(images, questions, cfg, group_size, generator, messages, on_turn, logits_processor)
    cfg = with_processor_limits(cfg or CofConfig(), model)
    env = _Env(tokenizer, cfg, _device(model))
    step = decode.decoder_for(model, cfg.cuda_graphs) if cfg.compile else None
    with torch.no_grad():
        prompts = _prompts(model, tokenizer, images, questions, messages, cfg)
        cache, logits = _prefill(model, tokenizer, prompts, group_size, cfg.max_model_len)
        rows = [_Row.start(prompts[r // group_size], r // group_size) for r in range(len(prompts) * group_size)]
        for row in rows:
            if len(row.ids) >= cfg.max_model_len:      # a prompt vLLM would refuse: no generation, empty answer
                row.refuse(cfg.max_model_len)
        live = list(range(len(rows)))                   # cache row -> trajectory row
        while True:
            nxt, lp = _next_tokens(logits[:, -1], [rows[r] for r in live], live, env, generator, logits_processor)
            chunks, new_images = [], []
            for c, r in enumerate(live):
                row = rows[r]
                if row.done:                        # finished, in the cache until the next compaction: padding
                    chunks.append([])
                    continue
                chunk, image, ended = _add_token(row, nxt[c], lp[c], env)
                chunks.append(chunk)
                if image is not None:
                    new_images.append(image)
                if ended and on_turn is not None:
                    on_turn(r, row.turns[-1])
            if all(rows[r].done for r in live):
                break
            live, chunks = _compact(cache, live, chunks, rows)
            logits = _feed(model, cache, chunks, new_images, tokenizer.pad_id, step)            # [len(live), 1, V]
    return [row.trajectory(questions[row.question]) for row in rows]


def _check_run_args(images, questions, cfg, group_size, generator, messages, on_turn, logits_processor):
    """TypeError / ValueError naming the argument of `run` that cannot be right (checked once per call)."""
    questions = checks.sequence(questions, "questions")
    for i, q in enumerate(questions):
        checks.string(q, f"questions[{i}]", empty=True)
    if len(checks.sequence(images, "images")) != len(questions):
        raise ValueError(f"got {len(images)} images for {len(questions)} questions; give one image per question")
    if messages is not None and len(checks.sequence(messages, "messages")) != len(questions):
        raise ValueError(f"got {len(messages)} message lists for {len(questions)} questions; give one per question")
    checks.kind(cfg, "cfg", CofConfig, "a CofConfig", none=True)
    checks.number(group_size, "group_size", lo=1, whole=True)
    checks.kind(generator, "generator", torch.Generator, "a torch.Generator", none=True)
    for name, fn in (("on_turn", on_turn), ("logits_processor", logits_processor)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be a function or None, got {type(fn).__name__}")


@dataclass
class _Prompt:
    """One question's first turns, ready to prefill."""
    main: object                   # uint8 [3, h, w] main image as the model sees it (CPU)
    main_dev: object               # the same on the model's device (crops are cut from it)
    original_size: tuple           # (H, W) given
    ids: list                      # chat tokens of the first turns + the assistant header
    pixel_values: object           # [patches, 1176] of the main image
    grid: object                   # int64 [1, 3]
    image: object                  # uint8 main image when cfg.keep_images, else None


@dataclass
class _Row:
    """One conversation in flight: everything a Trajectory holds, plus the turn being generated."""
    prompt: _Prompt
    question: int                                   # index of its question in the batch
    ids: list                                       # prompt + finished turns + environment turns
    gen: list                                       # per id: generated by the model
    lp: list                                        # per id: log p under the sampling policy (0.0 if not generated)
    pv: list                                        # pixel_values per image (main, then crops)
    grid: list                                      # grid_thw per image
    images: list                                    # uint8 images (cfg.keep_images)
    turn: list = field(default_factory=list)        # tokens of the turn being generated
    turn_lp: list = field(default_factory=list)
    turns: list = field(default_factory=list)       # one dict per finished turn (see Trajectory)
    n_zooms: int = 0
    done: bool = False
    finished: bool = False
    answer: str = ""

    @classmethod
    def start(cls, p, question):
        return cls(prompt=p, question=question, ids=list(p.ids), gen=[False] * len(p.ids), lp=[0.0] * len(p.ids),
                   pv=[p.pixel_values], grid=[p.grid], images=[p.image] if p.image is not None else [])

    def refuse(self, max_model_len):
        self.done = True
        self.turns.append(dict(text="", n_tokens=0, stop="context", tool_call=False, status="context",
                               message=f"prompt of {len(self.ids)} tokens >= max_model_len {max_model_len}"))

    def append(self, ids, generated, lp=None):
        self.ids += ids
        self.gen += [generated] * len(ids)
        self.lp += lp if lp is not None else [0.0] * len(ids)

    def trajectory(self, question):
        return Trajectory(
            question=question, ids=self.ids, gen_mask=self.gen, logprobs=self.lp, prompt_len=len(self.prompt.ids),
            pixel_values=torch.cat(self.pv).cpu(), image_grid_thw=torch.cat(self.grid), turns=self.turns,
            answer=self.answer, n_zooms=self.n_zooms, n_generated=sum(self.gen), finished=self.finished,
            original_size=self.prompt.original_size, main_size=tuple(self.prompt.main.shape[1:]),
            images=self.images, group=self.question)


class _Env:
    """What the loop needs besides the model: the tokenizer, the config, stop / banned / unusable token ids and the
    environment's turn template. `banned` is a tensor on the model's device (copied there once, not every token)."""

    def __init__(self, tokenizer, cfg, device):
        self.tok, self.cfg, self.turns = tokenizer, cfg, _Turns(tokenizer)
        self.stop_ids, banned = _token_sets(tokenizer, cfg)
        self.banned = torch.tensor(banned, dtype=torch.long, device=device)
        self.unusable = set(vision_token_ids(tokenizer)[:2])   # pads that cannot be fed back (only with the ban off)


def _prompts(model, tokenizer, images, questions, messages, cfg):
    """Per question: the main image resized by the released rule, its pixel values, and the chat tokens."""
    dev = _device(model)
    out = []
    for b, question in enumerate(questions):
        orig, main = prepare_main(images[b], cfg)
        h, w = main.shape[1:]
        pv, grid, img = _encode(main.to(dev), (0, 0, w, h), (h, w), cfg, keep=cfg.keep_images)
        msgs = messages[b] if messages is not None else build_messages(question, cfg.system, cfg.question_format)
        ids, _ = T.tokenize_chat(tokenizer, msgs, image_grid_thw=grid, add_generation_prompt=True)
        out.append(_Prompt(main=main, main_dev=main.to(dev), original_size=tuple(orig.shape[1:]), ids=list(ids),
                           pixel_values=pv, grid=grid, image=img))
    return out


def _prefill(model, tokenizer, prompts, group_size, max_model_len):
    """All prompts through one batched extend; with G > 1 the cache rows are copied G times (prefilled once). A
    prompt of max_model_len tokens or more (refused, as vLLM refuses it) is not prefilled: its row is padding."""
    dev = _device(model)
    cache = model.new_cache(len(prompts))
    fits = [p for p in prompts if len(p.ids) < max_model_len]
    chunk, mask = _pad([p.ids if len(p.ids) < max_model_len else [] for p in prompts], tokenizer.pad_id)
    images = dict(pixel_values=torch.cat([p.pixel_values for p in fits]).to(dev),
                  image_grid_thw=torch.cat([p.grid for p in fits]).to(dev)) if fits else {}
    logits = model.extend(cache, chunk.to(dev), mask=mask.to(dev), last_only=True, **images)          # [B, 1, V]
    if group_size > 1:
        cache.repeat_interleave(group_size)
        logits = logits.repeat_interleave(group_size, dim=0)                                    # [B*G, 1, V]
    return cache, logits


def _next_tokens(raw, rows, live, env, generator, logits_processor):
    """One token per live row from its logits raw [R, V] -> (ids, log p under the sampling policy) as lists."""
    cfg = env.cfg
    if logits_processor is not None:
        views = [(r, len(row.turns), row.turn) for r, row in zip(live, rows)]
        nxt, _ = _pick(logits_processor(views, raw.clone()), cfg, generator, env.banned)
        lp = logprobs.policy_logprobs(raw, nxt, env.banned, _temperature(cfg))
    else:
        nxt, lp = _pick(raw, cfg, generator, env.banned)                                         # [R], [R]
    return nxt.tolist(), lp.tolist()


def _add_token(row, t, lp, env):
    """Append sampled token t to the row's turn. Returns (the ids to feed back next, the new crop's (pixel_values,
    grid) or None, whether the turn ended): [t] while the turn goes on; when it ends, [t] + the environment's reply,
    or [] when the conversation is over."""
    cfg = env.cfg
    bad = t in env.unusable           # the turn ends before it: the token is never fed back nor trained on
    if not bad:
        row.turn.append(t)
        row.turn_lp.append(lp)
    stopped = t in env.stop_ids
    full = len(row.ids) + len(row.turn) >= cfg.max_model_len
    if not stopped and not full and not bad and len(row.turn) < cfg.max_new_tokens:
        return [t], None, False
    reply, image = _end_turn(row, t if stopped else None, bad, env)
    return ([t] + reply if reply is not None else []), image, True


def _end_turn(row, stop_token, bad, env):
    """Record the finished turn; run the zoom tool if it called it. Returns (the environment's reply tokens, or None
    when the conversation ends; the crop's (pixel_values, grid) or None)."""
    cfg, tok = env.cfg, env.tok
    body = row.turn[:-1] if stop_token is not None else row.turn
    text = tok.decode(body, skip_special_tokens=True)
    row.append(row.turn, True, row.turn_lp)
    info = dict(text=text, n_tokens=len(row.turn), stop="eos" if stop_token is not None else
                "vision_token" if bad else "length", tool_call=has_tool_call(text) and not bad)
    row.turn, row.turn_lp = [], []
    row.turns.append(info)
    reply, z = None, None
    if info["tool_call"] and len(row.turns) < cfg.max_turns:
        z = zoom(row.prompt.main_dev, text, cfg, keep=cfg.keep_images)
        row.n_zooms += 1
        info.update(box=z["box"], status=z["status"], message=z["message"],
                    crop_size=list(z["size"]) if z["size"] else None)
        message = error_message(z["message"]) if z["pixel_values"] is None else zoom_message()
        reply = env.turns.after_assistant(stop_token, message, z["grid"])
        if len(row.ids) + len(reply) >= cfg.max_model_len:   # vLLM would refuse the next prompt
            info.update(status="context", message=f"conversation longer than max_model_len {cfg.max_model_len}: "
                                                  f"stopped")
            reply = None
    if reply is None:
        _finish(row, info, text, bad, cfg)
        return None, None
    image = None
    if z["pixel_values"] is not None:
        image = (z["pixel_values"], z["grid"])
        row.pv.append(z["pixel_values"])
        row.grid.append(z["grid"])
        if cfg.keep_images:
            row.images.append(z["image"])
    row.append(reply, False)
    return reply, image


def _finish(row, info, text, bad, cfg):
    """The conversation ends with this turn: an answer, the turn limit, a bad token or the context limit."""
    if info["tool_call"] and "status" not in info:
        row.n_zooms += 1          # the turn limit: this call is never executed (released loop)
        main = row.prompt.main
        info.update(box=parse_zoom(text, main.shape[2], main.shape[1], cfg.enlarge), status="limit",
                    message="turn limit reached")
    row.finished = not info["tool_call"] and not bad
    row.answer = judge_answer(text) if row.finished else ""
    row.done = True


def _compact(cache, live, chunks, rows):
    """Drop finished rows from the cache once a quarter of the live rows (at least one) have finished; until then
    they stay, fed all-padding chunks. Returns the new (live, chunks)."""
    dead = [c for c, r in enumerate(live) if rows[r].done]
    if not dead or len(dead) < max(1, len(live) // 4):
        return live, chunks
    keep = [c for c, r in enumerate(live) if not rows[r].done]
    cache.select(keep)
    return [live[c] for c in keep], [chunks[c] for c in keep]


def _feed(model, cache, chunks, new_images, pad_id, step=None):
    """The step's chunks (ragged: one token, a token + an environment turn, or nothing) -> logits [R, 1, V] at each
    row's last real token; the new crops come in row order. Without a decode `step`: all rows in one padded extend.
    With one (decode.Decoder): the one-token rows through it (the others are its padding rows), then the rows with
    a longer chunk, taken out of the cache, through one extend of their own: a crop turn of one row no longer pads
    every other row of the batch to its length."""
    if step is None:
        return _extend(model, cache, chunks, new_images, pad_id)
    dev = _device(model)
    one = [len(c) == 1 for c in chunks]
    longer = [r for r, c in enumerate(chunks) if len(c) > 1]
    logits = None
    if any(one):
        tokens = torch.tensor([c[0] if len(c) == 1 else pad_id for c in chunks], device=dev)   # [R]
        logits = step(cache, tokens, None if all(one) else torch.tensor(one, device=dev))[:, None]   # [R, 1, V]
    if longer:
        rows = torch.tensor(longer, device=dev)
        part = cache.take(rows)
        out = _extend(model, part, [chunks[r] for r in longer], new_images, pad_id)            # [n, 1, V]
        cache.put(rows, part)
        logits = out.new_zeros(len(chunks), 1, out.shape[-1]) if logits is None else logits
        logits[rows] = out
    return logits


def _extend(model, cache, chunks, new_images, pad_id):
    """Ragged chunks in one padded extend -> logits [R, 1, V] at each row's last real token."""
    dev = _device(model)
    chunk, mask = _pad(chunks, pad_id)
    kw = {}
    if new_images:
        kw = dict(pixel_values=torch.cat([pv for pv, _ in new_images]).to(dev),
                  image_grid_thw=torch.cat([g for _, g in new_images]).to(dev))
    return model.extend(cache, chunk.to(dev), mask=mask.to(dev), last_only=True, **kw)


def _pad(seqs, pad_id):
    """Right-pad token lists -> (ids [B, L] long, mask [B, L] bool); an empty list becomes an all-padding row."""

    L = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = True
    return ids, mask


def rollouts(model, tokenizer, images, questions, group_size, cfg=None, generator=None, messages=None, **overrides):
    """GRPO rollouts: G sampled trajectories per question (temperature 1.0 by default, as the RL recipe samples).
    Same loop as evaluation; see Trajectory for ids / gen_mask / logprobs / images. `messages`: per question the
    first turns (e.g. an RL row's prompt), default build_messages(question)."""
    base = cfg or CofConfig(do_sample=True)
    cfg = CofConfig.from_dict({**{f.name: getattr(base, f.name) for f in fields(CofConfig)}, **overrides})
    return run(model, tokenizer, images, questions, cfg, group_size=group_size, generator=generator, messages=messages)

