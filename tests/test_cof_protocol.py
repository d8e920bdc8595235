"""Protocol tests for cof.py that need no model: the released strings, box parsing against a line-by-line
transcription of the released parser on a corpus of malformed outputs, the crop-size rule against qwen-vl-utils'
smart_resize and PIL, the fallbacks, answer extraction and matching."""
import hashlib
import json
import math
import re

import pytest
import torch
from PIL import Image

import cof
import crop_kernels as ck
import evaluate as E

# sha256 of the released strings (eval/vstar/vllm_inference.py), computed from shared/reference/cof_prompts.json.
SYSTEM_SHA = "7741881df5c8718aa767b57ab9ac7db3bbeb584c949adf90658f7a1adae61aae"
USER_SHA = "085ffff308db0a2074bf62463c2c66c6b2909ac8141a4037d498fc21147bd6dc"


# ---- a transcription of the released code (vllm_inference.py), the oracle ------------------------------------------

def released_check(bbox, w, h):
    if not isinstance(bbox, list):
        return False
    if len(bbox) != 4:
        return False
    if not all(isinstance(c, (int, float)) for c in bbox):
        return False
    x0, y0, x1, y1 = bbox
    if not (0 <= x0 < w and 0 <= y0 < h and 0 < x1 <= w and 0 < y1 <= h):
        return False
    if x1 <= x0 or y1 <= y0:
        return False
    return True


def released_find(outputs_string, W, H, enlarge_factor=1):
    """find_absolute_bboxes; exceptions other than JSONDecodeError escape, as upstream."""
    m = re.search(r"<tool_call>(.*?)</tool_call>", outputs_string, re.DOTALL)
    if not m:
        return None
    content = m.group(1).strip()
    try:
        data = json.loads(content)
        x0, y0, x1, y1 = data["arguments"]["bbox_2d"]
    except json.JSONDecodeError:
        return None
    if not released_check([x0, y0, x1, y1], W, H):
        return None
    if enlarge_factor != 1:
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        bw, bh = (x1 - x0) * enlarge_factor, (y1 - y0) * enlarge_factor
        x0, y0 = max(0, cx - bw / 2), max(0, cy - bh / 2)
        x1, y1 = min(W, cx + bw / 2), min(H, cy + bh / 2)
    return [int(x0), int(y0), int(x1), int(y1)]


def released_stage(outputs_string, W, H):
    """Where the transcription above leaves find_absolute_bboxes for this text: "no block" (no tool call), "json"
    (JSONDecodeError, returns None), "deep" (RecursionError escapes), "shape" (no arguments.bbox_2d of 4 values:
    the exception escapes), "bbox" (check_absolute_bbox_format fails, returns None) or "ok"."""
    m = re.search(r"<tool_call>(.*?)</tool_call>", outputs_string, re.DOTALL)
    if not m:
        return "no block"
    try:
        data = json.loads(m.group(1).strip())
    except json.JSONDecodeError:
        return "json"
    except RecursionError:
        return "deep"
    try:
        x0, y0, x1, y1 = data["arguments"]["bbox_2d"]
    except Exception:  # noqa: BLE001
        return "shape"
    return "ok" if released_check([x0, y0, x1, y1], W, H) else "bbox"


# the message find_box gives for each stage: exact, or its start (the rest quotes the error or the box)
STAGE_MESSAGES = {"no block": ("Invalid tool call: no <tool_call>...</tool_call> block found.", True),
                  "json": ("Invalid tool call: the <tool_call> content is not valid JSON (", False),
                  "deep": ("Invalid tool call: the <tool_call> JSON is nested too deeply.", True),
                  "shape": ('Invalid tool call: expected {"name": "image_zoom_in_tool", "arguments": {"bbox_2d": '
                            '[x1, y1, x2, y2]}} (', False),
                  "bbox": ("Invalid bounding box: Bounding box ", False),
                  "ok": ("ok", True)}


def qvu_smart_resize(height, width, factor=28, min_pixels=4 * 28 * 28, max_pixels=16384 * 28 * 28):
    """qwen_vl_utils.vision_process.smart_resize (0.0.10)."""
    def round_by_factor(n, f): return round(n / f) * f
    def ceil_by_factor(n, f): return math.ceil(n / f) * f
    def floor_by_factor(n, f): return math.floor(n / f) * f
    if max(height, width) / min(height, width) > 200:
        raise ValueError("ratio")
    h_bar = max(factor, round_by_factor(height, factor))
    w_bar = max(factor, round_by_factor(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = floor_by_factor(height / beta, factor)
        w_bar = floor_by_factor(width / beta, factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = ceil_by_factor(height * beta, factor)
        w_bar = ceil_by_factor(width * beta, factor)
    return h_bar, w_bar


def call(b, name="image_zoom_in_tool"):
    return f'<tool_call>\n{{"name": "{name}", "arguments": {{"bbox_2d": {b}}}}}\n</tool_call>'


W, H = 1000, 800
GOOD = '<think>look</think> ' + call("[100, 200, 300, 400]")
# (text, expected status) -- expected box comes from the oracle
CORPUS = [
    ("no tool call at all", "none"),
    ("<think>I can see it.</think> <answer>A</answer>", "none"),
    ("<tool_call>", "none"),                                              # opened, never closed
    ("</tool_call><tool_call>", "none"),
    ("<tool_call></tool_call>", "none"),                                  # empty JSON
    ("<tool_call>not json</tool_call>", "none"),
    ('<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1, 2, 3, 4]}</tool_call>', "none"),  # brace
    ('<tool_call>{"name": "image_zoom_in_tool" "arguments": {}}</tool_call>', "none"),     # missing comma
    ("<tool_call>{'name': 'image_zoom_in_tool', 'arguments': {'bbox_2d': [1, 2, 3, 4]}}</tool_call>", "none"),  # py dict
    ('<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1, 2, 3, 4],}}</tool_call>', "none"),  # trailing
    (call("[100, 200, 300]"), "error"),                                   # 3 numbers
    (call("[100, 200, 300, 400, 500]"), "error"),                         # 5 numbers
    (call("[]"), "error"),
    (call("100"), "error"),                                               # a number, not a list
    (call('"100, 200, 300, 400"'), "error"),                              # a string of 18 chars: unpack fails
    (call('"abcd"'), "none"),                                             # 4-char string unpacks into chars
    (call('["100", "200", "300", "400"]'), "none"),                       # strings
    (call('[100, null, 300, 400]'), "none"),
    (call('[[100, 200], [300, 400], 1, 2]'), "none"),                     # nested lists
    (call('{"x0": 1, "y0": 2, "x1": 3, "y1": 4}'), "none"),               # dict with 4 keys
    (call("[-10, 200, 300, 400]"), "none"),                               # negative
    (call("[100, -1, 300, 400]"), "none"),
    (call("[300, 200, 100, 400]"), "none"),                               # inverted x
    (call("[100, 400, 300, 200]"), "none"),                               # inverted y
    (call("[100, 200, 100, 400]"), "none"),                               # zero width
    (call("[100, 200, 1001, 400]"), "none"),                              # outside
    (call("[100, 200, 300, 801]"), "none"),
    (call("[1000, 200, 1000, 400]"), "none"),                             # x0 == W
    (call("[NaN, 200, 300, 400]"), "none"),
    (call("[100, 200, Infinity, 400]"), "none"),
    (call("[1e400, 200, 300, 400]"), "none"),                             # huge float -> inf
    (call("[100, 200, 99999999999999999999999999999, 400]"), "none"),    # huge int
    (call("[true, true, 300, 400]"), "ok"),                               # bools pass upstream (bool is an int)
    (call("[0, 0, 1000, 800]"), "ok"),                                    # whole image
    (call("[0.5, 0.5, 0.6, 0.6]"), "ok"),                                 # tiny box (normalised coords)
    (call("[100.7, 200.2, 300.9, 400.5]"), "ok"),                         # floats
    (call("[999, 799, 1000, 800]"), "ok"),                                # corner pixel
    ('<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox": [1, 2, 3, 4]}}</tool_call>', "error"),  # key
    ('<tool_call>{"name": "image_zoom_in_tool"}</tool_call>', "error"),   # no arguments
    ('<tool_call>[1, 2, 3, 4]</tool_call>', "error"),                     # a bare list
    ('<tool_call>"text"</tool_call>', "error"),                           # a JSON string
    ('<tool_call>{"name": "x", "arguments": "{\\"bbox_2d\\": [1,2,3,4]}"}</tool_call>', "error"),  # args as string
    ('<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1, 2, 30, 40]}}</tool_call> '
     + call("[500, 500, 600, 600]"), "ok"),                               # several calls: the first counts
    (call("[9999, 0, 1, 1]") + " " + call("[100, 200, 300, 400]"), "none"),  # first invalid, second valid: none
    ("<tool_call>" + call("[100, 200, 300, 400]") + "</tool_call>", "none"),  # nested tool calls
    ('<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1, 2, 3, 4], "bbox_2d": [5, 6, 70, 80]}}'
     '</tool_call>', "ok"),                                               # duplicate key: the last wins
    (call("[100, 200, 300, 400]", name="other_tool"), "ok"),             # tool name is not checked upstream
    ("<tool_call>\n```json\n" + '{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1, 2, 3, 4]}}'
     + "\n```\n</tool_call>", "none"),                                    # markdown fence
    ("<tool_call>" + "[" * 100000 + "]" * 100000 + "</tool_call>", "error"),  # nesting too deep
    ('<TOOL_CALL>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1, 2, 3, 4]}}</TOOL_CALL>', "none"),
    (GOOD, "ok"),
    ("<think>a</think>\n" + call("[100, 200, 300, 400]") + "\n<answer>B</answer>", "ok"),  # call plus answer
]


def test_prompts_are_the_released_strings():
    assert hashlib.sha256(cof.SYSTEM_PROMPT.encode()).hexdigest() == SYSTEM_SHA
    assert hashlib.sha256(cof.USER_PROMPT.encode()).hexdigest() == USER_SHA
    tools = re.search(r"<tools>\n(.*)\n</tools>", cof.SYSTEM_PROMPT).group(1)
    assert json.loads(tools)["function"]["name"] == "image_zoom_in_tool"
    msgs = cof.build_messages("What is it?\n(A) x\n(B) y")
    assert msgs[0] == {"role": "system", "content": cof.SYSTEM_PROMPT}
    assert msgs[1]["content"][0] == {"type": "image"}                    # image first, then text
    assert msgs[1]["content"][1]["text"] == "Question: What is it?\n(A) x\n(B) y" + cof.USER_PROMPT
    assert cof.zoom_message()["content"][1]["text"] == cof.USER_PROMPT


def test_rl_prompt_hint_rule():
    q = "Which?\n(A) red\n(B) blue"
    assert cof.rl_prompt(q, "A") == "<image> Question: " + q + cof.LETTER_HINT + cof.USER_PROMPT
    assert cof.rl_prompt("What colour is it?", "red").endswith(cof.PHRASE_HINT + cof.USER_PROMPT)
    assert cof.rl_prompt("Which? A. red B. blue", "b").count(cof.LETTER_HINT) == 1
    assert cof.rl_prompt(q, "M").count(cof.PHRASE_HINT) == 1             # letters A-L only


def test_corpus_size_and_oracle_agreement():
    statuses = [want for _, want in CORPUS]
    assert (len(CORPUS), statuses.count("none"), statuses.count("error"), statuses.count("ok")) == (52, 31, 11, 10)
    stages = {released_stage(text, W, H) for text, _ in CORPUS}
    assert stages == set(STAGE_MESSAGES)                                # every exit of the released parser is hit
    for text, want in CORPUS:
        try:
            ref, raised = released_find(text, W, H, 1.5), False
        except Exception:  # noqa: BLE001
            ref, raised = None, True
        box, status, msg = cof.find_box(text, W, H, 1.5)
        assert status == want, (text[:120], status, msg)
        assert (status == "error") == raised, text[:120]
        assert (list(box) if box else None) == ref, text[:120]
        assert cof.parse_zoom(text, W, H) == box
        stage = released_stage(text, W, H)
        assert status == {"no block": "none", "json": "none", "bbox": "none", "deep": "error", "shape": "error",
                          "ok": "ok"}[stage], text[:120]
        expected, exact = STAGE_MESSAGES[stage]
        assert (msg == expected) if exact else msg.startswith(expected), (text[:120], stage, msg)


def test_parse_values():
    # centre (200, 300), size 200x200 -> 300x300 about the centre
    assert cof.parse_zoom(GOOD, W, H) == (50, 150, 350, 450)
    assert cof.parse_zoom(GOOD, W, H, enlarge=1) == (100, 200, 300, 400)
    # clipped at the border, truncated to int
    assert cof.parse_zoom(call("[0, 0, 1000, 800]"), W, H) == (0, 0, 1000, 800)
    assert cof.parse_zoom(call("[900.5, 700.5, 1000, 800]"), W, H) == (875, 675, 1000, 800)
    assert cof.parse_zoom(call("[100.7, 200.2, 300.9, 400.5]"), W, H, enlarge=1) == (100, 200, 300, 400)
    assert "x1 (1001) > image width (1000)" in cof.find_box(call("[100, 200, 1001, 400]"), W, H)[2]


@pytest.mark.parametrize("box", [(0, 0, 1000, 800), (10, 20, 40, 60), (0, 0, 3, 500), (5, 5, 6, 6), (0, 0, 2, 700),
                                 (100, 100, 2100, 150), (0, 0, 5000, 4000)])
def test_crop_size_rule_matches_qwen_vl_utils(box):
    x0, y0, x1, y1 = box
    try:
        want = qvu_smart_resize((y1 - y0) * 2, (x1 - x0) * 2, 28, 112 * 112, 3840 * 3840)
    except (ValueError, ZeroDivisionError):
        with pytest.raises((ValueError, ZeroDivisionError)):
            cof.zoom_size(box)
        return
    assert cof.zoom_size(box) == want
    h, w = want
    assert h % 28 == 0 and w % 28 == 0 and h * w >= 112 * 112 and h * w <= 3840 * 3840


def test_main_size_and_differences_from_transformers():
    assert cof.main_size(1582, 2246) == qvu_smart_resize(1582, 2246, 28, 12544, 3840 * 3840) == (1568, 2240)
    assert cof.main_size(5000, 8000) == qvu_smart_resize(5000, 8000, 28, 12544, 3840 * 3840)
    # where qwen-vl-utils and transformers disagree, the released code (qwen-vl-utils) wins
    assert cof.released_smart_resize(13, 2000, 28, 12544, 3840 * 3840) == qvu_smart_resize(13, 2000, 28, 12544, 3840 ** 2)
    assert cof.released_smart_resize(13, 2000, 28, 12544, 3840 * 3840) != ck.smart_resize(13, 2000, 28, 12544, 3840 ** 2)


def _img(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


def test_zoom_pixels_match_pil_crop_then_resize():
    main = _img(280, 336)
    pil = ck.to_pil(main)
    cfg = cof.CofConfig()
    z = cof.zoom(main, call("[40, 50, 120, 110]"), cfg, keep=True)
    assert z["status"] == "ok" and z["box"] == (20, 35, 140, 125)
    x0, y0, x1, y1 = z["box"]
    h, w = qvu_smart_resize((y1 - y0) * 2, (x1 - x0) * 2, 28, 12544, 3840 * 3840)
    ref = ck.from_pil(pil.crop(z["box"]).resize((w, h), Image.Resampling.LANCZOS))
    assert torch.equal(z["image"], ref)
    pv, grid = ck.patchify(ref)
    assert torch.equal(z["pixel_values"], pv) and grid.tolist() == z["grid"].tolist() == [[1, h // 14, w // 14]]


def test_invalid_box_fallbacks():
    main = _img(224, 280)
    cfg = cof.CofConfig()
    # released "none": crop(None) = the whole image, upscaled x2 through the crop rule
    z = cof.zoom(main, call("[0, 0, 9999, 10]"), cfg, keep=True)
    assert z["status"] == "none" and z["box"] is None
    assert z["size"] == qvu_smart_resize(448, 560, 28, 12544, 3840 * 3840)
    ref = ck.from_pil(ck.to_pil(main).resize((z["size"][1], z["size"][0]), Image.Resampling.LANCZOS))
    assert torch.equal(z["image"], ref)
    # released "error" (the parser raised): the resized main image as it is
    z = cof.zoom(main, call("[1, 2, 3]"), cfg, keep=True)
    assert z["status"] == "error" and torch.equal(z["image"], main)
    # a crop the size rule cannot take (aspect ratio > 200 after enlarging): do_crop's except -> the main image
    z = cof.zoom(_img(28, 5600), call("[0, 0, 5600, 1]"), cfg, keep=True)
    assert z["status"] == "error" and z["image"].shape == (3, 28, 5600)
    # RL option: a text turn, no image
    z = cof.zoom(main, call("[0, 0, 9999, 10]"), cof.CofConfig(invalid="text"))
    assert z["pixel_values"] is None and z["message"].startswith("Invalid bounding box")


def test_extract_answer():
    assert cof.extract_answer("<think>x</think> <answer> A </answer>") == "A"
    assert cof.extract_answer("<answer>A</answer> then <answer>\n(B) cotton\n</answer>") == "(B) cotton"
    assert cof.extract_answer("no answer here") == ""
    assert cof.extract_answer("<answer>unclosed") == ""
    assert cof.extract_answer(None) == ""


@pytest.mark.parametrize("pred,label,ok", [
    ("A", "A", True), ("B", "A", False), ("a", "A", False), ("A.", "A", True), ("(A)", "A", True), ("(B)", "A", False),
    ("(A) rubber", "A", True), ("The answer is (A) rubber.", "A", True), ("rubber", "A", True), ("Rubber.", "A", True),
    ("cotton", "A", False), ("A. rubber", "A", True), ("B. cotton", "A", False), ("", "A", False),
    ("I am not sure", "A", False)])
def test_match_answer(pred, label, ok):
    options = E.parse_options("What is the material of the glove?\n(A) rubber\n(B) cotton\n(C) kevlar\n(D) leather")
    assert options == {"A": "rubber", "B": "cotton", "C": "kevlar", "D": "leather"}
    assert E.match_answer(pred, label, options) is ok


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown CofConfig keys"):
        cof.CofConfig.from_dict({"max_turn": 3})
    with pytest.raises(ValueError):
        cof.CofConfig(invalid="retry")
