"""Chain-of-Focus: the zoom loop, batched rollouts for GRPO, and benchmark evaluation.

Reproduces the released CoF evaluation protocol (xtong-zhang/Chain-of-Focus `eval/vstar/vllm_inference.py`,
`judge_result.py`) and serves the RL recipe (`verl/recipe/zoomin/zoomin_vision_tool.py`,
`prepare_zoomin_data.py`):

* the system prompt with the `image_zoom_in_tool` schema and the user-prompt suffix, byte for byte;
* the main image smart-resized (qwen-vl-utils rules, min 112*112, max 3840*3840 pixels, LANCZOS);
* each turn's first `<tool_call>` JSON parsed for `arguments.bbox_2d` in absolute pixels of that resized image,
  validated like `check_absolute_bbox_format`, enlarged x1.5 about its centre, clipped, truncated to int;
* the crop taken from the resized main image (never from a previous crop), upscaled x2 and smart-resized in one
  LANCZOS resize, and sent back as a new user turn `[crop, USER_PROMPT]`;
* at most 6 generations (zooms), greedy, 512 new tokens per turn; the answer is the last `<answer>...</answer>`.

Unlike the released code (vLLM, re-encoding the chat every turn), the loop here keeps ONE KV cache per
conversation (`model.extend` with ragged masks) and runs many conversations as one batch.

Layout: protocol (prompts, box parsing, crop rule, answers) -> loop / rollouts -> benchmarks -> trace -> CLI.
"""
from __future__ import annotations

import json
import math
import re

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
FACTOR = 28                      # patch_size * merge_size
MAIN_MIN_PIXELS = 112 * 112      # --min_resolution 112 (slurm_jobs/eval/inference_vstar.sh)
MAIN_MAX_PIXELS = 3840 * 3840    # resize_image default
ENLARGE = 1.5                    # --enlarge_factor
SCALEUP = 2                      # --scaleup_factor
MAX_TURNS = 6                    # max_iterations: generations per question (each but the last may zoom)
MAX_NEW_TOKENS = 512             # --max_new_tokens
# vLLM hands the (already resized) image to the checkpoint's HF image processor, which smart-resizes it again
# with its own limits (Qwen2.5-VL preprocessor_config.json: 4*28*28 .. 16384*28*28, BICUBIC). That is a no-op
# unless the first resize produced more than 12,845,056 pixels.
PROCESSOR_MIN_PIXELS = 4 * 28 * 28
PROCESSOR_MAX_PIXELS = 16384 * 28 * 28

# ----------------------------------------------------------------------------------------------------------------
# Prompts / messages (HF-style dicts, rendered by model.tokenize_chat)


def question_text(question):
    """The released eval user text: `Question: {text}{USER_PROMPT}` (text already ends with the answer hint)."""
    return f"Question: {question}{USER_PROMPT}"


def build_messages(question, system=True):
    """The released first turns: system prompt, then the user turn `[image, "Question: ...USER_PROMPT"]`."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}] if system else []
    messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question_text(question)}]})
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
    gt = str(ground_truth)
    letter = (len(gt) == 1 and gt.lower() in "abcdefghijkl"
              and (("(A)" in question and "(B)" in question) or ("A." in question and "B." in question)))
    return "<image>" + " Question: " + question + (LETTER_HINT if letter else PHRASE_HINT) + USER_PROMPT


# ----------------------------------------------------------------------------------------------------------------
# Sizes: qwen-vl-utils' smart_resize (what the released code imports), the main-image rule and the crop rule


def released_smart_resize(height, width, factor=FACTOR, min_pixels=MAIN_MIN_PIXELS, max_pixels=MAIN_MAX_PIXELS):
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
    return released_smart_resize(height, width, FACTOR, min_pixels, max_pixels)


def zoom_size(box, scale=SCALEUP, min_pixels=MAIN_MIN_PIXELS, max_pixels=MAIN_MAX_PIXELS):
    """(h, w) of the crop sent back for an integer box (x0, y0, x1, y1): the crop's size times `scale`, then
    smart_resize (do_crop). Raises (ValueError / ZeroDivisionError) where the released do_crop fails and falls
    back to the uncropped main image: an empty crop or an aspect ratio above 200."""
    x0, y0, x1, y1 = box
    return released_smart_resize((y1 - y0) * scale, (x1 - x0) * scale, FACTOR, min_pixels, max_pixels)


# ----------------------------------------------------------------------------------------------------------------
# Box parsing (find_absolute_bboxes + check_absolute_bbox_format)

_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


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
    m = _TOOL_CALL.search(text)
    if not m:
        return None, "none", "Invalid tool call: no <tool_call>...</tool_call> block found."
    try:
        data = json.loads(m.group(1).strip())
    except json.JSONDecodeError as e:
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

_ANSWER = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
_OPTION = re.compile(r"\(([A-Z])\)\s+([^\n]+)")


def extract_answer(text):
    """Content of the last <answer>...</answer>, stripped; "" when there is none."""
    found = _ANSWER.findall(text or "")
    return found[-1] if found else ""


def parse_options(question):
    """{"A": "rubber", ...} from V*-style "(A) rubber" lines (judge_result.extract_options, any letter)."""
    return {k: v.strip() for k, v in _OPTION.findall(question)}


def _norm(s):
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", s.lower())).strip()


def match_answer(pred, label, options=None):
    """Rule-based correctness of an extracted answer against the letter `label` (no LLM judge).

    The released rules first (judge_result.py): a 1-character answer equal to the letter, a 2-character answer
    with "." containing it ("A."), a 3-character answer with parentheses ("(A)"), or "(A) <option text>" inside
    the answer. Then, standing in for the LLM judge: the answer starts with the letter as "A." / "A)" / "(A)" /
    "A:" / "A " followed by text, or equals the option text (case, punctuation and spacing ignored)."""
    pred, label = (pred or "").strip(), label.strip()
    options = options or {}
    if len(pred) == 1:
        return pred == label
    if len(pred) == 2 and "." in pred:
        return label in pred
    if len(pred) == 3 and "(" in pred and ")" in pred:
        return label in pred
    if label in options and f"({label}) {options[label]}" in pred:
        return True
    texts = {k: _norm(v) for k, v in options.items()}
    if _norm(pred) and _norm(pred) in texts.values():
        return _norm(pred) == texts.get(label)
    m = re.match(r"^\(?([A-Z])(?:[).:]|\s)", pred)
    return bool(m) and m.group(1) == label
