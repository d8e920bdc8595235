"""Pixels in, Qwen2.5-VL patches out: load -> crop -> resize -> rescale/normalize -> patchify.

Reproduces, bit for bit, the pipeline the released Chain-of-Focus code and Qwen's own tooling run:
  - `resize` is Pillow 13.0.0's `Image.resize` for 8-bit RGB (src/libImaging/Resample.c): double-precision filter
    coefficients (antialiased on downscale), 22-bit fixed point, a uint8 image between the two separable passes, and
    Pillow 13's pass order (vertical first when the height shrinks by more than twice what the width shrinks).
  - `patchify` is transformers' Qwen2-VL image processor (models/qwen2_vl/image_processing_pil_qwen2_vl.py, PIL
    backend) after its resize: float64 rescale by 1/255 -> float32, CLIP mean/std in float32, the image duplicated in
    time, and the (t, bh, bw, mh, mw | c, tt, py, px) patch order -> `[grid_h*grid_w, 1176]` plus `grid_thw`.
  - `smart_resize` is transformers' function of the same name, including the errors it raises.

The executable spec is the torch code below (`resize(..., backend="torch")`, `patchify`). `crop_resize_patchify` runs
it on the CPU (resizing with Pillow 13.0.0's own C code when that is installed: the same bits, much faster) and runs two
Triton kernels on CUDA tensors (defined lazily, so this module imports where triton is absent). All give the same bits;
tests/test_crop_kernels.py checks the spec against Pillow and transformers and the kernels against the spec (under
TRITON_INTERPRET=1 on a CPU). `python crop_kernels.py --bench` times everything; `--check` is the one-call GPU
acceptance run (bit-exactness on CUDA + the benchmark).
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import threading
import warnings

import numpy as np
import torch

import checks

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own decompression-bomb warning threshold (Image.MAX_IMAGE_PIXELS)
PRECISION_BITS = 32 - 8 - 2  # Resample.c: fixed-point fraction bits for 8-bit images
# Qwen2.5-VL's patch geometry (vision_config / preprocessor_config.json): 14 px patches, 2 x 2 of them merged into one
# language-model token, every image duplicated in time. A side must be a multiple of FACTOR = 28 px.
PATCH_SIZE, MERGE_SIZE, TEMPORAL_PATCH_SIZE = 14, 2, 2
FACTOR = PATCH_SIZE * MERGE_SIZE                                   # 28
PATCH_DIM = 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE      # 1176 values per row of pixel_values
# The hub preprocessor_config.json's pixel limits (4*28*28 .. 16384*28*28): every released checkpoint's processor.
PROCESSOR_MIN_PIXELS, PROCESSOR_MAX_PIXELS = 4 * FACTOR * FACTOR, 16384 * FACTOR * FACTOR
# tl.constexpr copies of the constants above for the Triton kernels' bodies, set by _kernels() (triton is imported
# lazily). A @triton.jit body may read a module global only when it is a tl.constexpr, and TRITON_INTERPRET=1 re-runs
# the kernel source in the module's globals (closure variables are lost there), so module globals it is; the kernels'
# signatures stay as they are.
_K_PRECISION_BITS = _K_ROUNDING = _K_PATCH_SIZE = _K_MERGE_SIZE = _K_TEMPORAL_PATCH_SIZE = None


# ----------------------------------------------------------------------------------------------------------------------
# smart_resize


def smart_resize(height, width, factor=FACTOR, min_pixels=56 * 56, max_pixels=28 * 28 * 1280):
    """Target (h, w) for an image of `height` x `width`, exactly as transformers' Qwen2-VL `smart_resize` (v4.53+/v5).

    The defaults are transformers' own function defaults, written as it writes them (factor 28 = FACTOR, min 56*56,
    max 28*28*1280); they are not the released processor's limits (PROCESSOR_MIN_PIXELS / PROCESSOR_MAX_PIXELS).

    Both sides become multiples of `factor`; the area is brought inside [min_pixels, max_pixels] keeping the aspect
    ratio roughly. Python's round() is banker's rounding (70/28 = 2.5 -> 2). Raises ValueError, like transformers,
    when the aspect ratio exceeds 200, and (a clearer error than transformers' ZeroDivisionError) for empty sides.
    """
    for name, v in (("height", height), ("width", width), ("factor", factor), ("min_pixels", min_pixels),
                    ("max_pixels", max_pixels)):
        checks.number(v, f"smart_resize: {name}", lo=0, lo_open=True)
    if min_pixels > max_pixels:
        raise ValueError(f"smart_resize: min_pixels {min_pixels} is larger than max_pixels {max_pixels}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# ----------------------------------------------------------------------------------------------------------------------
# Loading and PIL interop


class ImageTooLargeError(ValueError):
    """An image's pixel count exceeds the decompression-bomb limit given to `load_image`."""


class ImageError(ValueError):
    """A source `load_image` cannot read as an image (not an image, truncated, unsupported); names the source."""


_PIL_LIMIT_LOCK = threading.Lock()


def to_pil(image_u8):
    """uint8 [3, H, W] tensor -> PIL RGB image."""
    from PIL import Image

    check_image(image_u8, "to_pil")
    return Image.fromarray(image_u8.cpu().permute(1, 2, 0).contiguous().numpy(), mode="RGB")


def from_pil(img):
    """PIL RGB image -> uint8 [3, H, W] tensor (contiguous)."""
    if img.mode != "RGB":
        raise ValueError(f"from_pil expects an RGB image, got mode {img.mode!r}; use load_image for other modes")
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()  # [3, H, W]


def load_image(source, max_pixels=DEFAULT_MAX_IMAGE_PIXELS, exif_transpose=True):
    """Load an image as uint8 RGB [3, H, W].

    `source`: a path (str / os.PathLike), encoded bytes, a binary file object, or a PIL image.
    Mode conversion follows transformers' `convert_to_rgb` (v5.21+; older versions drop the alpha band): an image
    with an alpha band or a `transparency` entry (P/L/RGB with a transparent colour) is converted to RGBA and
    alpha-composited onto opaque white; every other mode goes through PIL's `convert("RGB")` (L, 1, CMYK, YCbCr,
    I;16, ...).
    EXIF orientation policy: with `exif_transpose=True` (default) the EXIF Orientation tag is applied
    (`PIL.ImageOps.exif_transpose`, as transformers' `load_image` does), so pixels and box coordinates refer to the
    image as a viewer shows it; pass False to keep the stored pixel order.
    Decompression bombs: images with more than `max_pixels` pixels (checked from the header, before decoding) raise
    `ImageTooLargeError`; pass a larger `max_pixels` (or None for no limit) if the image is trusted.
    """
    from PIL import Image, ImageOps

    if isinstance(source, Image.Image):
        img = source
        _check_pixel_limit(img.size, max_pixels, "the given PIL image")
    else:
        if not (isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(source, "read")):
            raise TypeError(f"load_image: expected a path, encoded bytes, a binary file or a PIL image, "
                            f"got {type(source).__name__}")
        name = repr(source) if isinstance(source, (str, os.PathLike)) else f"<{type(source).__name__}>"
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
        try:
            with _PIL_LIMIT_LOCK:  # our own limit replaces Pillow's global one while the header is read
                saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
                try:
                    img = Image.open(fp)
                finally:
                    Image.MAX_IMAGE_PIXELS = saved
            _check_pixel_limit(img.size, max_pixels, name)
            img.load()
        except (FileNotFoundError, IsADirectoryError, ImageTooLargeError):
            raise
        except (OSError, ValueError, SyntaxError, EOFError) as e:   # what Pillow raises for bad or cut files
            raise ImageError(f"{name}: cannot read it as an image ({type(e).__name__}: {e})") from None
    if exif_transpose:
        img = ImageOps.exif_transpose(img)
    has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba).convert("RGB")
    elif img.mode != "RGB":
        img = img.convert("RGB")
    return from_pil(img)


def _check_pixel_limit(size, max_pixels, name):
    w, h = size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageTooLargeError(
            f"{name} is {w}x{h} = {w * h} pixels, above the decompression-bomb limit max_pixels={max_pixels}; "
            f"if the file is trusted, call load_image(..., max_pixels={w * h}) or max_pixels=None"
        )


# ----------------------------------------------------------------------------------------------------------------------
# Validation


def check_image(image, where):
    """ValueError naming `where` unless `image` is a uint8 RGB tensor [3, H, W] with at least one pixel."""
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        desc = f"{image.dtype} tensor of shape {tuple(image.shape)}" if isinstance(image, torch.Tensor) else type(image)
        raise ValueError(f"{where}: expected a uint8 RGB tensor [3, H, W], got {desc} (use load_image / from_pil)")
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"{where}: the image is empty ({image.shape[2]}x{image.shape[1]} pixels); it needs at least "
                         f"one pixel")


def _as_int(v, what):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        if isinstance(v, torch.Tensor) and v.dim() == 0 and not v.is_floating_point():
            return int(v)
        raise ValueError(f"{what} must be an integer, got {v!r}; round pixel coordinates before cropping")
    return int(v)


def check_box(box, height, width):
    """Validate an integer crop box (x0, y0, x1, y1) against an image of height x width; return it as ints."""
    if isinstance(box, torch.Tensor):
        box = box.tolist()
    if len(box) != 4:
        raise ValueError(f"box must be (x0, y0, x1, y1), got {box!r}")
    x0, y0, x1, y1 = (_as_int(v, f"box coordinate {n}") for v, n in zip(box, ("x0", "y0", "x1", "y1")))
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"box {(x0, y0, x1, y1)} is empty or inverted: need x0 < x1 and y0 < y1")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise ValueError(
            f"box {(x0, y0, x1, y1)} lies outside the {width}x{height} (WxH) image: need 0 <= x0 < x1 <= {width} "
            f"and 0 <= y0 < y1 <= {height}; clip the box first"
        )
    return x0, y0, x1, y1


def check_size(size, factor=FACTOR):
    """Validate a target (h, w) whose sides are positive multiples of `factor`; return it as ints."""
    if len(size) != 2:
        raise ValueError(f"size must be (h, w), got {size!r}")
    h, w = (_as_int(v, "size") for v in size)
    if h <= 0 or w <= 0 or h % factor or w % factor:
        raise ValueError(
            f"size (h, w) = {(h, w)} must be positive multiples of {factor} (patch_size * merge_size); "
            f"use smart_resize to pick one"
        )
    return h, w


def crop(image_u8, box):
    """Crop the integer box (x0, y0, x1, y1) (x1, y1 exclusive, like PIL) out of uint8 [3, H, W] -> [3, y1-y0, x1-x0].

    Raises ValueError for non-integer, empty, inverted or out-of-image boxes (PIL would silently pad with black).
    Returns a view; call .contiguous() if you need one.
    """
    check_image(image_u8, "crop")
    x0, y0, x1, y1 = check_box(box, image_u8.shape[1], image_u8.shape[2])
    return image_u8[:, y0:y1, x0:x1]


# ----------------------------------------------------------------------------------------------------------------------
# Pillow's resampling (Resample.c), reference


def _bilinear(x):
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _bicubic(x):  # Keys cubic, a = -0.5; same operation order as Resample.c
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _sinc(x):
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x  # libm sin, the same function Pillow's C code calls


def _lanczos(x):  # Lanczos-3, evaluated per element with math.sin to match libm bit for bit
    flat = [(_sinc(v) * _sinc(v / 3)) if (-3.0 <= v < 3.0) else 0.0 for v in np.asarray(x, np.float64).ravel()]
    return np.array(flat, dtype=np.float64).reshape(np.shape(x))


_FILTERS = {"bilinear": (_bilinear, 1.0), "bicubic": (_bicubic, 2.0), "lanczos": (_lanczos, 3.0)}


def _resample_name(resample):
    """Accept 'lanczos' / 'bicubic' / 'bilinear' (any case) or PIL.Image.Resampling members / their ints (1, 2, 3)."""
    by_int = {1: "lanczos", 2: "bilinear", 3: "bicubic"}
    if isinstance(resample, str) and resample.lower() in _FILTERS:
        return resample.lower()
    if isinstance(resample, (int, np.integer)) and int(resample) in by_int:
        return by_int[int(resample)]
    raise ValueError(f"resample must be one of 'lanczos', 'bicubic', 'bilinear' (or PIL's 1, 3, 2), got {resample!r}")


@functools.lru_cache(maxsize=4096)
def pil_coeffs(in_size, out_size, resample):
    """Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for a full-range box [0, in_size).

    Returns (xmin int32 [out], count int32 [out], weights int32 [out, ksize]) where output index i reads input indices
    xmin[i] .. xmin[i]+count[i]-1 with PRECISION_BITS (22)-bit fixed-point weights (entries past count are 0).
    Support grows with the downscale factor (antialiasing); taps outside the image are dropped and the rest
    renormalized. Coefficients are computed in double exactly in Resample.c's operation order.
    """
    fn, support0 = _FILTERS[_resample_name(resample)]
    scale = in_size / out_size  # (double)(in1 - in0) / outSize
    filterscale = max(scale, 1.0)
    support = support0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale  # [out]  (in0 = 0)
    ss = 1.0 / filterscale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)  # (int) truncates toward zero
    xmax = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64) - xmin
    k = np.zeros((out_size, ksize), dtype=np.float64)
    ww = np.zeros(out_size, dtype=np.float64)
    for j in range(ksize):  # sequential sum, as in C
        valid = j < xmax
        w = fn(((j + xmin).astype(np.float64) - center + 0.5) * ss)
        w = np.where(valid, w, 0.0)
        k[:, j] = w
        ww = ww + w
    k = np.where(ww[:, None] != 0.0, k / np.where(ww == 0.0, 1.0, ww)[:, None], k)
    scaled = k * (1 << PRECISION_BITS)
    fixed = np.trunc(np.where(k < 0, scaled - 0.5, scaled + 0.5)).astype(np.int32)  # round half away from zero
    out = (xmin.astype(np.int32), xmax.astype(np.int32), fixed)
    for a in out:
        a.flags.writeable = False  # cached: shared between callers
    return out


def pil_pass_order(in_hw, out_hw):
    """Which separable passes Pillow 13.0.0 runs for an RGB resize, in order: a list drawn from 'h' and 'v'.

    A pass is skipped when its side does not change; the vertical pass goes first when the height shrinks by more
    than twice as many pixels as the width (ImagingResampleInner in Pillow 13; Pillow <= 12 is always h then v).
    """
    (H, W), (h, w) = in_hw, out_hw
    order = ["v", "h"] if (H - h) > 0 and (H - h) > (W - w) * 2 else ["h", "v"]
    return [p for p in order if (p == "h" and w != W) or (p == "v" and h != H)]


def _resample_pass(img, axis, out_size, resample):
    """One Pillow 8-bit pass along `axis` (2 = width, 1 = height) of a uint8 [3, H, W] tensor."""
    xmin, count, wts = pil_coeffs(img.shape[axis], out_size, resample)
    ksize = wts.shape[1]
    idx = torch.from_numpy(np.minimum(xmin[:, None] + np.arange(ksize), img.shape[axis] - 1).astype(np.int64))
    wts = torch.from_numpy(wts.copy())  # [out, ksize] int32; zero past count, so the clamped indices add nothing
    shape = list(img.shape)
    shape[axis] = out_size
    acc = torch.full(shape, 1 << (PRECISION_BITS - 1), dtype=torch.int32)  # [3, h|H, W|w]
    wshape = [1, 1, 1]
    wshape[axis] = out_size
    for j in range(ksize):
        acc += img.index_select(axis, idx[:, j]).to(torch.int32) * wts[:, j].view(wshape)
    return (acc >> PRECISION_BITS).clamp_(0, 255).to(torch.uint8)  # clip8


def _pillow_pinned():
    from PIL import __version__

    return __version__ == "13.0.0"


def resize(image_u8, size, resample="lanczos", backend="auto"):
    """Resize uint8 [3, H, W] to size=(h, w), bit-identical to Pillow 13.0.0 `Image.resize((w, h), resample)`.

    `resample`: 'lanczos' | 'bicubic' | 'bilinear'; any positive size. Runs on the CPU, returns on the input's device.
    `backend`: 'torch' runs the spec above (Pillow's coefficients, fixed point and pass order written out in torch);
    'pillow' calls Pillow's C code; 'auto' (default) is 'pillow' when the installed Pillow is the pinned 13.0.0 (the
    tests check the two give the same bits; Pillow is 3-20x faster on large images) and 'torch' otherwise.
    """
    check_image(image_u8, "resize")
    if not isinstance(size, (list, tuple, torch.Size)) or len(size) != 2:
        raise ValueError(f"resize: size must be (h, w), got {size!r}")
    h, w = (_as_int(v, "size") for v in size)
    if h <= 0 or w <= 0:
        raise ValueError(f"resize: target size must be positive, got (h, w) = {(h, w)}")
    name = _resample_name(resample)
    if backend not in ("auto", "torch", "pillow"):
        raise ValueError(f"resize: backend must be 'auto', 'torch' or 'pillow', got {backend!r}")
    if backend == "pillow" or (backend == "auto" and _pillow_pinned()):
        pil_id = {"lanczos": 1, "bilinear": 2, "bicubic": 3}[name]
        return from_pil(to_pil(image_u8).resize((w, h), pil_id)).to(image_u8.device)
    img = image_u8.cpu()
    for p in pil_pass_order(tuple(img.shape[1:]), (h, w)):
        img = _resample_pass(img, 2 if p == "h" else 1, w if p == "h" else h, name)
    img = img.clone() if img is image_u8 else img.contiguous()
    return img.to(image_u8.device)


# ----------------------------------------------------------------------------------------------------------------------
# Normalize + patchify, reference


def normalize_lut(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, rescale=1 / 255):
    """float32 [3, 256]: the normalized value of every uint8 level, computed as transformers' PIL backend does:
    float64 multiply by `rescale`, cast to float32, then (x - mean) / std in float32."""
    levels = torch.arange(256, dtype=torch.float64) * rescale  # [256]
    x = levels.to(torch.float32)[None, :]  # [1, 256]
    m = torch.tensor(mean, dtype=torch.float32)[:, None]  # [3, 1]
    s = torch.tensor(std, dtype=torch.float32)[:, None]
    return (x - m) / s  # [3, 256]


def patchify(image, patch_size=PATCH_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE, merge_size=MERGE_SIZE,
             mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
    """Qwen2-VL `pixel_values` for one image already at its final size.

    image: uint8 [3, h, w], or float [3, h, w] holding 0-255 pixel values (rescaled the same way), h and w multiples
    of patch_size * merge_size.
    Returns (pixel_values float32 [h*w/p^2, 3*T*p*p], grid_thw int64 [1, 3] = (1, h/p, w/p)).
    Row order: block-row, block-col, in-block row, in-block col; column order: channel, time copy, py, px.
    """
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"patchify expects a tensor [3, h, w], got {getattr(image, 'shape', type(image).__name__)}")
    if image.is_floating_point() and not bool(((image >= 0) & (image <= 255)).all()):   # NaN fails both
        raise ValueError("patchify: a float image must hold pixel values in [0, 255] (no NaN / inf)")
    _, h, w = image.shape
    factor = patch_size * merge_size
    check_size((h, w), factor)
    x = image.cpu().to(torch.float64) * (1 / 255)  # transformers: astype(float64) * rescale_factor
    x = x.to(torch.float32)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    x = (x - m) / s  # [3, h, w]
    gh, gw, p, ms = h // patch_size, w // patch_size, patch_size, merge_size
    x = x.view(3, gh // ms, ms, p, gw // ms, ms, p)  # [c, bh, mh, py, bw, mw, px]
    x = x.permute(1, 4, 2, 5, 0, 3, 6)  # [bh, bw, mh, mw, c, py, px]
    x = x.reshape(gh * gw, 3, 1, p, p).expand(gh * gw, 3, temporal_patch_size, p, p)  # [N, c, tt, py, px]
    pixel_values = x.reshape(gh * gw, 3 * temporal_patch_size * p * p)  # [N, 1176]
    return pixel_values, torch.tensor([[1, gh, gw]], dtype=torch.int64)


# ----------------------------------------------------------------------------------------------------------------------
# The processor, one image end to end: checkpoint pixel limits -> smart_resize -> resize -> patchify


def read_image_limits(directory: str) -> tuple[int, int]:
    """(min_pixels, max_pixels) of a checkpoint's preprocessor_config.json: the hub layout's `min_pixels` /
    `max_pixels`, or transformers 5's `size: {shortest_edge, longest_edge}` (both are pixel counts for Qwen2-VL).
    A checkpoint without the file gets the released defaults."""
    path = os.path.join(directory, "preprocessor_config.json")
    if not os.path.exists(path):
        return PROCESSOR_MIN_PIXELS, PROCESSOR_MAX_PIXELS
    try:
        with open(path, encoding="utf-8") as f:
            pp = json.load(f)
    except (ValueError, RecursionError) as e:     # not JSON, not UTF-8 (UnicodeDecodeError is a ValueError)
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(pp, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(pp).__name__}")
    size = pp.get("size") if isinstance(pp.get("size"), dict) else {}
    lo = pp.get("min_pixels", size.get("shortest_edge", PROCESSOR_MIN_PIXELS))
    hi = pp.get("max_pixels", size.get("longest_edge", PROCESSOR_MAX_PIXELS))
    if not (isinstance(lo, int) and isinstance(hi, int) and 0 < lo <= hi):
        raise ValueError(f"{path}: min_pixels/max_pixels must be integers with 0 < min <= max, got {lo}, {hi}")
    return lo, hi


def processor_resize(image_u8: torch.Tensor, min_pixels: int = PROCESSOR_MIN_PIXELS, max_pixels: int = PROCESSOR_MAX_PIXELS,
                     resample="bicubic", factor: int = FACTOR) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, h, w] at the processor's smart_resize size (the image itself when it is already
    there): the resize half of preprocess_image. A uint8 image is 8x smaller than its float32 patches, so callers that
    keep many images (sft.py's sample cache) keep these and patchify on use."""
    check_image(image_u8, "processor_resize")
    H, W = int(image_u8.shape[1]), int(image_u8.shape[2])
    h, w = smart_resize(H, W, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return image_u8 if (h, w) == (H, W) else resize(image_u8, (h, w), resample=resample)


def preprocess_image(image_u8: torch.Tensor, min_pixels: int = PROCESSOR_MIN_PIXELS, max_pixels: int = PROCESSOR_MAX_PIXELS, resample="bicubic",
                     patch_size: int = PATCH_SIZE, merge_size: int = MERGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [3, H, W] -> (pixel_values float32 [h*w/196, 1176], grid_thw int64 [1, 3]) like Qwen2.5-VL's processor
    (PIL backend): smart_resize with the hub preprocessor_config's min/max pixels, Pillow resize, rescale, normalize,
    patchify. Defaults are the released checkpoints' (min 4*28*28, max 16384*28*28, bicubic)."""
    img = processor_resize(image_u8, min_pixels, max_pixels, resample, patch_size * merge_size)
    return patchify(img, patch_size=patch_size, merge_size=merge_size)


# ----------------------------------------------------------------------------------------------------------------------
# Batched entry point


def _prepare(image, boxes, sizes, resample, out_dtype):
    """Validate the batch; return (list of [3,H,W] images, per-crop image index, boxes, sizes, filter name)."""
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    for i, im in enumerate(images):
        check_image(im, f"crop_resize_patchify image {i}")
        if im.device != images[0].device:
            raise ValueError(f"all images must be on one device, image {i} is on {im.device} not {images[0].device}")
    if isinstance(boxes, torch.Tensor):
        boxes = boxes.tolist()
    boxes, sizes = checks.sequence(boxes, "boxes", empty=True), checks.sequence(sizes, "sizes", empty=True)
    if len(boxes) != len(sizes) or not boxes:
        raise ValueError(f"need one size per box and at least one box, got {len(boxes)} boxes and {len(sizes)} sizes")
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"out_dtype must be torch.float32 or torch.bfloat16, got {out_dtype}")
    ids, checked = [], []
    for n, b in enumerate(boxes):
        if len(images) > 1:  # (image_index, x0, y0, x1, y1)
            if len(b) != 5:
                raise ValueError(f"box {n}: with several images each box is (image_index, x0, y0, x1, y1), got {b!r}")
            k = _as_int(b[0], f"box {n} image index")
            if not 0 <= k < len(images):
                raise ValueError(f"box {n}: image index {k} out of range for {len(images)} images")
            b = b[1:]
        else:
            k = 0
        H, W = images[k].shape[1:]
        try:
            checked.append(check_box(b, H, W))
        except ValueError as e:
            raise ValueError(f"box {n}: {e}") from None
        ids.append(k)
    sizes = [check_size(s) for s in sizes]
    return images, ids, checked, sizes, _resample_name(resample)


def crop_resize_patchify(image, boxes, sizes, resample="lanczos", out_dtype=torch.float32):
    """Crop each box, resize it with Pillow's filter, normalize and patchify; all crops in one `pixel_values`.

    image: uint8 [3, H, W] on CPU or CUDA, or a list of them (then each box is (image_index, x0, y0, x1, y1)).
    boxes: integer (x0, y0, x1, y1) per crop, in image pixels, x1/y1 exclusive.
    sizes: (h, w) per crop, multiples of FACTOR = 28 (see smart_resize).
    Returns (pixel_values [sum_i h_i*w_i/PATCH_SIZE^2, PATCH_DIM] = [sum_i h_i*w_i/196, 1176] in out_dtype on the
             image's device,
             grid_thw int64 [n, 3] on the CPU). CUDA images take the Triton kernels; CPU images the reference
    chain, resizing with Pillow 13.0.0's C code when that is the installed Pillow (else with the torch `resize`).
    All paths give the same bits (bf16 = round-to-nearest-even of the float32 values).
    """
    images, ids, boxes, sizes, name = _prepare(image, boxes, sizes, resample, out_dtype)
    grid = torch.tensor([[1, h // PATCH_SIZE, w // PATCH_SIZE] for h, w in sizes], dtype=torch.int64)
    if images[0].is_cuda:
        return _triton_crop_resize_patchify(images, ids, boxes, sizes, name, out_dtype), grid
    return reference_crop_resize_patchify(images, ids, boxes, sizes, name, out_dtype, backend="auto"), grid


def reference_crop_resize_patchify(images, ids, boxes, sizes, resample, out_dtype=torch.float32, backend="torch"):
    """The reference chain for a validated batch (see crop_resize_patchify) on the CPU; returns pixel_values only.
    `backend` is resize's: 'torch' (default here: the spec), 'pillow' or 'auto'."""
    out = []
    for k, box, size in zip(ids, boxes, sizes):
        r = resize(crop(images[k].cpu(), box), size, resample, backend=backend)  # [3, h, w] uint8
        out.append(patchify(r)[0])
    return torch.cat(out).to(out_dtype)


def triton_crop_resize_patchify(image, boxes, sizes, resample="lanczos", out_dtype=torch.float32, **blocks):
    """crop_resize_patchify through the Triton kernels wherever the tensors are (CUDA, or CPU with TRITON_INTERPRET=1).

    Same arguments and result as crop_resize_patchify; `blocks` overrides the launch tiling (BP, BQ, BLOCK2, num_warps).
    """
    images, ids, boxes, sizes, name = _prepare(image, boxes, sizes, resample, out_dtype)
    grid = torch.tensor([[1, h // PATCH_SIZE, w // PATCH_SIZE] for h, w in sizes], dtype=torch.int64)
    return _triton_crop_resize_patchify(images, ids, boxes, sizes, name, out_dtype, **blocks), grid


# ----------------------------------------------------------------------------------------------------------------------
# Triton kernels (CUDA; CPU under TRITON_INTERPRET=1)
#
# Two launches per batch, because Pillow rounds to uint8 between its separable passes:
#   pass 1: for every crop, Pillow's first pass (horizontal or vertical, per pil_pass_order) from the source image into
#           a uint8 workspace [3, P, Q] per crop (an identity pass when that side keeps its size).
#   pass 2: the second pass from the workspace, then uint8 -> normalized value through a [3, 256] table holding the
#           output dtype's bit patterns (float32 or bf16, rounded on the host by torch, so the kernel only moves bits),
#           stored twice (the two temporal copies) straight into pixel_values.
# Filter weights are Pillow's int32 tables with PRECISION_BITS (22) fraction bits from pil_coeffs (host), accumulated
# in int32 from the rounding offset 1 << (PRECISION_BITS - 1) and shifted right by PRECISION_BITS, as Resample.c does.
#
# Output index map (kernels.md 1.1) for one crop of h x w, with p = PATCH_SIZE (14), m = MERGE_SIZE (2),
# T = TEMPORAL_PATCH_SIZE (2), 3 channels, and gw2 = w / FACTOR (FACTOR = p*m = 28):
#   unique value e = r*(3*p*p) + c*(p*p) + py*p + px   (r: patch row of this crop, c: channel; 3*p*p = 588, p*p = 196)
#   mw = r % m, mh = (r // m) % m, wb = (r // (m*m)) % gw2, hb = r // (m*m*gw2)
#   y = (m*hb + mh)*p + py,  x = (m*wb + mw)*p + px
#   pixel_values[row0 + r, c*(T*p*p) + tt*(p*p) + py*p + px] = lut[c, pixel(c, y, x)]  for tt in 0 .. T-1
#   (a row holds 3*T*p*p = PATCH_DIM = 1176 values; c*(T*p*p) = c*392)

_M1 = ("src_off", "chan_stride", "row_stride", "P", "Q", "ws_off", "axis_h", "tb", "wb", "ks", "n_tp", "n_tq")
_M2 = ("ws_off", "P", "Q", "gw2", "axis_h", "tb", "wb", "ks", "row0", "n")
_KERNELS = {}


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _kernels():
    """Define the Triton kernels on first use (after TRITON_INTERPRET is read), cached per interpreter setting."""
    key = _interpreting()
    if key in _KERNELS:
        return _KERNELS[key]
    import triton
    import triton.language as tl

    g = globals()
    if g["_K_PRECISION_BITS"] is None:  # set once: triton refuses to relaunch a kernel whose globals changed
        g.update(_K_PRECISION_BITS=tl.constexpr(PRECISION_BITS),
                 _K_ROUNDING=tl.constexpr(1 << (PRECISION_BITS - 1)),  # Resample.c's rounding offset, one half
                 _K_PATCH_SIZE=tl.constexpr(PATCH_SIZE), _K_MERGE_SIZE=tl.constexpr(MERGE_SIZE),
                 _K_TEMPORAL_PATCH_SIZE=tl.constexpr(TEMPORAL_PATCH_SIZE))
    # In the kernels: locals that hold these are annotated tl.constexpr (a plain assignment makes a runtime value),
    # and a constexpr stays on the right of an operator whose other side is a tensor (the interpreter runs the
    # operators as Python: constexpr has no __rlshift__, and constexpr * tensor would wrap a tensor in a constexpr).
    _KERNELS[key] = (_pass1_kernel(triton, tl), _pass2_kernel(triton, tl))
    return _KERNELS[key]


def _pass1_kernel(triton, tl):
    """The first pass: a crop's rows (or columns) resampled along one axis into the uint8 workspace, Pillow's fixed
    point (one program per crop block of BP x BQ workspace values)."""

    @triton.jit
    def pass1_kernel(src_ptr, ws_ptr, bounds_ptr, wts_ptr, meta_ptr, prog_ptr,
                     NM: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr):
        pid = tl.program_id(0)
        crop = tl.load(prog_ptr + 2 * pid)
        blk = tl.load(prog_ptr + 2 * pid + 1)
        m = meta_ptr + crop * NM
        src_off = tl.load(m + 0)
        chan_stride = tl.load(m + 1)
        row_stride = tl.load(m + 2)
        P = tl.load(m + 3)
        Q = tl.load(m + 4)
        ws_off = tl.load(m + 5)
        axis_h = tl.load(m + 6)
        tb = tl.load(m + 7)
        wb = tl.load(m + 8)
        ks = tl.load(m + 9)
        n_tp = tl.load(m + 10)
        n_tq = tl.load(m + 11)
        c = blk // (n_tp * n_tq)
        tp = (blk // n_tq) % n_tp
        tq = blk % n_tq
        p = tp * BP + tl.arange(0, BP)[:, None]  # [BP, 1] workspace row
        q = tq * BQ + tl.arange(0, BQ)[None, :]  # [1, BQ] workspace col
        inside = (p < P) & (q < Q)  # [BP, BQ]
        src = src_ptr + src_off + c * chan_stride
        acc = tl.full((BP, BQ), _K_ROUNDING, tl.int32)  # 1 << (PRECISION_BITS - 1)
        if axis_h != 0:  # resample along width: output col q reads source cols xmin[q] + j of source row p
            # (names differ between the branches: Triton's `if` rejects a name bound to two shapes)
            qm = q < Q
            hxmin = tl.load(bounds_ptr + 2 * (tb + q), mask=qm, other=0)  # [1, BQ]
            hcnt = tl.load(bounds_ptr + 2 * (tb + q) + 1, mask=qm, other=0)
            hbase = src + p * row_stride + hxmin  # [BP, BQ]
            j = ks * 0
            while j < ks:  # (`while`, not `for j in range(ks)`: triton 3.6's interpreter can't range over a load)
                hw = tl.load(wts_ptr + wb + q * ks + j, mask=qm & (j < hcnt), other=0)  # [1, BQ]
                hv = tl.load(hbase + j, mask=inside & (j < hcnt), other=0)  # [BP, BQ] uint8
                acc += hv.to(tl.int32) * hw
                j += 1
        else:  # resample along height: output row p reads source rows xmin[p] + j at col q
            pm = p < P
            vxmin = tl.load(bounds_ptr + 2 * (tb + p), mask=pm, other=0)  # [BP, 1]
            vcnt = tl.load(bounds_ptr + 2 * (tb + p) + 1, mask=pm, other=0)
            vbase = src + vxmin * row_stride + q  # [BP, BQ]
            i = ks * 0
            while i < ks:
                vw = tl.load(wts_ptr + wb + p * ks + i, mask=pm & (i < vcnt), other=0)  # [BP, 1]
                vv = tl.load(vbase + i * row_stride, mask=inside & (i < vcnt), other=0)  # [BP, BQ] uint8
                acc += vv.to(tl.int32) * vw
                i += 1
        out = tl.minimum(tl.maximum(acc >> _K_PRECISION_BITS, 0), 255).to(tl.uint8)  # clip8
        tl.store(ws_ptr + ws_off + c * P * Q + p * Q + q, out, mask=inside)

    return pass1_kernel


def _pass2_kernel(triton, tl):
    """The second pass: the other axis resampled, normalised through the LUT and written straight into the
    crop's rows of pixel_values in Qwen2-VL's patch order (one program per BLOCK output values)."""

    @triton.jit
    def pass2_kernel(ws_ptr, out_ptr, lut_ptr, bounds_ptr, wts_ptr, meta_ptr, prog_ptr,
                     NM: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        crop = tl.load(prog_ptr + 2 * pid)
        blk = tl.load(prog_ptr + 2 * pid + 1)
        m = meta_ptr + crop * NM
        ws_off = tl.load(m + 0)
        P = tl.load(m + 1)
        Q = tl.load(m + 2)
        gw2 = tl.load(m + 3)
        axis_h = tl.load(m + 4)
        tb = tl.load(m + 5)
        wb = tl.load(m + 6)
        ks = tl.load(m + 7)
        row0 = tl.load(m + 8)
        n = tl.load(m + 9)
        ps: tl.constexpr = _K_PATCH_SIZE  # p, m, T of the index map above
        ms: tl.constexpr = _K_MERGE_SIZE
        tps: tl.constexpr = _K_TEMPORAL_PATCH_SIZE
        pp: tl.constexpr = ps * ps  # values per patch and channel
        e = blk * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] unique output values of this crop, in output order
        inside = e < n
        r = e // (3 * pp)
        c = (e // pp) % 3
        pix = e % pp
        py = pix // ps
        px = pix % ps
        mblk = r // (ms * ms)  # merged block, row-major over the crop's (h / FACTOR) x gw2 blocks
        y = ((mblk // gw2) * ms + (r // ms) % ms) * ps + py
        x = ((mblk % gw2) * ms + r % ms) * ps + px
        ws = ws_ptr + ws_off + c * P * Q
        o = tl.where(axis_h != 0, x, y)  # output index along the resampled axis
        u = tl.where(axis_h != 0, y, x)  # index along the other axis
        u_stride = tl.where(axis_h != 0, Q, 1)
        tap_stride = tl.where(axis_h != 0, 1, Q)
        xmin = tl.load(bounds_ptr + 2 * (tb + o), mask=inside, other=0)
        cnt = tl.load(bounds_ptr + 2 * (tb + o) + 1, mask=inside, other=0)
        base = ws + u * u_stride + xmin * tap_stride
        acc = tl.full((BLOCK,), _K_ROUNDING, tl.int32)  # 1 << (PRECISION_BITS - 1)
        j = ks * 0
        while j < ks:
            mj = inside & (j < cnt)
            w = tl.load(wts_ptr + wb + o * ks + j, mask=mj, other=0)
            v = tl.load(base + j * tap_stride, mask=mj, other=0)
            acc += v.to(tl.int32) * w
            j += 1
        v8 = tl.minimum(tl.maximum(acc >> _K_PRECISION_BITS, 0), 255)  # clip8
        val = tl.load(lut_ptr + c * 256 + v8, mask=inside, other=0)  # output dtype's bit pattern
        dst = out_ptr + (row0 + r).to(tl.int64) * (3 * tps * pp) + c * (tps * pp) + pix  # row length PATCH_DIM
        for tt in tl.static_range(tps):  # the temporal copies
            tl.store(dst + tt * pp, val, mask=inside)

    return pass2_kernel


def _identity_coeffs(n):
    return np.arange(n, dtype=np.int32), np.ones(n, np.int32), np.full((n, 1), 1 << PRECISION_BITS, np.int32)


def _plan(shapes, offsets, ids, boxes, sizes, resample, BP, BQ, BLOCK2):
    """Host side of the Triton path: per-crop pass tables, metadata rows and program -> (crop, block) maps (numpy)."""
    bounds, wts, meta1, meta2, prog1, prog2 = [], [], [], [], [], []
    n_b = n_w = ws_total = rows = 0
    for i, (k, (x0, y0, x1, y1), (h, w)) in enumerate(zip(ids, boxes, sizes)):
        H, W = y1 - y0, x1 - x0
        order = pil_pass_order((H, W), (h, w))
        first = order[0] if order else "h"
        second = "v" if first == "h" else "h"
        P, Q = (H, w) if first == "h" else (h, W)
        tabs = []
        for axis, n_in, n_out in ((first, W if first == "h" else H, w if first == "h" else h),
                                  (second, P if second == "v" else Q, h if second == "v" else w)):
            co = pil_coeffs(n_in, n_out, resample) if axis in order else _identity_coeffs(n_out)
            tabs.append((n_b, n_w, co[2].shape[1]))
            bounds.append(np.stack([co[0], co[1]], 1).ravel())
            wts.append(co[2].ravel())
            n_b += n_out
            n_w += co[2].size
        n_tp, n_tq = -(-P // BP), -(-Q // BQ)
        imH, imW = shapes[k]
        meta1.append((offsets[k] + y0 * imW + x0, imH * imW, imW, P, Q, ws_total, int(first == "h"), *tabs[0],
                      n_tp, n_tq))
        meta2.append((ws_total, P, Q, w // FACTOR, int(second == "h"), *tabs[1], rows, 3 * h * w))
        prog1.append(np.stack([np.full(3 * n_tp * n_tq, i), np.arange(3 * n_tp * n_tq)], 1))
        nb2 = -(-3 * h * w // BLOCK2)
        prog2.append(np.stack([np.full(nb2, i), np.arange(nb2)], 1))
        ws_total += 3 * P * Q
        rows += h * w // (PATCH_SIZE * PATCH_SIZE)
    if max(ws_total, offsets[-1] + 3 * shapes[-1][0] * shapes[-1][1], n_w) >= 2**31:
        raise ValueError("batch too large for int32 indexing: split it into several calls")
    cat = lambda xs: np.ascontiguousarray(np.concatenate(xs).astype(np.int32))
    return dict(bounds=cat(bounds), wts=cat(wts), meta1=np.array(meta1, np.int32), meta2=np.array(meta2, np.int32),
                prog1=cat(prog1), prog2=cat(prog2), ws_total=ws_total, rows=rows)


_LUTS = {}


def _lut_bits(out_dtype, device):
    """[3, 256] normalized values in out_dtype, viewed as same-width ints (the kernels copy bits); cached per device."""
    key = (out_dtype, str(device))
    if key not in _LUTS:
        lut = normalize_lut().to(out_dtype)  # bf16: torch's round-to-nearest-even of the float32 values
        _LUTS[key] = lut.view(torch.int32 if out_dtype == torch.float32 else torch.int16).contiguous().to(device)
    return _LUTS[key]


_WARNED = []


def _triton_launcher(images, ids, boxes, sizes, resample, out_dtype, BP=None, BQ=None, BLOCK2=None, num_warps=4):
    """Do the host work once (tables, metadata, one upload, buffers) and return run() -> pixel_values (two launches)."""
    pass1, pass2 = _kernels()
    device = images[0].device
    big = _interpreting()  # the interpreter pays per program: few, large programs
    BP, BQ, BLOCK2 = BP or (64 if big else 8), BQ or 128, BLOCK2 or (65536 if big else 1024)
    if len(images) == 1:
        src, offsets = images[0].contiguous(), [0]
    else:  # one flat buffer so that one pointer covers every source image
        src = torch.cat([im.reshape(-1) for im in images])
        offsets = np.cumsum([0] + [im.numel() for im in images[:-1]]).tolist()
    plan = _plan([tuple(im.shape[1:]) for im in images], offsets, ids, boxes, sizes, resample, BP, BQ, BLOCK2)
    names = ("bounds", "wts", "meta1", "meta2", "prog1", "prog2")
    flat = torch.from_numpy(np.concatenate([plan[k].ravel() for k in names])).to(device)  # one host -> device copy
    t, at = {}, 0
    for k in names:
        t[k] = flat[at:at + plan[k].size]
        at += plan[k].size
    ws = torch.empty(plan["ws_total"], dtype=torch.uint8, device=device)
    out = torch.empty(plan["rows"], PATCH_DIM, dtype=torch.int32 if out_dtype == torch.float32 else torch.int16,
                      device=device)
    lut = _lut_bits(out_dtype, device)
    n1, n2 = plan["prog1"].shape[0], plan["prog2"].shape[0]

    def run():
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():  # launch on its GPU
            return launch()

    def launch():
        pass1[(n1,)](src, ws, t["bounds"], t["wts"], t["meta1"], t["prog1"], NM=len(_M1), BP=BP, BQ=BQ,
                     num_warps=num_warps, enable_fp_fusion=False)  # (integer kernels: no float math to fuse)
        pass2[(n2,)](ws, out, lut, t["bounds"], t["wts"], t["meta2"], t["prog2"], NM=len(_M2), BLOCK=BLOCK2,
                     num_warps=num_warps, enable_fp_fusion=False)
        return out.view(out_dtype)

    return run


def _triton_crop_resize_patchify(images, ids, boxes, sizes, resample, out_dtype, **blocks):
    try:
        return _triton_launcher(images, ids, boxes, sizes, resample, out_dtype, **blocks)()
    except ImportError:
        if not _WARNED:
            warnings.warn("triton is not installed: crop_resize_patchify runs the CPU reference for CUDA images")
            _WARNED.append(1)
        cpu = [im.cpu() for im in images]
        return reference_crop_resize_patchify(cpu, ids, boxes, sizes, resample, out_dtype, "auto").to(images[0].device)


# ----------------------------------------------------------------------------------------------------------------------
# Benchmark and GPU acceptance check: python crop_kernels.py --bench | --check

BENCH_SOURCES = ((1024, 768), (2048, 1536), (3840, 2160), (7680, 4320))  # (W, H)


def _bench_batch(W, H, n=8):
    """n crops of about half the source's sides, spread around the centre; each resized per smart_resize defaults."""
    cw, ch = W // 2, H // 2
    boxes = []
    for i in range(n):
        dx, dy = (i % 4 - 1.5) / 1.5 * (W // 8), (i // 4 - 0.5) * (H // 8)  # within +-W/8, +-H/16 of centred
        x0, y0 = W // 4 + int(dx), H // 4 + int(dy)
        boxes.append((x0, y0, x0 + cw, y0 + ch))
    return boxes, [smart_resize(ch, cw)] * n


def _timer_cpu(fn, budget_s=1.0, max_reps=20):
    """(p50, p20, p80) in ms of fn() on the CPU: one warm-up run (kept as the only sample if it took over budget_s),
    then more runs while under budget_s."""
    import time

    t0 = time.perf_counter()
    fn()
    first = (time.perf_counter() - t0) * 1e3
    if first > budget_s * 1e3:
        return first, first, first
    times, t_end = [], time.perf_counter() + budget_s
    while len(times) < max_reps and (not times or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = np.percentile(times, [50, 20, 80])
    return tuple(float(v) for v in q)


def _timer_cuda(fn):
    import triton.testing

    return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))


def _copy_bandwidth(device):
    """Measured copy bandwidth in GB/s (bytes read + written) of a 512 MiB (CUDA) / 128 MiB (CPU) buffer."""
    n = (512 if device.type == "cuda" else 128) << 20
    x = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    y = torch.empty_like(x)
    t = (_timer_cuda if device.type == "cuda" else _timer_cpu)(lambda: y.copy_(x))[0]
    return 2 * n / (t * 1e-3) / 1e9


def _torch_eager(image, boxes, sizes):
    """Plain torch on the image's device: crop + interpolate(bicubic, antialias) + round + normalize + patchify.
    (Not Pillow-exact: a float filter with no uint8 step between passes; here only for speed.)"""
    import torch.nn.functional as F

    mean = torch.tensor(OPENAI_CLIP_MEAN, device=image.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(OPENAI_CLIP_STD, device=image.device).view(1, 3, 1, 1) * 255
    out = []
    for (x0, y0, x1, y1), (h, w) in zip(boxes, sizes):
        x = image[None, :, y0:y1, x0:x1].float()  # [1, 3, Hc, Wc]
        x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 255).round_()
        x = (x - mean) / std  # [1, 3, h, w]
        p, m = PATCH_SIZE, MERGE_SIZE
        x = x.view(3, h // FACTOR, m, p, w // FACTOR, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # [bh, bw, mh, mw, c, py, px]
        x = x.reshape(-1, 3, 1, p, p).expand(-1, 3, TEMPORAL_PATCH_SIZE, p, p)
        out.append(x.reshape(-1, PATCH_DIM))
    return torch.cat(out)


def _cuda_graph(fn):
    """Capture fn (after one warm-up/JIT call) into a CUDA graph; return its replay (no per-launch host cost)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _pil_pipeline(image_u8, boxes, sizes, proc):
    """The released CoF path on the CPU: PIL crop + LANCZOS resize, then transformers' PIL image processor."""
    pil = to_pil(image_u8)
    crops = [pil.crop(b).resize((w, h), 1) for b, (h, w) in zip(boxes, sizes)]
    return proc(images=crops, do_resize=False, return_tensors="pt")["pixel_values"]


def _hf_processors():
    """transformers' Qwen2-VL image processors, the baselines: (PIL backend, torchvision backend on the device); one
    that cannot be built (no transformers, no torchvision) is None and the reason is printed."""
    hf_pil = hf_dev = None
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        hf_pil = Qwen2VLImageProcessorPil()
    except Exception as e:  # noqa: BLE001 - a benchmark row, reported
        print(f"# transformers PIL processor unavailable: {e!r}")
    try:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

        hf_dev = Qwen2VLImageProcessor()
    except Exception as e:  # noqa: BLE001
        print(f"# transformers torchvision processor unavailable: {type(e).__name__}: {e}")
    return hf_pil, hf_dev


def bench(sources=BENCH_SOURCES, n_crops=8, resample="lanczos", sweep=False):
    """Print one table: ms (p50 [p20, p80]), GB/s and % of measured copy bandwidth per implementation and source."""
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    card = torch.cuda.get_device_name() if cuda else "no CUDA GPU (CPU rows only)"
    copy_cpu = _copy_bandwidth(torch.device("cpu"))
    copy_dev = _copy_bandwidth(dev) if cuda else copy_cpu
    print(f"# crop_kernels bench: {card}; torch {torch.__version__} ({torch.get_num_threads()} CPU threads); "
          f"{n_crops} crops per batch, resample={resample}")
    print(f"# copy bandwidth: device {copy_dev:.0f} GB/s, host {copy_cpu:.1f} GB/s. GB/s counts the crops' uint8 bytes "
          f"read once + pixel_values written; % is of the copy bandwidth of the device the row runs on.")
    hf_pil, hf_dev = _hf_processors()
    hdr = (f"{'source':>10} {'implementation':<44} {'ms p50':>9} {'[p20, p80]':>19} {'GB/s':>8} {'% copy':>7} "
           f"{'vs HF':>7}")
    print(hdr)
    print("-" * len(hdr))
    g = torch.Generator().manual_seed(0)
    for W, H in sources:
        boxes, sizes = _bench_batch(W, H, n_crops)
        image_cpu = torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=g)
        image = image_cpu.to(dev)
        in_bytes = sum(3 * (y1 - y0) * (x1 - x0) for x0, y0, x1, y1 in boxes)
        out_elems = sum(3 * TEMPORAL_PATCH_SIZE * h * w for h, w in sizes)
        rows = []  # (name, device, out bytes per element, timings or an error string)

        def add(name, where, nbytes, timer, fn):
            try:
                rows.append((name, where, nbytes, timer(fn)))
            except Exception as e:  # noqa: BLE001 - one failing baseline must not hide the others
                rows.append((name, where, nbytes, f"failed: {type(e).__name__}: {str(e)[:80]}"))

        if cuda:
            ids = [0] * len(boxes)
            if hf_dev is not None:
                crops = [image[:, y0:y1, x0:x1] for x0, y0, x1, y1 in boxes]
                add("transformers Qwen2VLImageProcessor (device)", "dev", 4, _timer_cuda,
                    lambda: hf_dev(images=crops, device=dev, return_tensors="pt"))
            add("torch eager: crop+interpolate+normalize (fp32)", "dev", 4, _timer_cuda,
                lambda: _torch_eager(image, boxes, sizes))

            def built(make):   # a launcher or graph is built inside add's try: its failure is one failed row
                return _timer_cuda(make())

            def launcher(dt, **blocks):
                return _triton_launcher([image], ids, boxes, sizes, resample, dt, **blocks)

            for dt, nb in ((torch.float32, 4), (torch.bfloat16, 2)):
                add(f"ours: Triton kernels only ({str(dt)[6:]})", "dev", nb, built, lambda dt=dt: launcher(dt))
                add(f"ours: the same, replayed as a CUDA graph ({str(dt)[6:]})", "dev", nb, built,
                    lambda dt=dt: _cuda_graph(launcher(dt)))
            add("ours: crop_resize_patchify end-to-end (fp32)", "dev", 4, _timer_cuda,
                lambda: crop_resize_patchify(image, boxes, sizes, resample))
            if sweep:
                for cfg in (dict(BP=4, BQ=256), dict(BP=16, BQ=64), dict(BLOCK2=2048), dict(BLOCK2=512),
                            dict(num_warps=8), dict(BP=16, BQ=128, BLOCK2=2048, num_warps=8)):
                    add(f"  sweep bf16 {cfg}", "dev", 2, built, lambda cfg=cfg: launcher(torch.bfloat16, **cfg))
        else:
            add("torch eager: crop+interpolate+normalize (fp32)", "cpu", 4, _timer_cpu,
                lambda: _torch_eager(image_cpu, boxes, sizes))
            add("ours: crop_resize_patchify on CPU (fp32)", "cpu", 4, _timer_cpu,
                lambda: crop_resize_patchify(image_cpu, boxes, sizes, resample))
        if hf_pil is not None:
            add("PIL LANCZOS + transformers PIL processor (CPU)", "cpu", 4, _timer_cpu,
                lambda: _pil_pipeline(image_cpu, boxes, sizes, hf_pil))
        ref_ms = next((r[3][0] for r in rows if r[0].startswith("transformers") and not isinstance(r[3], str)), None)
        for name, where, nb, timing in rows:
            if isinstance(timing, str):
                print(f"{W:>5}x{H:<4} {name:<44} {timing}")
                continue
            p50, p20, p80 = timing
            gbs = (in_bytes + out_elems * nb) / (p50 * 1e-3) / 1e9
            pct = 100 * gbs / (copy_dev if where == "dev" else copy_cpu)
            vs = f"{ref_ms / p50:6.1f}x" if ref_ms else "   n/a"
            print(f"{W:>5}x{H:<4} {name:<44} {p50:9.3f} [{p20:8.3f}, {p80:8.3f}] {gbs:8.3g} {pct:6.2g}% {vs}")
        print(f"{'':>10} ({n_crops} crops of {boxes[0][2] - boxes[0][0]}x{boxes[0][3] - boxes[0][1]} -> "
              f"{sizes[0][1]}x{sizes[0][0]}, {in_bytes / 1e6:.1f} MB in, {out_elems * 4 / 1e6:.1f} MB out in fp32)")


def gpu_check(seed=0):
    """Bit-exactness of the Triton kernels on CUDA against the CPU reference; returns the number of failures."""
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to check here (the CPU tests run the kernels under TRITON_INTERPRET=1)")
        return 0
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    cases = []  # (source (H, W), boxes, sizes)
    F = FACTOR
    for H, W in ((97, 131), (480, 640), (1080, 1920)):
        boxes = [(0, 0, W, H), (0, 0, 1, H), (W - 1, 0, W, H), (0, H - 1, W, H)]
        sizes = [(F, F), (2 * F, F), (F, 2 * F), (F, 3 * F)]
        for _ in range(8):
            x0, y0 = int(rng.integers(0, W - 1)), int(rng.integers(0, H - 1))
            x1, y1 = int(rng.integers(x0 + 1, W + 1)), int(rng.integers(y0 + 1, H + 1))
            boxes.append((x0, y0, x1, y1))
            sizes.append((F * int(rng.integers(1, 30)), F * int(rng.integers(1, 30))))
        boxes.append((0, 0, W, H))
        sizes.append(smart_resize(H, W))
        cases.append(((H, W), boxes, sizes))
    cases.append(((4320, 7680), [(1920, 1080, 5760, 3240), (0, 0, 7680, 4320), (0, 0, 7680, 40)],
                  [smart_resize(2160, 3840), (F, 2 * F), (F, 200 * F)]))  # big crop, 137x downscale, 200:1 aspect
    fails = 0
    for (H, W), boxes, sizes in cases:
        img = torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=g)
        img_dev = img.cuda()
        for resample in ("lanczos", "bicubic", "bilinear"):
            want = reference_crop_resize_patchify([img], [0] * len(boxes), boxes, sizes, resample)  # torch spec
            for dt in (torch.float32, torch.bfloat16):
                got, _ = crop_resize_patchify(img_dev, boxes, sizes, resample, dt)
                ok = torch.equal(got.cpu(), want.to(dt))
                fails += not ok
                diff = "" if ok else f" max |diff| {(got.cpu().float() - want.to(dt).float()).abs().max():.3g}"
                verdict = "OK" if ok else "MISMATCH"
                print(f"check {W}x{H} {len(boxes)} crops {resample:8} {str(dt)[6:]:8} {verdict}{diff}")
    print(f"gpu_check: {'PASS' if fails == 0 else f'FAIL ({fails} mismatching cases)'}")
    return fails


def parse_sources(text, name="sources"):
    """`1024x768,7680x4320` -> [(1024, 768), (7680, 4320)]: image sizes W x H of at least one pixel each."""
    out = []
    for part in str(text).split(","):
        w, x, h = part.strip().partition("x")
        if not x:
            raise ValueError(f"{name} must be a comma list of WxH sizes such as 1024x768, got {text!r}")
        out.append((checks.parse_number(w, f"{name} width", lo=1, whole=True),
                    checks.parse_number(h, f"{name} height", lo=1, whole=True)))
    return out


def _main(argv=None):
    ap = checks.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", action="store_true", help="print the benchmark table")
    ap.add_argument("--check", action="store_true", help="GPU acceptance: bit-exactness on CUDA, then the benchmark")
    ap.add_argument("--sources", default=BENCH_SOURCES, type=checks.arg(parse_sources),
                    help="comma list of WxH sources, e.g. 1024x768,7680x4320")
    ap.add_argument("--resample", default="lanczos", choices=("lanczos", "bicubic", "bilinear"))
    ap.add_argument("--sweep", action="store_true", help="also time a few tilings (CUDA)")
    ap.add_argument("--threads", type=checks.arg(lo=1, hi=checks.THREADS_MAX, whole=True), default=None,
                    help="torch CPU threads (default: torch's choice)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    sources = a.sources
    fails = 0
    if a.check:
        import triton

        print(f"torch {torch.__version__}, triton {triton.__version__}")
        fails = gpu_check()
    if a.bench or a.check:
        bench(sources, resample=a.resample, sweep=a.sweep or a.check)
    if not (a.bench or a.check):
        ap.print_help()
    if a.check and not torch.cuda.is_available():
        return 2  # nothing was checked: say so in the exit status too
    return 1 if fails else 0


if __name__ == "__main__":
    raise SystemExit(_main())
