"""crop_kernels.py against its oracles: Pillow 13.0.0 (resize), transformers' Qwen2-VL PIL image processor
(pixel_values, smart_resize, RGB conversion), and the torch reference (Triton kernels, TRITON_INTERPRET=1 on a CPU)."""
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

import crop_kernels as ck

PIL_FILTERS = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC,
               "bilinear": Image.Resampling.BILINEAR}


def _rand_image(rng, h, w):
    return torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))  # [3, h, w] noise: worst case for rounding


def _pil_crop_resize(img_u8, box, size, resample):
    """The released CoF pipeline: PIL crop then PIL resize."""
    return ck.from_pil(ck.to_pil(img_u8).crop(box).resize((size[1], size[0]), PIL_FILTERS[resample]))


def _resize_cases(seed, n):
    rng = np.random.default_rng(seed)
    cases = [((480, 640), (476, 644)), ((1, 1), (3, 5)), ((1, 37), (28, 1)), ((300, 2), (5, 90)),  # fixed corners
             ((2, 300), (1, 7)), ((97, 13), (97, 13)), ((64, 64), (64, 20)), ((40, 90), (120, 90))]
    for _ in range(n):
        H, W = (int(v) for v in rng.integers(1, 90, 2))
        scale = np.exp(rng.uniform(-2.0, 1.5, 2))  # 0.13x .. 4.5x per side, independently: extreme aspect ratios
        h, w = max(1, int(H * scale[0])), max(1, int(W * scale[1]))
        cases.append(((H, W), (h, w)))
    return cases


@pytest.mark.parametrize("resample", list(PIL_FILTERS))
def test_resize_bit_identical_to_pillow(resample):
    rng = np.random.default_rng(1)
    for (H, W), (h, w) in _resize_cases(list(PIL_FILTERS).index(resample), 60):
        img = _rand_image(rng, H, W)
        want = ck.from_pil(ck.to_pil(img).resize((w, h), PIL_FILTERS[resample]))
        got = ck.resize(img, (h, w), resample, backend="torch")
        assert got.dtype == torch.uint8 and got.shape == (3, h, w)
        assert torch.equal(got, want), f"{resample} {H}x{W} -> {h}x{w}: max diff {(got.int() - want.int()).abs().max()}"


@pytest.mark.parametrize("resample", list(PIL_FILTERS))
def test_crop_then_resize_matches_pil_crop_resize(resample):
    rng = np.random.default_rng(2)
    img = _rand_image(rng, 61, 83)
    boxes = [(0, 0, 83, 61), (0, 0, 1, 61), (82, 0, 83, 61), (0, 60, 83, 61), (40, 20, 41, 21), (5, 0, 83, 9),
             (0, 3, 30, 61), (70, 50, 83, 61)]  # full image, 1-pixel-wide columns/rows, corners, touching borders
    sizes = [(28, 56), (56, 28), (28, 28), (28, 84), (56, 56), (28, 140), (84, 28), (28, 28)]
    for box, size in zip(boxes, sizes):
        want = _pil_crop_resize(img, box, size, resample)
        assert torch.equal(ck.resize(ck.crop(img, box), size, resample, backend="torch"), want), (box, size)
        assert torch.equal(ck.resize(ck.crop(img, box), size, resample), want), (box, size)  # auto: Pillow's C


def test_pillow13_pass_order_is_what_makes_it_exact():
    """Pillow 13 runs the vertical pass first for 480x640 -> 476x644; Pillow <= 12's horizontal-first order (emulated
    here with the reference's own passes) gives different pixels, so the exactness tests above do test the order."""
    assert ck.pil_pass_order((480, 640), (476, 644)) == ["v", "h"]
    img = _rand_image(np.random.default_rng(3), 480, 640)
    h_first = ck._resample_pass(ck._resample_pass(img, 2, 644, "bicubic"), 1, 476, "bicubic")
    want = ck.from_pil(ck.to_pil(img).resize((644, 476), Image.Resampling.BICUBIC))
    assert torch.equal(ck.resize(img, (476, 644), "bicubic", backend="torch"), want)
    assert not torch.equal(h_first, want)


def test_pil_coeffs_shape_and_normalization():
    for resample in PIL_FILTERS:
        for n_in, n_out in ((100, 7), (7, 100), (50, 50)):
            xmin, count, w = ck.pil_coeffs(n_in, n_out, resample)
            assert (xmin >= 0).all() and (xmin + count <= n_in).all() and (count >= 1).all()
            assert np.abs(w.sum(1).astype(np.int64) - (1 << 22)).max() <= w.shape[1]  # each row sums to 1.0 +- rounding


def test_patchify_matches_transformers_pil_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    proc = Qwen2VLImageProcessorPil()
    rng = np.random.default_rng(4)
    for H, W, (h, w) in ((50, 70, (56, 84)), (200, 90, (196, 84)), (28, 28, (28, 28)), (33, 400, (28, 392))):
        img = _rand_image(rng, H, W)
        resized = ck.resize(img, (h, w), "bicubic", backend="torch")  # == Pillow; HF: do_resize=False
        out = proc(images=ck.to_pil(resized), do_resize=False, return_tensors="pt")
        pv, grid = ck.patchify(resized)
        assert pv.dtype == torch.float32 and pv.shape == (h * w // 196, 1176)
        torch.testing.assert_close(pv, out["pixel_values"], atol=1e-6, rtol=0)
        assert torch.equal(grid, out["image_grid_thw"])
        # and with HF doing the resize itself (smart_resize target == our size): the whole chain agrees
        hf = proc(images=ck.to_pil(img), size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280},
                  return_tensors="pt")
        if tuple(hf["image_grid_thw"][0, 1:].tolist()) == (h // 14, w // 14):
            torch.testing.assert_close(pv, hf["pixel_values"], atol=1e-6, rtol=0)


def test_patchify_layout_by_hand():
    """Row r / column k of pixel_values hold pixel (y, x) of channel c as in kernels.md's closed-form index map."""
    img = _rand_image(np.random.default_rng(5), 56, 84)
    pv, _ = ck.patchify(img)
    lut = ck.normalize_lut()
    gw = 84 // 14
    for r, k in ((0, 0), (1, 5), (5, 391), (17, 600), (23, 1175), (10, 196 + 14 * 3 + 2)):
        mw, mh, wb, hb = r % 2, (r // 2) % 2, (r // 4) % (gw // 2), r // (4 * (gw // 2))
        px, py, c = k % 14, (k // 14) % 14, k // 392
        y, x = (hb * 2 + mh) * 14 + py, (wb * 2 + mw) * 14 + px
        assert pv[r, k] == lut[c, int(img[c, y, x])]


def test_crop_resize_patchify_reference_end_to_end():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    proc = Qwen2VLImageProcessorPil()
    img = _rand_image(np.random.default_rng(6), 90, 130)
    boxes, sizes = [(0, 0, 130, 90), (10, 5, 40, 60), (129, 0, 130, 90)], [(84, 140), (56, 28), (28, 28)]
    pv, grid = ck.crop_resize_patchify(img, boxes, sizes, resample="lanczos")
    want = [proc(images=ck.to_pil(_pil_crop_resize(img, b, s, "lanczos")), do_resize=False, return_tensors="pt")
            for b, s in zip(boxes, sizes)]
    torch.testing.assert_close(pv, torch.cat([w["pixel_values"] for w in want]), atol=1e-6, rtol=0)
    assert torch.equal(grid, torch.cat([w["image_grid_thw"] for w in want]))
    images, ids, vboxes, vsizes, _ = ck._prepare(img, boxes, sizes, "lanczos", torch.float32)
    assert torch.equal(ck.reference_crop_resize_patchify(images, ids, vboxes, vsizes, "lanczos", backend="torch"), pv)
    pv16, _ = ck.crop_resize_patchify(img, boxes, sizes, resample="lanczos", out_dtype=torch.bfloat16)
    assert torch.equal(pv16, pv.to(torch.bfloat16))
    # several source images: boxes carry the image index
    img2 = _rand_image(np.random.default_rng(7), 40, 30)
    pv2, grid2 = ck.crop_resize_patchify([img, img2], [(1, 0, 0, 30, 40), (0, 10, 5, 40, 60)], [(28, 28), (56, 28)])
    a, _ = ck.crop_resize_patchify(img2, [(0, 0, 30, 40)], [(28, 28)])
    assert torch.equal(pv2, torch.cat([a, pv[60:68]]))  # crop 1 above: rows 84*140/196 = 60 .. 60 + 56*28/196
    assert grid2.tolist() == [[1, 2, 2], [1, 4, 2]]


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    rng = np.random.default_rng(8)
    cases = [(480, 640), (1080, 1920), (42, 70), (13, 13), (1, 150), (14, 28), (3024, 4032), (28, 5600)]
    cases += [tuple(int(v) for v in rng.integers(1, 5000, 2)) for _ in range(300)]
    for h, w in cases:
        for lo, hi in ((56 * 56, 28 * 28 * 1280), (3136, 12845056), (4 * 28 * 28, 256 * 28 * 28)):
            try:
                want = hf_smart_resize(h, w, 28, lo, hi)
            except ValueError:
                with pytest.raises(ValueError, match="aspect ratio"):
                    ck.smart_resize(h, w, 28, lo, hi)
                continue
            assert ck.smart_resize(h, w, 28, lo, hi) == want, (h, w, lo, hi)
    assert ck.smart_resize(480, 640) == (476, 644) and ck.smart_resize(42, 70) == (56, 56)
    with pytest.raises(ValueError, match="aspect ratio"):
        ck.smart_resize(10, 2500)
    with pytest.raises(ValueError, match="height must be a finite number > 0"):
        ck.smart_resize(0, 10)


def test_bad_boxes_and_sizes_raise_clear_errors():
    img = _rand_image(np.random.default_rng(9), 20, 30)
    for box, msg in (((5, 5, 5, 10), "empty or inverted"), ((10, 5, 4, 10), "empty or inverted"),
                     ((0, 0, 31, 10), "outside"), ((-1, 0, 5, 5), "outside"), ((0, 0, 5, 21), "outside"),
                     ((0.5, 0, 5, 5), "integer"), ((0, 0, 5), r"\(x0, y0, x1, y1\)")):
        with pytest.raises(ValueError, match=msg):
            ck.crop(img, box)
        with pytest.raises(ValueError, match=msg):
            ck.crop_resize_patchify(img, [box], [(28, 28)])
    for size in ((28, 30), (0, 28), (27, 28), (28.0, 28)):
        with pytest.raises(ValueError, match="multiples of 28|integer"):
            ck.crop_resize_patchify(img, [(0, 0, 30, 20)], [size])
    with pytest.raises(ValueError, match="multiples of 28"):
        ck.patchify(torch.zeros(3, 28, 42, dtype=torch.uint8))
    with pytest.raises(ValueError, match="one size per box"):
        ck.crop_resize_patchify(img, [(0, 0, 30, 20)], [])
    with pytest.raises(ValueError, match="uint8 RGB"):
        ck.resize(img.float(), (10, 10))
    with pytest.raises(ValueError, match="resample"):
        ck.resize(img, (10, 10), "nearest")


def _png_bytes(img, **kw):
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def test_load_image_modes_alpha_exif_and_bomb_limit(tmp_path):
    from transformers.image_transforms import convert_to_rgb

    rng = np.random.default_rng(10)
    rgba = Image.fromarray(rng.integers(0, 256, (12, 9, 4), dtype=np.uint8), "RGBA")
    got = ck.load_image(_png_bytes(rgba))
    want = torch.from_numpy(convert_to_rgb(rgba, return_numpy=True)).permute(2, 0, 1)
    assert torch.equal(got, want)
    a = np.asarray(rgba, np.float64)  # alpha over white, by hand: round(c*a/255 + 255*(1-a/255)) within 1 level
    by_hand = a[..., :3] * a[..., 3:] / 255 + 255 * (1 - a[..., 3:] / 255)
    assert np.abs(got.permute(1, 2, 0).numpy() - by_hand).max() <= 1.0
    # palette image with a transparent index -> composited on white, like transformers
    p = Image.fromarray(rng.integers(0, 4, (6, 7), dtype=np.uint8), "P")
    p.putpalette([10, 20, 30, 200, 0, 0, 0, 200, 0, 0, 0, 200])
    p.info["transparency"] = 0
    path = tmp_path / "p.png"
    p.save(path, transparency=0)
    want = torch.from_numpy(convert_to_rgb(Image.open(path), return_numpy=True)).permute(2, 0, 1)
    assert torch.equal(ck.load_image(str(path)), want)
    assert (ck.load_image(path)[:, np.asarray(p) == 0] == 255).all()
    # greyscale and CMYK go through convert("RGB")
    grey = Image.fromarray(rng.integers(0, 256, (5, 8), dtype=np.uint8), "L")
    assert torch.equal(ck.load_image(grey), ck.from_pil(grey.convert("RGB")))
    # EXIF orientation 6 (rotate 90 cw to display) is applied by default, kept when asked
    arr = rng.integers(0, 256, (4, 10, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", exif=exif)
    shown = ck.load_image(buf.getvalue())
    assert shown.shape == (3, 10, 4) and torch.equal(shown, torch.from_numpy(np.rot90(arr, -1).copy()).permute(2, 0, 1))
    assert ck.load_image(buf.getvalue(), exif_transpose=False).shape == (3, 4, 10)
    # decompression-bomb limit, from the header, with a message saying how to raise it
    with pytest.raises(ck.ImageTooLargeError, match=r"10x4 = 40 pixels.*max_pixels=40"):
        ck.load_image(buf.getvalue(), max_pixels=39)
    assert ck.load_image(buf.getvalue(), max_pixels=None).shape == (3, 10, 4)


# ----------------------------------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (CPU tensors), against the reference

TRITON_BOXES = [(0, 0, 90, 70), (10, 5, 40, 65), (60, 0, 90, 28), (89, 0, 90, 70), (0, 69, 90, 70), (30, 30, 58, 56),
                (2, 40, 9, 45), (50, 10, 78, 70)]
TRITON_SIZES = [(56, 84), (28, 28), (28, 28), (28, 28), (28, 56), (56, 28), (56, 56), (28, 28)]
# whole image (v first, downscale), 30x60 -> 28x28 (v first), horizontal only, 1-px column (v first, then 1 -> 28 up),
# 1-px row (h first, up), 28x26 -> 28x56 (vertical only, up), 7x5 -> 56x56 (h then v, up), 28x60 (vertical only, down)


def _spec(image, boxes, sizes, resample):
    """The torch-only reference chain (no Pillow inside): the executable spec the kernels must match."""
    images, ids, boxes, sizes, name = ck._prepare(image, boxes, sizes, resample, torch.float32)
    grid = torch.tensor([[1, h // 14, w // 14] for h, w in sizes])
    return ck.reference_crop_resize_patchify(images, ids, boxes, sizes, name, backend="torch"), grid


@pytest.fixture
def interpret(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def test_triton_cases_cover_every_pass_order():
    orders = {tuple(ck.pil_pass_order((b[3] - b[1], b[2] - b[0]), s)) for b, s in zip(TRITON_BOXES, TRITON_SIZES)}
    assert orders == {("h", "v"), ("v", "h"), ("h",), ("v",)} and len(TRITON_BOXES) == len(TRITON_SIZES)


@pytest.mark.parametrize("resample", list(PIL_FILTERS))
def test_triton_bit_identical_to_reference(interpret, resample):
    img = _rand_image(np.random.default_rng(11), 70, 90)
    got, grid = ck.triton_crop_resize_patchify(img, TRITON_BOXES, TRITON_SIZES, resample)
    want, want_grid = _spec(img, TRITON_BOXES, TRITON_SIZES, resample)
    assert got.dtype == torch.float32 and torch.equal(grid, want_grid)
    assert torch.equal(got, want), f"max diff {(got - want).abs().max()}"


def test_triton_bf16_small_blocks_and_several_images(interpret):
    """bf16 output is round-to-nearest-even of the float32 values; small tiles exercise the multi-program masking;
    an image with nothing to resize (crop size == target) and several source images in one launch."""
    rng = np.random.default_rng(12)
    a, b = _rand_image(rng, 40, 33), _rand_image(rng, 56, 28)
    boxes, sizes = [(0, 0, 0, 33, 40), (1, 0, 0, 28, 56), (0, 5, 12, 33, 40)], [(56, 28), (56, 28), (28, 28)]
    got, _ = ck.triton_crop_resize_patchify([a, b], boxes, sizes, "bicubic", torch.bfloat16, BP=8, BQ=16, BLOCK2=1024)
    want, _ = _spec([a, b], boxes, sizes, "bicubic")
    assert got.dtype == torch.bfloat16 and torch.equal(got, want.to(torch.bfloat16))
    assert not torch.equal(got.float(), want)  # bf16 really rounds: the check above is not vacuous


def test_import_and_cpu_path_without_triton(tmp_path):
    """With triton unimportable, crop_kernels imports and its CPU path gives the same bits as in this process."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, crop_kernels as ck\n"
            "img = torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))\n"
            "torch.save(ck.crop_resize_patchify(img, [(0, 0, 40, 30), (5, 3, 21, 30)], [(28, 56), (56, 28)]),"
            " sys.argv[1])\n")
    root = str(__import__("pathlib").Path(ck.__file__).parent)
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "out.pt")], cwd=root, check=True, timeout=120)
    pv, grid = torch.load(tmp_path / "out.pt")
    img = torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    want, want_grid = _spec(img, [(0, 0, 40, 30), (5, 3, 21, 30)], [(28, 56), (56, 28)], "lanczos")
    assert torch.equal(pv, want) and grid.tolist() == want_grid.tolist() == [[1, 2, 4], [1, 4, 2]]


def test_triton_kernels_compile_for_hopper_and_ampere():
    """The interpreter does not type-check like the compiler does (e.g. Triton's `if` rejects a name bound to two
    shapes): compile both kernels to cubin for sm_90 and sm_80 with triton's bundled ptxas, no GPU needed."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("this triton has no NVIDIA backend")
    if ck._interpreting():
        pytest.skip("TRITON_INTERPRET is set for the whole session")
    pass1, pass2 = ck._kernels()
    i32 = "*i32"
    sig1 = dict(src_ptr="*u8", ws_ptr="*u8", bounds_ptr=i32, wts_ptr=i32, meta_ptr=i32, prog_ptr=i32,
                NM="constexpr", BP="constexpr", BQ="constexpr")
    for cc in (90, 80):
        k = triton.compile(ASTSource(pass1, sig1, constexprs=dict(NM=len(ck._M1), BP=8, BQ=128)),
                           target=GPUTarget("cuda", cc, 32), options=dict(enable_fp_fusion=False))
        assert "ld.global" in k.asm["ptx"] and k.asm["cubin"]
        for out in ("*i32", "*i16"):  # float32 / bf16 bit patterns
            sig2 = dict(ws_ptr="*u8", out_ptr=out, lut_ptr=out, bounds_ptr=i32, wts_ptr=i32, meta_ptr=i32, prog_ptr=i32,
                        NM="constexpr", BLOCK="constexpr")
            k = triton.compile(ASTSource(pass2, sig2, constexprs=dict(NM=len(ck._M2), BLOCK=1024)),
                               target=GPUTarget("cuda", cc, 32), options=dict(enable_fp_fusion=False))
            assert k.asm["cubin"]


_BENCH_ROW = re.compile(r"^\s*112x84\s+(?P<name>.+?)\s+(?P<p50>[\d.]+) \[\s*(?P<p20>[\d.]+),\s*(?P<p80>[\d.]+)\]\s+"
                        r"(?P<gbs>\S+)\s+(?P<pct>\S+)%\s+(?P<vs>n/a|[\d.]+x)$")


def test_bench_and_check_run_on_cpu(capsys):
    """The benchmark's table on a 112x84 source, 2 crops: every row's GB/s is the batch's bytes over its p50 time,
    its % is of the copy bandwidth in the header, its "vs HF" is transformers' time over its own; without a GPU
    the rows are the three CPU implementations and --check says there is no GPU."""
    cuda = torch.cuda.is_available()
    ck.bench(sources=[(112, 84)], n_crops=2)
    out = capsys.readouterr().out
    if not cuda:
        assert ck.gpu_check() == 0 and "no CUDA GPU" in capsys.readouterr().out
    # 2 crops of 56x42 (half the sides), read once as uint8, each resized to 56x56 = 16 rows of 1176 fp32 values
    nbytes = 2 * 3 * 56 * 42 + 2 * (56 * 56 // 196) * 1176 * 4
    copy = re.search(r"copy bandwidth: device (\S+) GB/s, host (\S+) GB/s", out)
    copy_dev, copy_host = float(copy.group(1)), float(copy.group(2))
    lines = [line for line in out.splitlines() if line.strip().startswith("112x84")]
    failed = [line for line in lines if "failed:" in line]
    rows = [_BENCH_ROW.match(line) for line in lines if "failed:" not in line]
    assert None not in rows, lines
    names = [r["name"] for r in rows]
    if not cuda:
        assert not failed and names == ["torch eager: crop+interpolate+normalize (fp32)",
                                        "ours: crop_resize_patchify on CPU (fp32)",
                                        "PIL LANCZOS + transformers PIL processor (CPU)"], lines
    else:
        assert {"ours: crop_resize_patchify end-to-end (fp32)",
                "PIL LANCZOS + transformers PIL processor (CPU)"} <= set(names), lines
    ref = next((float(r["p50"]) for r in rows if r["name"].startswith("transformers")), None)
    for r in rows:
        p50, p20, p80, gbs, pct = (float(r[k]) for k in ("p50", "p20", "p80", "gbs", "pct"))
        assert p20 <= p50 <= p80, r.group(0)
        tol = 0.0005 / p50 + 0.005          # p50 is printed to 1 us, GB/s to 3 significant digits
        assert gbs == pytest.approx(nbytes / (p50 * 1e-3) / 1e9, rel=tol + 1e-3), r.group(0)
        bw = copy_host if (not cuda or "CPU" in r["name"]) else copy_dev
        assert pct == pytest.approx(100 * gbs / bw, rel=tol + 0.06 + 0.5 / bw), r.group(0)   # % to 2 digits
        if ref is None:
            assert r["vs"] == "n/a"
        else:
            assert float(r["vs"][:-1]) == pytest.approx(ref / p50, rel=tol + 0.0005 / ref, abs=0.05), r.group(0)


def test_triton_extreme_downscale_and_aspect(interpret):
    """Long filters (1200 -> 28 with bilinear: 87 taps; fewer than Lanczos's 259 to keep the interpreter quick) and
    150:1 sources, in both orientations."""
    rng = np.random.default_rng(13)
    wide, tall = _rand_image(rng, 8, 1200), _rand_image(rng, 1200, 8)
    boxes, sizes = [(0, 0, 0, 1200, 8), (1, 0, 0, 8, 1200), (0, 100, 0, 1100, 8)], [(28, 28), (28, 28), (28, 56)]
    got, _ = ck.triton_crop_resize_patchify([wide, tall], boxes, sizes, "bilinear")
    want, _ = _spec([wide, tall], boxes, sizes, "bilinear")
    assert torch.equal(got, want)
