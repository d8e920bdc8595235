"""The text half of Qwen2.5-VL's processor: the Qwen2 byte-level BPE tokenizer and the chat layout.

Mirrors transformers' Qwen2Tokenizer (tokenizer.json through the `tokenizers` library, or vocab.json + merges.txt
with tokenizer_config.json's added tokens) and the hub chat template with Qwen2_5_VLProcessor's image-token
expansion: an image of grid (t, h, w) becomes <|vision_start|> + t*h*w/4 <|image_pad|> + <|vision_end|>.
`tokenize_chat` also returns the assistant mask the SFT loss trains on. The pixel half of the processor is in
crop_kernels.py (`preprocess_image`); the network is in model.py.
"""
from __future__ import annotations

import json
import os

import torch
from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers

import checks
import hub
from model import grid_list

# Qwen2's tokenizer pipeline (transformers' Qwen2Tokenizer rebuilds exactly this around vocab + merges).
QWEN_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                          r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Added tokens in Qwen2.5-VL's id order (151643..151664); the first 14 are "special" (skipped by decode).
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                       "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                       "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                     "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
VISION_TOKENS_TEXT = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
# The Qwen2-VL / Qwen2.5-VL chat template (hub chat_template.json).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content "
    "or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' "
    "or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")


class Tokenizer:
    """Qwen2 byte-level BPE from tokenizer.json (through `tokenizers`), with the special-token ids as attributes."""

    def __init__(self, tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"):
        self.tok = tok

        def tid(s):
            i = tok.token_to_id(s)
            if i is None:
                raise ValueError(f"tokenizer has no {s!r} token; a Qwen2.5-VL tokenizer.json must define it")
            return i

        self.im_start_id, self.im_end_id = tid("<|im_start|>"), tid("<|im_end|>")
        self.vision_start_id, self.vision_end_id = tid("<|vision_start|>"), tid("<|vision_end|>")
        self.image_pad_id, self.video_pad_id = tid("<|image_pad|>"), tid("<|video_pad|>")
        self.endoftext_id = tid("<|endoftext|>")
        self.eos_id, self.pad_id = tid(eos_token), tid(pad_token)
        self.tool_call_id = tok.token_to_id("<tool_call>")     # None where the vocabulary has none

    @classmethod
    def from_pretrained(cls, dir_or_id) -> "Tokenizer":
        """tokenizer.json, or (like transformers' Qwen2Tokenizer) vocab.json + merges.txt with the added tokens of
        tokenizer_config.json's added_tokens_decoder; eos/pad tokens from tokenizer_config.json."""
        directory = hub.resolve_checkpoint(dir_or_id)
        path = os.path.join(directory, "tokenizer.json")
        tc = {}
        cfg_path = os.path.join(directory, "tokenizer_config.json")
        if os.path.exists(cfg_path):
            try:
                with open(cfg_path, encoding="utf-8") as f:
                    tc = json.load(f)
            except ValueError as e:
                raise hub.CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
            tc = tc if isinstance(tc, dict) else {}
        if os.path.exists(path):
            try:
                tok = HFTokenizer.from_file(path)
            except Exception as e:  # tokenizers raises its own Exception type for unreadable files
                raise hub.CheckpointError(f"{path}: not a tokenizers file ({e})") from None
        elif os.path.exists(os.path.join(directory, "vocab.json")) and os.path.exists(os.path.join(directory, "merges.txt")):
            tok = _qwen_bpe_from_files(directory, tc.get("added_tokens_decoder") or {})
        else:
            raise FileNotFoundError(f"{directory}: no tokenizer.json, and no vocab.json + merges.txt to build it from")
        kw = {}
        for k in ("eos_token", "pad_token"):
            v = tc.get(k)
            v = v.get("content") if isinstance(v, dict) else v
            if isinstance(v, str):
                kw[k] = v
        return cls(tok, **kw)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(checks.string(text, "text", empty=True), add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=False) -> str:
        """Text of token ids (a list or a 1-D tensor). Ids past the tokenizer's vocabulary (a model's padded embedding
        rows, which an untrained model may sample) decode to nothing, as in transformers; a negative or non-integer
        id is a ValueError naming it."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        ids = checks.sequence(ids, "ids", empty=True)
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < 2**32]
        if bad:
            raise ValueError(f"ids must be token ids (whole numbers >= 0), got {bad[:5]!r:.200}")
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def tokenize_chat(tokenizer: Tokenizer, messages: list[dict], image_grid_thw=None, add_generation_prompt=False,
                  merge_size=2) -> tuple[list[int], list[bool]]:
    """Render `messages` exactly like Qwen2.5-VL's chat template + processor and tokenize.

    messages: [{"role": "system"|"user"|"assistant", "content": str | [{"type": "image"}, {"type": "text", "text": ...}]}]
    image_grid_thw: [n_images, 3] for the images in order of appearance; image i becomes <|vision_start|> +
    t*h*w/merge_size**2 x <|image_pad|> + <|vision_end|>.
    Returns (ids, assistant_mask) where assistant_mask marks assistant content tokens and their closing <|im_end|>.
    """
    grids = grid_list(image_grid_thw)
    parts: list[tuple[str, bool]] = []  # (text, is_assistant_content)
    n_img = 0
    for i, msg in enumerate(checks.sequence(messages, "messages")):
        checks.kind(msg, f"messages[{i}]", dict, "a {role, content} dict")
        role, content = msg.get("role"), msg.get("content")
        if role not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"message {i}: unknown role {role!r}")
        if i == 0 and role != "system":
            parts.append((f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n", False))
        parts.append((f"<|im_start|>{role}\n", False))
        body = []
        if isinstance(content, str):
            body.append(content)
        elif isinstance(content, list):
            for item in content:
                if not isinstance(item, dict):
                    raise ValueError(f"message {i}: content items must be dicts, got {type(item).__name__}")
                if item.get("type") == "image" or "image" in item or "image_url" in item:
                    if n_img >= len(grids):
                        raise ValueError(f"message {i}: image {n_img + 1} has no entry in image_grid_thw "
                                         f"({len(grids)} given)")
                    t, h, w = grids[n_img]
                    n_img += 1
                    body.append("<|vision_start|>" + "<|image_pad|>" * (t * h * w // merge_size ** 2) + "<|vision_end|>")
                elif item.get("type") == "video" or "video" in item:
                    raise NotImplementedError("video content is not supported")
                elif "text" in item:
                    body.append(checks.string(item["text"], f"messages[{i}] text", empty=True))
        else:
            raise ValueError(f"message {i}: content must be a string or a list, got {type(content).__name__}")
        texts = [content] if isinstance(content, str) else [str(item.get("text", "")) for item in content]
        bad = [t for t in VISION_TOKENS_TEXT if any(t in x for x in texts)]
        if bad:
            raise ValueError(f"message {i}: its text holds {bad[0]!r}, a token only the image processor writes "
                             f"(transformers' processor refuses it too); put images in as {{'type': 'image'}}")
        parts.append(("".join(body) + "<|im_end|>", role == "assistant"))
        parts.append(("\n", False))
    if n_img != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} entries but the messages contain {n_img} image(s)")
    if add_generation_prompt:
        parts.append(("<|im_start|>assistant\n", False))
    text = "".join(p for p, _ in parts)
    enc = tokenizer.tok.encode(text, add_special_tokens=False)
    # char spans of assistant content; a token belongs to it if its span overlaps one (tokenized as one string,
    # exactly like the processor, so BPE merges across part boundaries are the same as transformers')
    spans, pos = [], 0
    for p, a in parts:
        if a:
            spans.append((pos, pos + len(p)))
        pos += len(p)
    mask = []
    for s, e in enc.offsets:
        mask.append(any(s < b and e > a for a, b in spans))
    return enc.ids, mask


def qwen_bpe(vocab=None, merges=None):
    """An empty (or vocab/merges-filled) byte-level BPE with Qwen2's normalizer, pre-tokenizer and decoder."""
    tok = HFTokenizer(models.BPE(vocab, merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                                 end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _qwen_bpe_from_files(directory, added):
    """vocab.json + merges.txt -> the tokenizer transformers' Qwen2Tokenizer builds, with the added tokens of
    `added` ({id: {content, special, ...}}, tokenizer_config.json's added_tokens_decoder) at their ids."""
    try:
        vocab, merges = models.BPE.read_file(os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"))
    except Exception as e:  # tokenizers' own exception type
        raise hub.CheckpointError(f"{directory}: vocab.json / merges.txt cannot be read ({e})") from None
    tok = qwen_bpe(vocab, merges)
    for i, t in sorted(((int(i), t) for i, t in added.items()), key=lambda x: x[0]):
        if not isinstance(t, dict) or not isinstance(t.get("content"), str):
            raise hub.CheckpointError(f"{directory}/tokenizer_config.json: added token {i} has no 'content'")
        tok.add_tokens([AddedToken(t["content"], special=bool(t.get("special")), normalized=False,
                                   lstrip=bool(t.get("lstrip")), rstrip=bool(t.get("rstrip")),
                                   single_word=bool(t.get("single_word")))])
        if tok.token_to_id(t["content"]) != i:
            raise hub.CheckpointError(f"{directory}: added token {t['content']!r} should have id {i} but got "
                                  f"{tok.token_to_id(t['content'])} (vocab.json holds {len(vocab)} entries)")
    return tok
