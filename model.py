"""Qwen2.5-VL written directly against Hugging Face safetensors checkpoints.

Mirrors transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py (Qwen2_5_VLForConditionalGeneration, v5.24 math, which
is the v4.49+ math for images) and the Qwen2.5-VL chat template + processor (processing_qwen2_5_vl.py):

- config:   `ModelConfig.from_hf(dict)` reads both config.json layouts (hub flat layout with `rope_scaling.mrope_section`
            and legacy vision keys; the nested `text_config` layout transformers 5 writes).
- weights:  `Qwen25VL.from_pretrained(dir_or_hub_id)`: single file or sharded index, an explicit name -> shape table,
            loaded tensor by tensor straight into the requested dtype/device.
- vision:   Conv3d patch embed, 2-D rotary, window attention batched per layer (one SDPA call per window size),
            full-attention blocks per image frame, RMSNorm, SwiGLU with bias, 2x2 patch merger.
- text:     Qwen2 decoder (GQA, q/k/v bias), M-RoPE with 3-D position ids, image features scattered into
            <|image_pad|> slots, left padding / arbitrary attention masks.
- cache:    `KVCache` + `Qwen25VL.extend` append ragged chunks (with new images) per row; decode.py builds
            generation on it.

The processor's two halves live beside it: the tokenizer and chat layout in tokenizer.py, the pixels (smart_resize,
resize, patchify, the checkpoint's pixel limits) in crop_kernels.py. Below it, hub.py reads and writes the checkpoint
directory's files and logprobs.py scores chosen tokens through the head in chunks (`forward(..., targets=...)`).
`data/tiny.py` writes random models in this format for the tests; `python bench.py model` times this file against
transformers.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

import checks
import crop_kernels as ck
import hub
import logprobs

# ---- Config --------------------------------------------------------------------------------------------------------

# config.json keys we read elsewhere or that do not change the image/text math (kept out of the "unknown key" warning).
_HF_TOP_IGNORED = {
    "architectures", "torch_dtype", "dtype", "transformers_version", "use_cache", "attention_dropout", "hidden_act",
    "initializer_range", "sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "vision_token_id",
    "model_type", "text_config", "vision_config", "rope_scaling", "rope_parameters", "rope_theta", "_name_or_path",
    "output_attentions", "output_hidden_states", "return_dict", "head_dim", "chunk_size_feed_forward", "is_encoder_decoder",
    "id2label", "label2id", "problem_type", "tokenizer_class", "pad_token_id", "bos_token_id", "eos_token_id",
    "tie_word_embeddings", "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
    "max_position_embeddings", "_attn_implementation_autoset", "attn_implementation", "keys_to_ignore_at_inference",
}
_HF_VISION_IGNORED = {"model_type", "hidden_act", "initializer_range", "in_chans", "spatial_patch_size", "embed_dim",
                      "torch_dtype", "dtype", "rope_parameters", "_name_or_path", "transformers_version", "attn_implementation",
                      "num_attention_heads", "num_hidden_layers", "in_channels"}


def _check_sizes(cfg, where, floats=()):
    """Every int field of a config dataclass is a whole number >= 1 and every name in `floats` a finite number > 0
    (a config.json with NaN, 0 heads, 3.5 layers or a string fails here, naming the field)."""
    for f in dataclasses.fields(cfg):
        if f.name in floats:
            checks.number(getattr(cfg, f.name), f"{where}: {f.name}", lo=0, lo_open=True)
        elif f.type in ("int", int):
            checks.number(getattr(cfg, f.name), f"{where}: {f.name}", lo=1, whole=True)


@dataclass
class VisionConfig:
    """Vision tower dims (`vision_config` in config.json). Defaults are transformers' class defaults."""
    hidden_size: int
    out_hidden_size: int
    intermediate_size: int
    depth: int = 32
    num_heads: int = 16
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple = (7, 15, 23, 31)
    tokens_per_second: int = 4
    rope_theta: float = 10000.0

    def __post_init__(self):
        _check_sizes(self, "vision_config", floats=("rope_theta",))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if not isinstance(self.fullatt_block_indexes, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.depth for i in self.fullatt_block_indexes):
            raise ValueError(f"vision_config.fullatt_block_indexes must be block indices in [0, {self.depth}), got "
                             f"{self.fullatt_block_indexes!r}")
        self.fullatt_block_indexes = tuple(self.fullatt_block_indexes)


@dataclass
class TextConfig:
    """Qwen2 decoder dims (top level of the hub config.json, or `text_config`). Defaults are transformers' class defaults."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int = 8
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1_000_000.0
    mrope_section: tuple = (16, 24, 24)
    max_position_embeddings: int = 32768

    def __post_init__(self):
        _check_sizes(self, "text config", floats=("rms_norm_eps", "rope_theta"))
        if not isinstance(self.mrope_section, (list, tuple)) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in self.mrope_section):
            raise ValueError(f"mrope_section must be a list of positive integers, got {self.mrope_section!r}")
        self.mrope_section = tuple(self.mrope_section)
        hd = self.hidden_size // self.num_attention_heads
        if hd * self.num_attention_heads != self.hidden_size:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if 2 * sum(self.mrope_section) != hd:
            raise ValueError(f"mrope_section {list(self.mrope_section)} must sum to head_dim/2 = {hd // 2}")


@dataclass
class ModelConfig:
    """Whole-model config: text + vision dims, token ids, tying."""
    text: TextConfig
    vision: VisionConfig
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int | None = 151643
    eos_token_id: int | list | None = 151645
    pad_token_id: int | None = None
    torch_dtype: str | None = None

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Read a transformers config dict in either layout (flat hub layout or nested `text_config`)."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        mt = d.get("model_type")
        if mt != "qwen2_5_vl":
            raise ValueError(f"{source}: model_type is {mt!r}, expected 'qwen2_5_vl' (Qwen2.5-VL). "
                             f"This loader implements only Qwen2.5-VL; Qwen2-VL/Qwen3-VL checkpoints differ.")
        text = d.get("text_config") or {k: v for k, v in d.items() if k not in ("vision_config",)}
        vis = d.get("vision_config")
        if not isinstance(vis, dict):
            raise ValueError(f"{source}: missing 'vision_config' section")
        if not isinstance(text, dict):
            raise ValueError(f"{source}: text_config must be an object, got {type(text).__name__}")
        text_keys = _HF_TOP_IGNORED | {f.name for f in dataclasses.fields(TextConfig)}
        vision_keys = _HF_VISION_IGNORED | {f.name for f in dataclasses.fields(VisionConfig)}
        unknown = sorted(set(d) - text_keys)
        if d.get("text_config"):
            unknown += [f"text_config.{k}" for k in sorted(set(text) - text_keys)]
        unknown += [f"vision_config.{k}" for k in sorted(set(vis) - vision_keys)]
        if unknown:
            warnings.warn(f"{source}: ignoring keys this implementation does not use: {unknown}")
        for section, keys, where in (
                (text, ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"],
                 "text_config" if d.get("text_config") else "the top level"),
                (vis, ["hidden_size", "out_hidden_size", "intermediate_size"], "vision_config")):
            missing = [k for k in keys if section.get(k) is None]
            if missing:
                raise ValueError(f"{source}: missing required field(s) {missing} in {where}")
        rope = text.get("rope_parameters") or text.get("rope_scaling") or d.get("rope_scaling") or {}
        if "mrope_section" not in rope:
            raise ValueError(f"{source}: missing rope_scaling.mrope_section (or text_config.rope_parameters.mrope_section)")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ValueError(f"{source}: rope type {rope_type!r} is not supported (only plain M-RoPE)")
        tkw = {k: text[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                    "num_attention_heads", "rms_norm_eps", "max_position_embeddings") if k in text}
        # transformers: absent -> class default 8; present but null -> num_attention_heads
        tkw["num_key_value_heads"] = ((text.get("num_key_value_heads") or text["num_attention_heads"])
                                      if "num_key_value_heads" in text else 8)
        tkw["rope_theta"] = float(rope.get("rope_theta", text.get("rope_theta", d.get("rope_theta", 1_000_000.0))))
        tkw["mrope_section"] = rope["mrope_section"]
        vkw = {k: vis[k] for k in ("hidden_size", "out_hidden_size", "intermediate_size", "depth", "num_heads",
                                   "patch_size", "temporal_patch_size", "spatial_merge_size", "window_size",
                                   "fullatt_block_indexes", "tokens_per_second") if k in vis}
        if "patch_size" not in vkw and "spatial_patch_size" in vis:
            vkw["patch_size"] = vis["spatial_patch_size"]
        vkw["rope_theta"] = float((vis.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        if vis.get("in_channels", vis.get("in_chans", 3)) != 3:
            raise ValueError(f"{source}: vision in_channels must be 3")
        tie = bool(d.get("tie_word_embeddings", False) or (text.get("tie_word_embeddings", False) if d.get("text_config") else False))
        ids = {k: d[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                                 "bos_token_id", "eos_token_id", "pad_token_id") if k in d}
        ids.update({k: text[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in text and k not in d})
        return cls(text=TextConfig(**tkw), vision=VisionConfig(**vkw), tie_word_embeddings=tie,
                   torch_dtype=d.get("torch_dtype", d.get("dtype")), **ids)

    def to_hf(self) -> dict:
        """The hub's flat config.json layout (what the released checkpoints use; every transformers >= 4.49 reads it)."""
        t, v = self.text, self.vision
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
            "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads, "rms_norm_eps": t.rms_norm_eps, "rope_theta": t.rope_theta,
            "max_position_embeddings": t.max_position_embeddings, "hidden_act": "silu", "attention_dropout": 0.0,
            "use_sliding_window": False, "sliding_window": None, "max_window_layers": t.num_hidden_layers,
            "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
            "tie_word_embeddings": self.tie_word_embeddings, "torch_dtype": self.torch_dtype or "float32",
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
            "image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id, "vision_end_token_id": self.vision_end_token_id,
            "vision_config": {
                "depth": v.depth, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads, "out_hidden_size": v.out_hidden_size, "patch_size": v.patch_size,
                "temporal_patch_size": v.temporal_patch_size, "spatial_merge_size": v.spatial_merge_size,
                "window_size": v.window_size, "fullatt_block_indexes": list(v.fullatt_block_indexes),
                "tokens_per_second": v.tokens_per_second, "in_chans": 3, "hidden_act": "silu",
                "model_type": "qwen2_5_vl"},
        }


# ---- Building blocks -----------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dt = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dt)  # weight multiply after the cast back, like transformers


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


@functools.lru_cache(maxsize=None)
def _inv_freq(dim: int, theta: float, device) -> torch.Tensor:
    # computed on CPU in fp32 like transformers' init, then moved (once per device: callers never modify it)
    return (1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))).to(device)


# ---- Vision tower --------------------------------------------------------------------------------------------------

# Segments (windows) per SDPA call in the vision tower. CUDA's attention kernels put the batch on one axis of their
# launch grid (flash: y, memory-efficient: z), which holds at most 65,535 blocks; 1,024 windows make one 12.8 M pixel
# image, so only a batch of very many images reaches this, and is then split into calls of this many windows.
WINDOWS_PER_CALL = 32768


def _segment_attention(q, k, v, scale):
    """Unmasked SDPA over q, k, v [n, H, len, d] (one segment per batch row), WINDOWS_PER_CALL segments a call."""
    calls = [F.scaled_dot_product_attention(q[i:i + WINDOWS_PER_CALL], k[i:i + WINDOWS_PER_CALL],
                                            v[i:i + WINDOWS_PER_CALL], scale=scale)        # [<= W, H, len, d]
             for i in range(0, q.shape[0], WINDOWS_PER_CALL)]
    return calls[0] if len(calls) == 1 else torch.cat(calls)                                # [n, H, len, d]


class _Segments:
    """Contiguous segments of a packed sequence (cu_seqlens) attended to separately, batched by length.

    Segments of equal length are gathered into one [n, H, len, d] batch and go through one unmasked SDPA call (more
    past WINDOWS_PER_CALL segments), so a layer makes one call per distinct window size (1 to ~4 per image size),
    never one per window. Each segment sees exactly the kernel transformers' per-window calls see, so results match
    it bit for bit where the kernel is batch-invariant (CPU: checked in bf16 too).
    """

    def __init__(self, cu: list[int], device):
        by_len: dict[int, list[int]] = {}  # segment length -> start offsets
        for a, b in zip(cu[:-1], cu[1:]):
            by_len.setdefault(b - a, []).append(a)
        if len(by_len) == 1:  # all of one length (and contiguous): a plain view
            (self.lmax, starts), = by_len.items()
            self.groups, self.inverse, self.n = None, None, len(starts)
            return
        self.groups, order = [], []  # groups: (length, index [n, length] into the packed sequence)
        for n, starts in by_len.items():
            idx = torch.tensor(starts)[:, None] + torch.arange(n)[None, :]
            self.groups.append((n, idx.to(device)))
            order.append(idx.flatten())
        self.inverse = torch.argsort(torch.cat(order)).to(device)  # packed position -> row of the concatenated outputs

    def attend(self, q, k, v, scale):
        """q, k, v [N, H, d] -> [N, H, d]; attention only inside each segment (bidirectional)."""
        N, H, d = q.shape
        if self.groups is None:
            q, k, v = (t.view(self.n, self.lmax, H, d).transpose(1, 2) for t in (q, k, v))  # [S, H, len, d]
            o = _segment_attention(q, k, v, scale)                                         # [S, H, len, d]
            return o.transpose(1, 2).reshape(N, H, d)
        outs = []
        for n, idx in self.groups:
            qg, kg, vg = (t[idx].transpose(1, 2) for t in (q, k, v))                      # [S_n, H, n, d]
            o = _segment_attention(qg, kg, vg, scale)                                      # [S_n, H, n, d]
            outs.append(o.transpose(1, 2).reshape(-1, H, d))
        return torch.cat(outs)[self.inverse]                                               # [N, H, d]


class VisionBlock(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(c.hidden_size, 1e-6)  # eps hard-coded in transformers
        self.norm2 = RMSNorm(c.hidden_size, 1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size, bias=True)
        self.attn.proj = nn.Linear(c.hidden_size, c.hidden_size, bias=True)
        self.mlp = SwiGLU(c.hidden_size, c.intermediate_size, bias=True)
        self.heads = c.num_heads

    def forward(self, x, seg: _Segments, cos, sin):
        N, D = x.shape
        hd = D // self.heads
        qkv = self.attn.qkv(self.norm1(x)).view(N, 3, self.heads, hd)      # [N, 3, H, hd]
        q, k, v = qkv.unbind(1)                                              # [N, H, hd]
        dt = q.dtype
        q32, k32 = q.float(), k.float()                                      # vision rope in fp32
        q = (q32 * cos + _rotate_half(q32) * sin).to(dt)
        k = (k32 * cos + _rotate_half(k32) * sin).to(dt)
        a = seg.attend(q, k, v, hd ** -0.5).reshape(N, D)                    # [N, D]
        x = x + self.attn.proj(a)
        return x + self.mlp(self.norm2(x))


class VisionTower(nn.Module):
    """Qwen2_5_VisionTransformerPretrainedModel: pixel_values [N, 3*2*14*14] -> merged features [N/4, out_hidden]."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.c = c
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(3, c.hidden_size, (c.temporal_patch_size, c.patch_size, c.patch_size),
                                          stride=(c.temporal_patch_size, c.patch_size, c.patch_size), bias=False)
        self.blocks = nn.ModuleList(VisionBlock(c) for _ in range(c.depth))
        self.merger = nn.Module()
        self.merger.ln_q = RMSNorm(c.hidden_size, 1e-6)
        m2 = c.hidden_size * c.spatial_merge_size ** 2
        self.merger.mlp = nn.Sequential(nn.Linear(m2, m2), nn.GELU(), nn.Linear(m2, c.out_hidden_size))

    def _layout(self, grids: list[tuple[int, int, int]], device):
        """Rotary (row, col) positions [N, 2], window permutation and segment boundaries (get_window_index etc.)."""
        c, m = self.c, self.c.spatial_merge_size
        unit = m * m
        win = c.window_size // m // c.patch_size  # window side in merged tokens (4 for 112 px)
        pos, win_index, cu_win, cu_full = [], [], [0], [0]
        offset = 0
        for t, h, w in grids:
            if h % m or w % m:
                raise ValueError(f"image grid {(t, h, w)}: h and w must be multiples of spatial_merge_size {m}")
            lh, lw = h // m, w // m
            hw = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1)  # [h, w, 2]
            pos.append(hw.reshape(lh, m, lw, m, 2).permute(0, 2, 1, 3, 4).reshape(-1, 2).repeat(t, 1))  # merge units
            index = torch.arange(t * lh * lw).reshape(t, lh, lw)
            ph, pw = win - lh % win, win - lw % win  # == win when divisible: an empty band, dropped below
            nh, nw = (lh + ph) // win, (lw + pw) // win
            ip = F.pad(index, (0, pw, 0, ph), value=-100)
            ip = ip.reshape(t, nh, win, nw, win).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, win, win)
            seqlens = (ip != -100).sum([2, 3]).reshape(-1)                    # tokens per window, [t * nh * nw]
            win_index.append(ip[ip != -100] + offset)
            cu_win += (seqlens[seqlens > 0].cumsum(0) * unit + cu_win[-1]).tolist()  # empty windows dropped
            cu_full += [cu_full[-1] + (i + 1) * h * w for i in range(t)]  # one segment per frame
            offset += t * lh * lw
        pos, win_index = torch.cat(pos).to(device), torch.cat(win_index).to(device)  # [N, 2], [N / unit]
        return pos, win_index, _Segments(cu_win, device), _Segments(cu_full, device)

    def forward(self, pixel_values: torch.Tensor, grid_thw) -> torch.Tensor:
        c = self.c
        grids = [tuple(int(v) for v in g) for g in torch.as_tensor(grid_thw).tolist()]
        w = self.patch_embed.proj.weight                                       # [D, 3, 2, 14, 14]
        dev = w.device
        n_expected = sum(t * h * w_ for t, h, w_ in grids)
        if pixel_values.shape[0] != n_expected or pixel_values.shape[-1] != w[0].numel():
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)} but image_grid_thw {grids} needs "
                             f"[{n_expected}, {w[0].numel()}]")
        x = pixel_values.to(device=dev, dtype=w.dtype)                         # cast first (bf16 rounding like HF)
        x = F.linear(x, w.reshape(w.shape[0], -1))                             # [N, D] == Conv3d with stride == kernel
        pos, win_index, seg_win, seg_full = self._layout(grids, dev)
        N, D = x.shape
        unit = c.spatial_merge_size ** 2
        x = x.view(N // unit, unit, D)[win_index].reshape(N, D)                # window order, merge units intact
        hd = D // c.num_heads
        f = (pos[..., None].float() * _inv_freq(hd // 2, c.rope_theta, dev)).flatten(1)  # [N, hd/2] = [h | w freqs]
        f = f.view(N // unit, unit, -1)[win_index].reshape(N, -1)
        emb = torch.cat([f, f], -1)                                            # [N, hd]
        cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]               # [N, 1, hd] fp32
        for i, blk in enumerate(self.blocks):
            x = blk(x, seg_full if i in c.fullatt_block_indexes else seg_win, cos, sin)
        y = self.merger.mlp(self.merger.ln_q(x).view(N // unit, unit * D))    # [N/4, out_hidden]
        return y[torch.argsort(win_index)]                                     # back to raster order


# ---- Language model ------------------------------------------------------------------------------------------------

def causal_attention(q, k, v, prefix: int, scale):
    """q [B, H, n, hd] over k, v [B, KV, prefix + n, hd] (GQA: query head h reads KV head h // G), query l seeing
    keys [0, prefix + l] -> [B, H, n, hd].

    What SDPA does (torch 2.5+, aten/src/ATen/native/transformers): a bool mask is first copied into an additive
    float mask of its own shape; on the CPU the flash kernel takes masks (broadcast over batch and heads) and GQA; on
    CUDA the flash kernel takes GQA but no mask, and the memory-efficient kernel a mask but not GQA, so a mask with
    enable_gqa runs the math kernel there (K/V repeated per query head, [B, H, n, s] scores). Hence: prefix 0 is
    is_causal with enable_gqa (flash on the CPU, and on CUDA in bf16/fp16; CUDA's fp32 has no flash kernel and runs
    it in the math kernel), and a prefix (a cache append) puts each KV head's G query heads on the head axis against
    K/V expanded to them (a view, not a copy) under one [n, s] mask that broadcasts over everything (CPU: flash;
    CUDA: memory-efficient)."""
    if prefix == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    B, H, n, hd = q.shape
    KV, s = k.shape[1], k.shape[2]
    mask = torch.ones(n, s, dtype=torch.bool, device=q.device).tril(prefix)                 # [n, s]
    kg, vg = (t.reshape(B * KV, 1, s, hd).expand(-1, H // KV, -1, -1) for t in (k, v))      # [B*KV, G, s, hd]
    o = F.scaled_dot_product_attention(q.reshape(B * KV, H // KV, n, hd), kg, vg, attn_mask=mask, scale=scale)
    return o.reshape(B, H, n, hd)                                                           # from [B*KV, G, n, hd]


def attend(q, k, v, how, scale):
    """Attention of q [B, H, L, hd] over k, v [B, KV, S, hd] -> [B, H, L, hd], in the form `Qwen25VL._attention_mask`
    chose for the chunk; K/V are never copied per query head and no mask is larger than one row's [L, S]:
    - an int P: every row alike, causal with a prefix (causal_attention; P = 0: a prefill, P = S - L: an append);
    - [(queries, key row, keys, P)]: a ragged chunk packed into one row of real tokens (B = 1), one causal_attention
      per row of the batch over its segment of queries and its own keys: no padding computed or masked;
    - a bool [B, 1, 1, S] (True = attend) or None: one token per row (a decode step). The G query heads of a KV head
      become G query rows of it, and the mask broadcasts over them."""
    if isinstance(how, list):   # a packed ragged chunk (q: one row): each row's segment over its own keys
        parts = [causal_attention(q[:, :, seg], k[r:r + 1, :, keys], v[r:r + 1, :, keys], prefix, scale)
                 for seg, r, keys, prefix in how]                             # [1, H, n, hd] each
        return torch.cat(parts, 2) if parts else q                            # [1, H, N, hd]
    if isinstance(how, int):                                                  # every row alike
        return causal_attention(q, k, v, how, scale)
    B, H, L, hd = q.shape                                                     # one token per row (L == 1)
    o = F.scaled_dot_product_attention(q.reshape(B, k.shape[1], -1, hd), k, v, attn_mask=how, scale=scale)
    return o.reshape(B, H, L, hd)                                             # [B, KV, G, hd] -> [B, H, 1, hd]


class DecoderLayer(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        hd = c.hidden_size // c.num_attention_heads
        self.heads, self.kv_heads, self.hd = c.num_attention_heads, c.num_key_value_heads, hd
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * hd, bias=True)
        self.self_attn.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * hd, bias=True)
        self.self_attn.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * hd, bias=True)
        self.self_attn.o_proj = nn.Linear(c.num_attention_heads * hd, c.hidden_size, bias=False)
        self.mlp = SwiGLU(c.hidden_size, c.intermediate_size, bias=False)

    def forward(self, x, cos, sin, mask, kv: tuple | None):
        """x [B, L, D]; cos/sin [B, 1, L, hd]; kv = (k_cache, v_cache, slots, S): write this chunk's keys/values at
        `slots` (int: [slots, slots + L) of every row; [B, L]: per row, see KVCache.place; (rows, slots) [L] each: a
        packed chunk, B = 1), attend to the first S slots; or None (no cache). mask: as `Qwen25VL._attention_mask`
        documents."""
        B, L, D = x.shape
        a = self.self_attn
        h = self.input_layernorm(x)
        q = a.q_proj(h).view(B, L, self.heads, self.hd).transpose(1, 2)        # [B, H, L, hd]
        k = a.k_proj(h).view(B, L, self.kv_heads, self.hd).transpose(1, 2)     # [B, KV, L, hd]
        v = a.v_proj(h).view(B, L, self.kv_heads, self.hd).transpose(1, 2)     # [B, KV, L, hd]
        q = q * cos + _rotate_half(q) * sin                                    # [B, H, L, hd] M-RoPE
        k = k * cos + _rotate_half(k) * sin                                    # [B, KV, L, hd]
        if kv is not None:
            kc, vc, slots, S = kv
            if isinstance(slots, int):  # every row appends at the same slots
                kc[:, :, slots:slots + L] = k
                vc[:, :, slots:slots + L] = v
            elif isinstance(slots, tuple):   # a packed chunk (one row): token i to cache row rows[i], slot at[i]
                rows, at = slots                                                     # [N], [N]
                heads = torch.arange(self.kv_heads, device=x.device)[:, None]       # [KV, 1]
                kc[rows, heads, at] = k[0].to(kc.dtype)                              # [KV, N] <- [KV, N, hd]
                vc[rows, heads, at] = v[0].to(vc.dtype)
            else:                       # each row at its own slots (index_put_: compiled, it writes in place)
                rows = torch.arange(B, device=x.device)[:, None, None]                # [B, 1, 1]
                heads = torch.arange(self.kv_heads, device=x.device)[None, :, None]  # [1, KV, 1]
                kc[rows, heads, slots[:, None, :]] = k.to(kc.dtype)                 # [B, KV, L] slots <- [.., hd]
                vc[rows, heads, slots[:, None, :]] = v.to(vc.dtype)                 # (bf16 under autocast)
            k, v = kc[:, :, :S], vc[:, :, :S]                                  # [B, KV, S, hd]
        o = attend(q, k, v, mask, self.hd ** -0.5)                             # [B, H, L, hd]
        o = o.transpose(1, 2).reshape(B, L, D)                                 # [B, L, D]
        x = x + a.o_proj(o)
        return x + self.mlp(self.post_attention_layernorm(x))


# ---- KV cache ------------------------------------------------------------------------------------------------------

class KVCache:
    """Per-layer keys/values for a batch of rows that grow by chunks (see `Qwen25VL.extend`).

    Row b holds its `length[b]` real tokens at slots [0, length[b]); `size` is the longest row's length. Until a chunk
    has padding (`aligned`) every chunk goes to the same slots of every row; after that each row's tokens go right
    after its own (`place`), so padding (ragged prompts, one row's crop turn, finished rows) takes no slot a later
    query reads. `next_pos[b]`: the row's next M-RoPE position; `last_hidden[b]`: its last real token's final-norm
    hidden state. A chunk: `place` (room, and where its keys/values go), the layers write them, `append` records it.
    """

    def __init__(self, n_layers, batch_size, kv_heads, head_dim, hidden, dtype, device, capacity=0):
        cap = max(int(capacity), 16)  # zeros, not empty: a masked slot must hold a finite value (0 * NaN is NaN)
        self.k = [torch.zeros(batch_size, kv_heads, cap, head_dim, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(batch_size, kv_heads, cap, head_dim, dtype=dtype, device=device) for _ in range(n_layers)]
        self.size = 0
        self.aligned = True  # no padding yet: every row has `size` tokens (decode steps need no attention mask)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.last_hidden = torch.zeros(batch_size, hidden, dtype=dtype, device=device)

    @property
    def batch_size(self) -> int:
        return self.length.shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def reserve(self, extra: int):
        """Make room for `extra` more slots past `size` (grows geometrically, so appending is amortised O(1))."""
        if self.size + extra > self.capacity:  # the first `size` slots kept, zeros after them
            grow = max(self.size + extra, 2 * self.capacity) - self.size
            self.k = [F.pad(t[:, :, :self.size], (0, 0, 0, grow)) for t in self.k]     # [B, KV, cap, hd]
            self.v = [F.pad(t[:, :, :self.size], (0, 0, 0, grow)) for t in self.v]

    def place(self, mask, padded: bool):
        """Where a chunk's keys/values go, as (slots, S): S is the number of slots its queries read. Aligned and
        without padding: slots is the int `size` (the same slots of every row). Otherwise slots [B, L]: row b's real
        tokens at length[b], length[b] + 1, ... and its padding tokens after them (never read as keys; a chunk of
        several tokens is packed and does not write them)."""
        L = mask.shape[1]
        self.reserve(L)
        if self.aligned and not padded:
            return self.size, self.size + L
        real = mask.long().cumsum(1)                                           # [B, L] rank of each real token
        after = self.length[:, None] + real[:, -1:]                            # [B, 1] each row's length after
        pad_rank = torch.arange(L, device=mask.device)[None, :] - real         # [B, L] padding tokens before + self
        slots = torch.where(mask, self.length[:, None] + real - 1, after + pad_rank)   # [B, L]
        return slots, max(1, int(after.max()))  # one host sync per padded chunk

    def append(self, mask, padded: bool, S: int, next_pos, last_hidden):
        """Record a chunk the layers wrote where `place` said (S from it): mask [B, L] its real tokens, next_pos [B],
        last_hidden [B, D] each row's last real token (a row with nothing new keeps its earlier one)."""
        self.size = S
        self.aligned = self.aligned and not padded
        self.next_pos = next_pos
        self.length = self.length + mask.long().sum(1)                        # [B]
        self.last_hidden = torch.where(mask.any(1)[:, None], last_hidden, self.last_hidden) if padded else last_hidden

    def record_step(self, live, all_live: bool, last_hidden):
        """Record a decode step (`decode.step_graph` wrote one token per row at slot length[b]): live [B] bool, which
        rows' tokens are real (all_live: every row's, known on the host); last_hidden [B, D] as the step returns it."""
        self.length, self.next_pos = self.length + live, self.next_pos + live                     # [B], [B]
        self.last_hidden = last_hidden
        self.aligned = self.aligned and all_live
        self.size = self.size + 1 if all_live else int(self.length.max())   # a host sync only for padded steps

    def _map_rows(self, fn):
        self.k = [fn(t) for t in self.k]
        self.v = [fn(t) for t in self.v]
        self.next_pos, self.length, self.last_hidden = fn(self.next_pos), fn(self.length), fn(self.last_hidden)
        if not self.aligned:   # the longest rows may have gone: read only as far as the longest that stayed
            self.size = int(self.length.max()) if self.batch_size else 0
        return self

    def take(self, rows) -> "KVCache":
        """A new cache holding copies of `rows` (LongTensor of row indices): extend it, then `put` it back."""
        return copy.copy(self)._map_rows(lambda t: t.index_select(0, rows))

    def put(self, rows, part: "KVCache"):
        """Write back the rows `take` copied into `part`, which has grown since (their slots past part.size unused)."""
        self.reserve(max(0, part.size - self.size))
        for mine, theirs in zip(self.k + self.v, part.k + part.v):
            mine[rows, :, :part.size] = theirs[:, :, :part.size]                  # [n, KV, part.size, hd]
        self.length[rows], self.next_pos[rows], self.last_hidden[rows] = part.length, part.next_pos, part.last_hidden
        self.size, self.aligned = max(self.size, part.size), False

    def repeat_interleave(self, g: int) -> "KVCache":
        """Copy each row g times in place (rows r*g .. r*g+g-1 come from row r): one prompt -> G GRPO samples."""
        return self.select(torch.arange(self.batch_size, device=self.length.device).repeat_interleave(g))

    def select(self, rows) -> "KVCache":
        """Keep only `rows` (list or LongTensor of row indices, in that order), in place."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.length.device)
        return self._map_rows(lambda t: t.index_select(0, idx))


# ---- Weights: explicit name table ----------------------------------------------------------------------------------

def weight_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Every tensor name of a Qwen2.5-VL checkpoint on disk (hub names, all transformers versions) -> its shape."""
    t, v = cfg.text, cfg.vision
    D, I, H = v.hidden_size, v.intermediate_size, t.hidden_size
    hd = H // t.num_attention_heads
    kv = t.num_key_value_heads * hd
    m2 = D * v.spatial_merge_size ** 2
    s = {"visual.patch_embed.proj.weight": (D, 3, v.temporal_patch_size, v.patch_size, v.patch_size)}
    block = {"norm1.weight": (D,), "norm2.weight": (D,),
             "attn.qkv.weight": (3 * D, D), "attn.qkv.bias": (3 * D,),
             "attn.proj.weight": (D, D), "attn.proj.bias": (D,),
             "mlp.gate_proj.weight": (I, D), "mlp.gate_proj.bias": (I,),
             "mlp.up_proj.weight": (I, D), "mlp.up_proj.bias": (I,),
             "mlp.down_proj.weight": (D, I), "mlp.down_proj.bias": (D,)}
    s.update({f"visual.blocks.{i}.{k}": shape for i in range(v.depth) for k, shape in block.items()})
    s.update({"visual.merger.ln_q.weight": (D,), "visual.merger.mlp.0.weight": (m2, m2), "visual.merger.mlp.0.bias": (m2,),
              "visual.merger.mlp.2.weight": (v.out_hidden_size, m2), "visual.merger.mlp.2.bias": (v.out_hidden_size,),
              "model.embed_tokens.weight": (t.vocab_size, H), "model.norm.weight": (H,)})
    layer = {"input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,),
             "self_attn.q_proj.weight": (H, H), "self_attn.q_proj.bias": (H,),
             "self_attn.k_proj.weight": (kv, H), "self_attn.k_proj.bias": (kv,),
             "self_attn.v_proj.weight": (kv, H), "self_attn.v_proj.bias": (kv,),
             "self_attn.o_proj.weight": (H, H),
             "mlp.gate_proj.weight": (t.intermediate_size, H), "mlp.up_proj.weight": (t.intermediate_size, H),
             "mlp.down_proj.weight": (H, t.intermediate_size)}
    s.update({f"model.layers.{j}.{k}": shape for j in range(t.num_hidden_layers) for k, shape in layer.items()})
    if not cfg.tie_word_embeddings:
        s["lm_head.weight"] = (t.vocab_size, H)
    return s


def check_token_ids(input_ids, vocab_size: int):
    """ValueError naming input_ids unless every id lies in [0, vocab_size) (one host sync). Out of range, the embedding
    would fail deep inside: an IndexError on the CPU, a device-side assert that ends the process on a GPU."""
    outside = (input_ids < 0) | (input_ids >= vocab_size)
    if bool(outside.any()):
        raise ValueError(f"input_ids hold token ids outside the vocabulary [0, {vocab_size}): "
                         f"{input_ids[outside].unique()[:5].tolist()}")


def grid_list(image_grid_thw) -> list:
    """image_grid_thw (a [n_images, 3] tensor or nested list of (t, h, w) patch counts, or None) -> a list of int
    tuples; anything else is a ValueError naming image_grid_thw."""
    if image_grid_thw is None:
        return []
    try:
        grid = torch.as_tensor(image_grid_thw)
    except (TypeError, ValueError, RuntimeError):
        grid = None
    if grid is None or grid.dim() != 2 or grid.shape[1] != 3 or grid.is_floating_point() or \
            (grid.numel() and int(grid.min()) < 1):
        raise ValueError(f"image_grid_thw must be [n_images, 3] whole numbers >= 1 (t, h, w patch counts), got "
                         f"{image_grid_thw!r:.200}")
    return [tuple(g) for g in grid.tolist()]


def _read_config(directory: str) -> ModelConfig:
    """config.json -> ModelConfig; a missing, unparsable or invalid config raises, naming the file."""
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory}: no config.json")
    raw = hub.read_json(path, "not valid JSON")
    try:
        return ModelConfig.from_hf(raw, source=path)
    except (TypeError, ValueError) as e:
        # a size that disagrees with the weights breaks a derived check first (head_dim vs mrope_section): say so
        hint = hub.sizes_vs_weights(directory, raw)
        raise hub.CheckpointError(hint or (f"{path}: {e}" if path not in str(e) else str(e))) from e


@torch.no_grad()
def _load_weights(model: nn.Module, directory: str):
    """Copy the checkpoint's tensors into `model`'s parameters, one memory-mapped tensor at a time converted in place
    to the parameter's dtype/device. Names, dtypes and shapes are checked against `weight_shapes`."""
    expected = weight_shapes(model.cfg)
    files = hub.checkpoint_files(directory)
    by_disk = {}  # hub name -> name as stored
    for stored in files:
        disk = hub.disk_name(stored)
        if disk == "lm_head.weight" and model.cfg.tie_word_embeddings:
            continue  # tied: transformers ignores a stored lm_head too
        if disk not in expected:
            raise hub.CheckpointError(f"{directory}: unexpected tensor {stored!r} (not part of a Qwen2.5-VL model with "
                                  f"this config.json; wrong config or a different architecture?)")
        by_disk[disk] = stored
    missing = [k for k in expected if k not in by_disk]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise hub.CheckpointError(f"{directory}: missing tensor(s) {missing[:5]}{more} in the checkpoint")
    per_file: dict[str, list[str]] = {}
    for disk, stored in by_disk.items():
        per_file.setdefault(files[stored], []).append(disk)
    for fn, names in per_file.items():
        try:
            with safe_open(fn, framework="pt") as f:
                for disk in names:
                    stored = by_disk[disk]
                    sl = f.get_slice(stored)
                    shape = tuple(sl.get_shape())
                    if sl.get_dtype() not in ("F64", "F32", "F16", "BF16"):
                        raise hub.CheckpointError(f"{fn}: tensor {stored!r} is stored as {sl.get_dtype()}, not a "
                                              f"floating-point type; this is not a Qwen2.5-VL weight file")
                    if shape != expected[disk]:
                        raise hub.CheckpointError(f"{fn}: tensor {stored!r} has shape {list(shape)} but config.json "
                                              f"implies {list(expected[disk])}")
                    model.get_parameter(disk).copy_(f.get_tensor(stored))  # converts dtype/device in place
        except (SafetensorError, OSError) as e:  # a cut or damaged file; anything else (out of memory, ...) passes
            raise hub.CheckpointError(f"{fn}: cannot read tensors ({type(e).__name__}: {e}); if the file is "
                                  f"truncated or corrupt, download it again") from e


# ---- The model -----------------------------------------------------------------------------------------------------

class Qwen25VL(nn.Module):
    """Qwen2_5_VLForConditionalGeneration. Module names equal the hub tensor names (visual.*, model.*, lm_head)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTower(cfg.vision)
        t = cfg.text
        self.model = nn.Module()  # Qwen2Model
        self.model.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size)
        self.model.layers = nn.ModuleList(DecoderLayer(t) for _ in range(t.num_hidden_layers))
        self.model.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        self.source_dir = None
        self.generation_eos = cfg.eos_token_id  # decode.generate()'s defaults; generation_config.json overrides them
        self.generation_pad = cfg.pad_token_id
        # the image processor's pixel limits (preprocessor_config.json); cof.py and sft.py size images with them
        self.image_min_pixels, self.image_max_pixels = ck.PROCESSOR_MIN_PIXELS, ck.PROCESSOR_MAX_PIXELS

    # ---- loading / saving ------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path_or_id, dtype=None, device=None) -> "Qwen25VL":
        """Load a Qwen2.5-VL checkpoint (local directory or hub id) tensor by tensor into `dtype` (default: the
        checkpoint's `torch_dtype`) on `device` (default CPU). No full fp32 copy is ever built: the module is created
        on the meta device, then each tensor is read (memory-mapped) and converted straight into place."""
        checks.kind(dtype, "dtype", torch.dtype, "a torch dtype such as torch.bfloat16, or None", none=True)
        device = checks.device(device) if device is not None else None
        directory = hub.resolve_checkpoint(path_or_id)
        cfg = _read_config(directory)
        if dtype is None:
            dtype = getattr(torch, cfg.torch_dtype) if isinstance(cfg.torch_dtype, str) and \
                isinstance(getattr(torch, cfg.torch_dtype, None), torch.dtype) else torch.float32
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to(dtype).to_empty(device=torch.device(device or "cpu"))
        model.source_dir = directory
        try:
            model.image_min_pixels, model.image_max_pixels = ck.read_image_limits(directory)
        except ValueError as e:      # a preprocessor_config.json that does not parse: a checkpoint problem
            raise hub.CheckpointError(str(e)) from None
        model.generation_eos, model.generation_pad = hub.read_generation_config(directory, cfg)
        _load_weights(model, directory)
        return model.eval()

    def save_pretrained(self, directory: str, max_shard_bytes: int = 5 * 2**30):
        """Write config.json (hub flat layout) + model.safetensors (sharded with an index above max_shard_bytes),
        with hub tensor names, plus the tokenizer/processor files of the directory this model was loaded from."""
        cfg = self.cfg.to_hf()
        cfg["torch_dtype"] = str(self.model.embed_tokens.weight.dtype).replace("torch.", "")
        tensors = {k: self.get_parameter(k).detach().to("cpu").contiguous() for k in weight_shapes(self.cfg)}
        hub.write_checkpoint(directory, cfg, tensors, max_shard_bytes, copy_from=self.source_dir)

    # ---- forward: positions -> embeddings (+ vision) -> attention mask -> decoder layers ---------------------------

    @property
    def dtype(self):
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self):
        return self.model.embed_tokens.weight.device

    @property
    def head_weight(self):
        """The output head's weight [V, D]: lm_head's, or the embedding's when tied."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def _lm_head(self, h):
        return F.linear(h, self.head_weight)

    def text_inv_freq(self, device=None) -> torch.Tensor:
        """The text rotary frequencies [hd/2], fp32, on `device` (default: the model's); cached."""
        t = self.cfg.text
        return _inv_freq(t.hidden_size // t.num_attention_heads, t.rope_theta, device or self.device)

    def _text_rope(self, pos: torch.Tensor, dtype, inv_freq=None):
        """pos [3, B, L] -> cos, sin [B, 1, L, hd] (M-RoPE: t/h/w take different frequency slices), in `dtype`.
        inv_freq: text_inv_freq(), given by a compiled caller (traced, its computation would run on the host)."""
        t = self.cfg.text
        inv_freq = self.text_inv_freq(pos.device) if inv_freq is None else inv_freq                      # [hd/2]
        f = pos[..., None].float() * inv_freq                                                            # [3, B, L, hd/2]
        f = torch.cat([part[axis] for axis, part in enumerate(f.split(list(t.mrope_section), -1))], -1)  # [B, L, hd/2]
        emb = torch.cat([f, f], -1)[:, None]                                   # [B, 1, L, hd]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _positions(self, ids, mask, next_pos, grids):
        """M-RoPE positions of one chunk (transformers' get_rope_index, continued from each row's next_pos).

        ids/mask [B, L]; grids: list of (t, h, w) for the images of this chunk (row-major). Returns pos [3, B, L] and
        the rows' new next_pos [B]. Text continues by +1 on all three axes; an image of merged grid (t, hm, wm)
        starting at s gets t-axis s + frame, h-axis s + row, w-axis s + col, and the next text starts at
        s + max(hm, wm). Padding slots repeat the position before them (they are never attended to).
        """
        c = self.cfg
        B, L = ids.shape
        pos = (next_pos[:, None] + mask.long().cumsum(1) - 1).clamp_min(0)[None].expand(3, B, L)  # [3, B, L] as text
        new_next = next_pos + mask.long().sum(1)                                # [B]
        is_img = (ids == c.image_token_id) & mask                              # [B, L]
        if not grids and not bool((is_img | ((ids == c.video_token_id) & mask)).any()):
            return pos, new_next  # a plain text chunk (one host sync)
        if not grids and bool(is_img.any()):
            raise ValueError("input_ids contain <|image_pad|> tokens but no pixel_values/image_grid_thw were given")
        if c.video_token_id is not None and bool(((ids == c.video_token_id) & mask).any()):
            raise NotImplementedError("video inputs (<|video_pad|>) are not supported by this implementation")
        if not bool(is_img.any()):
            raise ValueError(f"image_grid_thw has {len(grids)} image(s) but the chunk has no <|image_pad|> token "
                             f"(id {c.image_token_id})")
        pos, gi = pos.clone(), 0
        for b in torch.nonzero(is_img.any(1)).flatten().tolist():
            cols = torch.nonzero(mask[b]).flatten()                            # the row's real tokens
            row_pos, cur, gi = self._row_positions(ids[b, cols].tolist(), int(next_pos[b]), grids, gi, b)
            pos[:, b, cols] = row_pos.to(pos.device)
            new_next[b] = cur
        if gi != len(grids):
            raise ValueError(f"image_grid_thw has {len(grids)} image(s) but the chunk's <|image_pad|> runs use {gi}")
        return pos, new_next

    def _row_positions(self, row: list[int], cur: int, grids, gi: int, b: int):
        """Positions [3, len(row)] of one row's real tokens `row`, starting at position `cur`; its images are grids[gi],
        grids[gi + 1], ... in order. Returns (positions, the row's next position, index of the next unused grid)."""
        ms, img_id = self.cfg.vision.spatial_merge_size, self.cfg.image_token_id
        out, i = [], 0
        while i < len(row):
            j = row.index(img_id, i) if img_id in row[i:] else len(row)       # the next image starts at j
            out.append(torch.arange(cur, cur + j - i).expand(3, -1))           # [3, j - i] text: +1 per token
            cur, i = cur + j - i, j
            if i == len(row):
                break
            if gi >= len(grids):
                raise ValueError(f"the chunk has more <|image_pad|> runs than the {len(grids)} image(s) in "
                                 f"image_grid_thw (row {b})")
            t, h, w = grids[gi]
            hm, wm = h // ms, w // ms
            n = t * hm * wm
            if row[i:i + n] != [img_id] * n:
                raise ValueError(f"row {b}: image {gi} with grid {(t, h, w)} needs {n} consecutive "
                                 f"<|image_pad|> tokens but the run at token {i} is shorter")
            thw = torch.meshgrid(torch.arange(t), torch.arange(hm), torch.arange(wm), indexing="ij")
            out.append(torch.stack(thw).flatten(1) + cur)                      # [3, n] frame, row, col
            cur, i, gi = cur + max(hm, wm), i + n, gi + 1
        return torch.cat(out, 1), cur, gi

    def _embed(self, ids, mask, pixel_values, grids):
        """Token embeddings [B, L, D], with the vision tower's merged image features in the <|image_pad|> slots."""
        c = self.cfg
        try:
            h = self.model.embed_tokens(ids)                                  # [B, L, D]
        except IndexError:   # a one-token chunk past the vocabulary (longer chunks are checked before): name it
            check_token_ids(ids, c.text.vocab_size)
            raise
        if not grids:
            if pixel_values is not None:
                raise ValueError("pixel_values given without image_grid_thw")
            return h
        if pixel_values is None:
            raise ValueError("image_grid_thw given without pixel_values")
        feats = self.visual(pixel_values, grids)                              # [n_feat, D]
        img = (ids == c.image_token_id) & mask                                # [B, L]
        n_tok = int(img.sum())
        if n_tok != feats.shape[0]:
            raise ValueError(f"{n_tok} <|image_pad|> tokens but the images give {feats.shape[0]} features "
                             f"(grids {grids}, merge {c.vision.spatial_merge_size})")
        return h.masked_scatter(img[..., None].expand_as(h), feats.to(h.dtype))  # [B, L, D]

    def _attention_mask(self, mask, padded: bool, cache: KVCache | None, slots, S: int):
        """How the queries of a chunk see the keys (mask [B, L]: its real tokens; padded: it came with a mask; slots,
        S: where KVCache.place put it and the key slots its queries read), in a form `attend` takes. A real query sees
        its row's real keys up to itself; no mask is ever [B, 1, G*L, S] or [B, 1, L, S]:
        - an int, the cached keys before the chunk (0: none): no padding in the chunk or before it (a prefill, an
          aligned cache append, a training batch of equal rows).
        - None / bool [B, 1, 1, S]: one token per row, no padding / some (a decode step, as decode.step_graph).
        - [(queries, key row, keys, cached keys before)]: anything else of more than one token (padding, ragged turns,
          a cache with padding before). `_run` then packs the real tokens of all rows into one row (row-major)
          and computes nothing for padding: row b's tokens are the segment `queries` of it, its keys that segment
          (no cache) or slots [0, before + n) of cache row b. Rows without real tokens are left out.
        """
        B, L = mask.shape
        if cache is None and (not padded or L == 1 or bool(mask.all())):     # keys = the chunk itself
            return 0
        if isinstance(slots, int):     # aligned, no padding: the same slots in every row
            return None if L == 1 else slots
        if L == 1:
            keys = torch.arange(S, device=mask.device)                        # [S]
            return (keys < torch.where(mask, slots + 1, 1))[:, None, None]    # [B, 1, 1, S] (pad: slot 0, unused)
        rows, end = [], 0
        before = [0] * B if cache is None else cache.length.tolist()          # each row's cached tokens
        for b, n in enumerate(mask.long().sum(1).tolist()):                   # n: the row's real tokens
            seg = slice(end, end + n)                                         # row b's part of the packed row
            if n:   # cached: KVCache.place put them right after the row's own
                rows.append((seg, 0, seg, 0) if cache is None else (seg, b, slice(0, before[b] + n), before[b]))
            end += n
        return rows

    def _run(self, input_ids, mask, pixel_values, image_grid_thw, cache: KVCache | None):
        """One chunk through the decoder: input_ids [B, L] -> final-norm hidden states [B, L, D]. mask [B, L] (False =
        padding) or None (no padding). Without a cache a full forward from position 0; with one, each row continues
        from its cached tokens and the chunk is appended to the cache."""
        dev = self.device
        checks.kind(input_ids, "input_ids", torch.Tensor, "a tensor [B, L] of token ids")
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int, torch.int16, torch.uint8):
            raise TypeError(f"input_ids must be an integer tensor [B, L] of token ids, got {input_ids.dtype} of "
                            f"shape {tuple(input_ids.shape)}")
        input_ids = input_ids.to(dev)
        B, L = input_ids.shape
        if cache is not None and B != cache.batch_size:
            raise ValueError(f"chunk has {B} rows but the cache has {cache.batch_size}")
        if L > 1 or cache is None:   # a prompt, a turn, a training batch; not a decode step (its tokens were sampled
            check_token_ids(input_ids, self.cfg.text.vocab_size)   # from this model's logits): no extra sync per token
        padded = mask is not None  # without a mask the chunk has no padding, known without looking at the data
        mask = torch.ones(B, L, dtype=torch.bool, device=dev) if mask is None else mask.to(dev).bool()   # [B, L]
        if mask.shape != (B, L):
            raise ValueError(f"mask/attention_mask has shape {tuple(mask.shape)}, expected {(B, L)}")
        grids = grid_list(image_grid_thw)
        next_pos = torch.zeros(B, dtype=torch.long, device=dev) if cache is None else cache.next_pos
        pos, new_next = self._positions(input_ids, mask, next_pos, grids)    # [3, B, L], [B]
        slots, S = (None, L) if cache is None else cache.place(mask, padded)   # where K/V go, keys to read
        attn = self._attention_mask(mask, padded, cache, slots, S)
        ids, on = input_ids, mask
        if isinstance(attn, list):   # ragged: the real tokens packed into one row, padding never computed
            real = mask.flatten().nonzero()[:, 0]                             # [N] row-major
            ids, pos = input_ids.flatten()[real][None], pos.flatten(1)[:, real][:, None]   # [1, N], [3, 1, N]
            on = torch.ones_like(ids, dtype=torch.bool)                       # [1, N]
            if cache is not None:
                slots = (real // L, slots.flatten()[real])                    # [N], [N]: each token's row and slot
        h = self._embed(ids, on, pixel_values, grids)                         # [B, L, D] (packed: [1, N, D])
        cos, sin = self._text_rope(pos, h.dtype)                              # [B, 1, L, hd]
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, attn, None if cache is None else (cache.k[i], cache.v[i], slots, S))
        h = self.model.norm(h)                                                # [B, L, D]
        if isinstance(attn, list):   # unpacked: [B, L, D], 0 at padding
            h = h.new_zeros(B * L, h.shape[-1]).index_copy(0, real, h[0]).view(B, L, -1)
        if cache is not None:
            if padded:  # the last True of each mask row (a row with none: slot L - 1, which append ignores)
                last = h[torch.arange(B, device=dev), L - 1 - mask.flip(1).long().argmax(1)]  # [B, D]
            else:       # a copy, not a view of h (which it would keep alive)
                last = h[:, -1].clone()                                       # [B, D] each row's last real token
            cache.append(mask, padded, S, new_next, last)
        return h

    def forward(self, input_ids, pixel_values=None, image_grid_thw=None, attention_mask=None, targets=None,
                banned=(), temperature=1.0, entropy=False):
        """Full forward without cache. input_ids [B, T] (any padding, marked by attention_mask [B, T]);
        pixel_values [N, 1176] + image_grid_thw [n_img, 3] for the images in order of their <|image_pad|> runs,
        row-major over the batch. Returns logits [B, T, V] (padding positions hold garbage).
        With targets [B, T] (the token position t is scored on, usually input_ids[:, t + 1]; negative: none), no
        logits: (logp [B, T], the log-probs of the targets under policy_log_softmax(logits, banned, temperature), 0
        where no target; entropy [B, T] without gradient, or None), by token_logprobs: only the scored positions go
        through the head, in chunks. Training calls this through the model (so DDP / FSDP see the head's use)."""
        h = self._run(input_ids, attention_mask, pixel_values, image_grid_thw, None)       # [B, T, D]
        if targets is None:
            return self._lm_head(h)                                                        # [B, T, V]
        sel = targets.to(h.device) >= 0                                                    # [B, T]
        lp, ent = logprobs.token_logprobs(h[sel], self.head_weight, targets.to(h.device)[sel], banned, temperature, entropy)
        logp = torch.zeros(sel.shape, device=h.device).masked_scatter(sel, lp)             # [B, T]
        return logp, (None if ent is None else torch.zeros(sel.shape, device=h.device).masked_scatter(sel, ent))

    # ---- cache API -------------------------------------------------------------------------------------------------

    def new_cache(self, batch_size: int, capacity: int = 0) -> KVCache:
        checks.number(batch_size, "batch_size", lo=0, whole=True)
        checks.number(capacity, "capacity", lo=0, whole=True)
        t = self.cfg.text
        hd = t.hidden_size // t.num_attention_heads
        return KVCache(t.num_hidden_layers, batch_size, t.num_key_value_heads, hd, t.hidden_size, self.dtype,
                       self.device, capacity)

    def extend(self, cache: KVCache, input_ids, mask=None, pixel_values=None, image_grid_thw=None, last_only=False):
        """Append one chunk input_ids [B, L] to every row of `cache` and return its logits [B, L, V] (or [B, 1, V] at
        each row's last real token so far if last_only). mask [B, L] bool: False marks padding (never attended, not
        kept, positions do not advance). Images of the chunk: pixel_values/image_grid_thw in order of their
        <|image_pad|> runs, row-major. For real tokens the result equals a full forward over each row's concatenated
        real tokens. Runs under the caller's grad mode: wrap in torch.no_grad() for rollouts."""
        h = self._run(input_ids, mask, pixel_values, image_grid_thw, cache)  # [B, L, D]
        return self._lm_head(cache.last_hidden[:, None] if last_only else h)  # [B, 1, V] or [B, L, V]
