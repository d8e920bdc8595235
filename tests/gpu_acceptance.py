"""GPU acceptance: one prepared script that proves on a CUDA device what the CPU test suite proves on the CPU.

    python tests/gpu_acceptance.py                      # every check; --device defaults to cuda when there is one
    python tests/gpu_acceptance.py --device cpu         # what runs without a GPU (GPU-only checks print SKIP)
    python tests/gpu_acceptance.py --only model,cof     # a subset (names: see CHECKS at the end)

On a GPU machine (one H100/H200, torch 2.11, triton 3.6, transformers 5.17; about 5 minutes) run it from the repository
root and keep the whole output. Each check prints `PASS name: details`, `FAIL name: details` or `SKIP name: reason`;
the last line counts them, and the exit status is 1 when anything failed. `[N s]` ends each line: the seconds it took.

  model     model.py against transformers' Qwen2_5_VLForConditionalGeneration on tiny random checkpoints: fp32 logits
            within 1e-4 (TF32 off), bf16 logits within BF16_TOL, greedy generation token-identical, the KV cache with
            an image added mid-conversation equal to a full forward.
  crop      (GPU only) crop_kernels.gpu_check: the Triton kernels bit-identical to the reference; then the benchmark.
  cof       cof.run's batched multi-turn zoom loop (zooms forced on random weights): on CUDA the same greedy token ids
            as the CPU run of the same fp32 model; on the CPU two CPU runs (determinism). Sampled rollouts with
            group_size > 1, and their recorded log-probs against a full re-forward.
  memory7b  (GPU only) Qwen2.5-VL-7B shapes with random bf16 weights built on the GPU: one 1008x1008 image prefilled,
            32 tokens decoded; peak memory and timings.
  sft       sft.train, 20 steps on a tiny model and a hand-written CoF-SFT-format dataset (bf16 autocast on CUDA,
            fp32 on the CPU): the loss falls, the checkpoint loads in transformers with our logits; (GPU only)
            `torchrun --nproc_per_node=1 sft.py`.
  grpo      grpo.train, 5 steps on CUDA / 2 on the CPU, on a tiny model and a small synthetic RL set (eager rollouts:
            cof checks the compiled step).

Everything is made on the fly in a temporary directory; nothing is downloaded. tests/test_gpu_acceptance.py runs the
CPU path under pytest (and the full script with COF_GPU_ACCEPTANCE=1).
"""
import argparse
import contextlib
import dataclasses
import gc
import io
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _threads(text):
    """--threads: a whole number >= 0, 0 = torch's choice (checks.arg would import torch, which must wait for
    CUDA_VISIBLE_DEVICES)."""
    if not text.strip().isdigit() or int(text) > 4096:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0 and <= 4096, got {text!r}")
    return int(text)


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--only", default="", help="comma-separated check names (default: all)")
    ap.add_argument("--threads", type=_threads, default=None,
                    help="torch CPU threads; default 1 with --device cpu (tiny models gain nothing from more, and on a "
                         "busy machine multi-threaded tiny ops run ~30x slower), torch's choice with --device cuda")
    return ap.parse_args(argv)


if __name__ == "__main__" and _parse(sys.argv[1:]).device == "cpu":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""   # --device cpu means no GPU anywhere (sft/grpo pick CUDA when they see it)

sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import bench  # noqa: E402
import cof  # noqa: E402
import crop_kernels as ck  # noqa: E402
import decode  # noqa: E402
import grpo  # noqa: E402
import logprobs  # noqa: E402
import model as M  # noqa: E402
import sft  # noqa: E402
from data import build, formats  # noqa: E402
from model_fixtures import left_pad as _left_pad, pixels as _pixels, seq as _seq  # noqa: E402
from data import tiny
import tokenizer as T

FP32_TOL = 1e-4
# bf16, ours vs transformers on the same device. Measured on the CPU (the cases below, logits std ~1, |logit| <= 4.6):
# both bf16 forwards are 0.050-0.068 from the fp32 logits and bit-identical to each other. On a GPU the kernels differ
# (SDPA with GQA vs repeat_kv, F.linear vs Conv3d for the patch embed), so each result may land up to ~0.07 from the
# fp32 logits in its own direction: 2 x 0.07 -> 0.15 (under 5 bf16 ulps at |logit| in [4, 8)). Also required: ours is
# no further from the fp32 logits than 1.5x transformers' own bf16 error + 1/32, i.e. not a worse bf16 model.
BF16_TOL = 0.15
GPU_ONLY = ("crop/triton_bit_exact", "crop/bench", "cof/cuda_graphs", "sft/torchrun",
            "memory7b/prefill_decode")   # result lines


# ------------------------------------------------------------------------------------------------ reporting

class Report:
    """Prints one line per result to the real stdout (check bodies run with their own output captured)."""

    def __init__(self):
        self.out, self.rows, self.t = sys.stdout, [], time.time()

    def add(self, status, name, details):
        """One result line; a PASS or FAIL ends with the seconds since the previous line (or the check's start)."""
        if status != "SKIP":
            details += f" [{time.time() - self.t:.1f} s]"
        self.rows.append((status, name, details))
        print(f"{status} {name}: {details}", file=self.out, flush=True)
        self.t = time.time()

    def check(self, name, ok, details):
        self.add("PASS" if ok else "FAIL", name, details)

    def note(self, text):
        for line in text.rstrip().splitlines():
            print(f"    | {line}", file=self.out, flush=True)


class Ctx:
    def __init__(self, device, tmp, report):
        self.device, self.tmp, self.report = device, tmp, report
        self.cuda = device.type == "cuda"

    def path(self, *parts):
        return os.path.join(self.tmp, *parts)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


@contextlib.contextmanager
def captured():
    """Everything the project prints (progress bars, config dumps, transformers' warnings) goes into a buffer."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        yield buf


# ------------------------------------------------------------------------------------------------ small helpers

def _to(x, dev):
    return None if x is None else x.to(dev)


def _hf(directory, dtype, dev):
    from transformers import Qwen2_5_VLForConditionalGeneration
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(directory, dtype=dtype).to(dev).eval()


def _hf_logits(ref, ids, pv, grid, mask):
    with torch.no_grad():   # transformers >= 5.3 builds 3-D positions only when mm_token_type_ids is passed
        return ref(input_ids=ids, pixel_values=pv, image_grid_thw=grid, attention_mask=mask,
                   mm_token_type_ids=(ids == ref.config.image_token_id).int()).logits


def _generate_both(m, ref, ids, pv, grid, mask, eos, n=32):
    """n greedy tokens from ours and from transformers' generate (new tokens only, padded after a stop)."""
    pad = m.cfg.pad_token_id
    mm = {} if pv is None else dict(pixel_values=pv, image_grid_thw=grid,
                                    mm_token_type_ids=(ids == m.cfg.image_token_id).int())
    a = decode.generate(m, ids, pv, grid, attention_mask=mask, max_new_tokens=n, eos_token_id=eos, pad_token_id=pad)
    b = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=eos,
                     pad_token_id=pad, **mm)[:, ids.shape[1]:]
    return a, b


def _margin(logits_row):
    top = torch.topk(logits_row.float(), 2).values
    return float(top[0] - top[1])


def _divergence(a, b, net, device):
    """None where two trajectories have the same tokens; else (the first position where they differ, the top-2
    logit gap of `a`'s full forward on `net` there: a near-tie flips on rounding alone)."""
    if a.ids == b.ids:
        return None
    p = next((i for i, (x, y) in enumerate(zip(a.ids, b.ids)) if x != y), min(len(a.ids), len(b.ids)))
    return p, (_margin(_full_logits(net, a, device)[p - 1]) if p < len(a.ids) else float("inf"))


def _image(h, w, seed):
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _call(box):
    return f'<tool_call>\n{{"name": "image_zoom_in_tool", "arguments": {{"bbox_2d": {box}}}}}\n</tool_call>'


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ 1. model.py

MODEL_CASES = {   # name -> per row: (image grids, text before the first image)
    "text": [([], (5, 6, 7, 8, 9))],
    "one image": [([(1, 8, 8)], (5, 6, 7))],
    "two images of different sizes": [([(1, 10, 6), (1, 4, 12)], (5, 6, 7))],
    "left-padded batch": [([(1, 8, 12)], (5, 6)), ([(1, 4, 4), (1, 6, 10)], (5, 6, 7, 8, 9, 10, 11, 12, 13))],
}


def _model_inputs(cfg, case, dev):
    rows = MODEL_CASES[case]
    grids = [g for gs, _ in rows for g in gs]
    ids, mask = _left_pad([_seq(cfg, gs, text) for gs, text in rows], cfg.pad_token_id)
    pv, grid = _pixels(grids)
    return ids.to(dev), _to(pv, dev), _to(grid, dev), mask.to(dev)


def check_model(ctx):
    dev, rep = ctx.device, ctx.report
    flat = tiny.make_tiny(ctx.path("tiny_flat"))
    nested = tiny.make_tiny(ctx.path("tiny_nested_tied"), layout="nested", tie_word_embeddings=True)
    where = f"{dev.type}" + (", TF32 off" if ctx.cuda else "")

    # fp32 logits, both config layouts, every case
    worst, n = 0.0, 0
    ours32, hf32 = {}, {}
    for d in (flat, nested):
        ours32[d], hf32[d] = M.Qwen25VL.from_pretrained(d, device=dev), _hf(d, torch.float32, dev)
        for case in MODEL_CASES:
            ids, pv, grid, mask = _model_inputs(ours32[d].cfg, case, dev)
            with torch.no_grad():
                a = ours32[d](ids, pv, grid, attention_mask=mask)
            b = _hf_logits(hf32[d], ids, pv, grid, mask)
            real = mask.bool()
            assert a[real].std() > 0.5, "logits are not O(1): the tolerance would mean nothing"
            worst, n = max(worst, float((a[real] - b[real]).abs().max())), n + 1
    rep.check("model/fp32_logits", worst <= FP32_TOL,
              f"{n} cases (flat untied + nested tied checkpoints x {', '.join(MODEL_CASES)}): "
              f"max |ours - transformers| {worst:.2e} (tolerance {FP32_TOL:g}; {where})")

    # bf16 logits against transformers' bf16, and both against the fp32 logits
    ours16, hf16 = M.Qwen25VL.from_pretrained(flat, dtype=torch.bfloat16, device=dev), _hf(flat, torch.bfloat16, dev)
    diff = err_ours = err_hf = 0.0
    for case in MODEL_CASES:
        ids, pv, grid, mask = _model_inputs(ours16.cfg, case, dev)
        real = mask.bool()
        with torch.no_grad():
            a = ours16(ids, pv, grid, attention_mask=mask)[real].float()
        b = _hf_logits(hf16, ids, pv, grid, mask)[real].float()
        f = _hf_logits(hf32[flat], ids, pv, grid, mask)[real]
        diff = max(diff, float((a - b).abs().max()))
        err_ours, err_hf = max(err_ours, float((a - f).abs().max())), max(err_hf, float((b - f).abs().max()))
    ok = diff <= BF16_TOL and err_ours <= 1.5 * err_hf + 2 ** -5
    rep.check("model/bf16_logits", ok,
              f"{len(MODEL_CASES)} cases: max |ours - transformers| {diff:.3g}"
              + (" (bit-identical)" if diff == 0 else "") + f" (tolerance {BF16_TOL}); distance to the fp32 logits: "
              f"ours {err_ours:.3g}, transformers {err_hf:.3g} (ours must be <= 1.5x + 1/32)")

    # greedy generation, 32 steps, then again stopping mid-way on a token row 0 emits
    m, ref = ours32[flat], hf32[flat]
    c = m.cfg
    problems, notes = [], []
    for case in ("text", "one image", "left-padded batch"):
        ids, pv, grid, mask = _model_inputs(c, case, dev)
        never = c.text.vocab_size - 1   # a padded embedding row: all 32 steps run
        a, b = _generate_both(m, ref, ids, pv, grid, mask, never)
        if a.tolist() != b.tolist():    # where they part, how close were the two best tokens?
            r, s = next((r, s) for r in range(a.shape[0]) for s in range(a.shape[1]) if a[r, s] != b[r, s])
            with torch.no_grad():      # teacher-forced over transformers' tokens
                full = m(torch.cat([ids, b], 1), pv, grid, attention_mask=torch.cat([mask, torch.ones_like(b)], 1))
            gap = _margin(full[r, ids.shape[1] - 1 + s])
            (notes if gap < FP32_TOL else problems).append(f"{case}: row {r} differs at step {s} (top-2 gap {gap:.2e})")
            continue
        eos = int(a[0, 10])
        a, b = _generate_both(m, ref, ids, pv, grid, mask, eos)
        if a.tolist() != b.tolist() or eos not in a[0].tolist():
            problems.append(f"{case}: stopping on token {eos} differs")
    rep.check("model/greedy_generate", not problems,
              "text, one image, left-padded batch: " + ("; ".join(problems) if problems else
                                                        "32 greedy tokens identical to transformers' generate, and "
                                                        "again with a stop token emitted mid-way")
              + (f" (near-ties: {'; '.join(notes)})" if notes else ""))

    # KV cache: ragged chunks, an image in a later chunk (a zoom), equal to one full forward per row
    P = c.pad_token_id
    img = lambda *g: _seq(c, [g], text=(), between=())  # noqa: E731 - one image's tokens
    ga, gb, gc = (1, 8, 8), (1, 4, 6), (1, 10, 6)
    pa, pb, pc = (_pixels([g], seed=s)[0] for g, s in ((ga, 1), (gb, 2), (gc, 3)))
    chunks = [[[5, 6] + img(*ga) + [7], [5, 6, 7, 8], [9, 10]],
              [[11, 12, 13], [14] + img(*gb) + [15], []],
              [[16] + img(*gc) + [17, 18], [19], [20, 21, 22]]]
    chunk_images = [(ga, pa), (gb, pb), (gc, pc)]
    cache = m.new_cache(3)
    got = [[] for _ in range(3)]
    for chunk, (g, p) in zip(chunks, chunk_images):
        L = max(len(r) for r in chunk)
        ids = torch.tensor([r + [P] * (L - len(r)) for r in chunk], device=dev)
        mask = torch.tensor([[True] * len(r) + [False] * (L - len(r)) for r in chunk], device=dev)
        with torch.no_grad():
            lg = m.extend(cache, ids, mask, p.to(dev), torch.tensor([g]))
        for r in range(3):
            got[r].append(lg[r][mask[r]])
    rows = [sum((ch[r] for ch in chunks), []) for r in range(3)]
    images = [([ga, gc], torch.cat([pa, pc])), ([gb], pb), ([], None)]
    worst = 0.0
    for r in range(3):
        g, p = images[r]
        with torch.no_grad():
            full = m(torch.tensor([rows[r]], device=dev), _to(p, dev), torch.tensor(g) if g else None)[0]
        worst = max(worst, float((torch.cat(got[r]) - full).abs().max()))
    ok = worst <= FP32_TOL and cache.length.tolist() == [len(r) for r in rows]
    rep.check("model/kv_cache", ok, f"3 rows x 3 ragged chunks, images in chunks 0, 1 and 2 (a zoom image mid-"
                                    f"conversation): max |extend - full forward| {worst:.2e} (tolerance {FP32_TOL:g})")


# ------------------------------------------------------------------------------------------------ 2. crop_kernels.py

def check_crop(ctx):
    import triton
    with captured() as log:
        fails = ck.gpu_check()
    lines = [line for line in log.getvalue().splitlines() if line.startswith("check ")]
    bad = [line for line in lines if "MISMATCH" in line]
    ctx.report.check("crop/triton_bit_exact", fails == 0 and len(lines) > 0,
                     f"{len(lines)} cases (3 filters x fp32/bf16 over random images and boxes, 97x131 to 7680x4320) "
                     f"bit-identical to the torch reference; triton {triton.__version__}" if not fails else
                     f"{fails} mismatching cases: " + " | ".join(bad[:4]))
    with captured() as log:
        ck.bench()
    table = log.getvalue()
    failed = [line for line in table.splitlines() if "failed:" in line and "ours" in line]
    ctx.report.check("crop/bench", not failed, "benchmark table below"
                     + (f"; our rows failed: {failed}" if failed else ""))
    ctx.report.note(table)


# ------------------------------------------------------------------------------------------------ 3. cof.py

COF_QUESTIONS = ["What is the colour of the cup?\n(A) red\n(B) blue\nAnswer with the option's letter.", "Where?",
                 "Which?"]
COF_PREFIXES = [["<think>look</think> " + _call("[10, 10, 60, 50]"), _call("[30, 20, 90, 80]")],
                [_call("[0, 0, 200, 30]")],
                [_call("[0, 0, 40, 40]"), _call("[1, 1, 2, 2]"), _call("[5, 5, 50, 50]")]]


def _full_logits(net, tr, dev):
    with torch.no_grad():
        return net(torch.tensor([tr.ids], device=dev), tr.pixel_values.to(dev), tr.image_grid_thw)[0]   # [T, V]


def check_cof(ctx):
    dev, rep = ctx.device, ctx.report
    d = tiny.make_tiny(ctx.path("tiny_cof"))
    tok = T.Tokenizer.from_pretrained(d)
    cpu = M.Qwen25VL.from_pretrained(d)
    net = M.Qwen25VL.from_pretrained(d, device=dev)
    images = [_image(140, 168, 1), _image(112, 224, 2), _image(168, 112, 3)]
    cfg = cof.CofConfig(max_new_tokens=40, max_turns=4)

    # greedy: the device run against a CPU run of the same fp32 model (on the CPU: two CPU runs)
    want = cof.run(cpu, tok, images, COF_QUESTIONS, cfg, logits_processor=bench.force_prefixes(tok, COF_PREFIXES))
    got = cof.run(net, tok, images, COF_QUESTIONS, cfg, logits_processor=bench.force_prefixes(tok, COF_PREFIXES))
    problems, notes = [], []
    for q, (a, b) in enumerate(zip(want, got)):
        if not torch.equal(a.pixel_values, b.pixel_values.cpu()):
            problems.append(f"q{q}: pixel values differ")
        div = _divergence(a, b, cpu, torch.device("cpu"))
        if div:
            (notes if div[1] < FP32_TOL else problems).append(f"q{q}: tokens differ from position {div[0]} "
                                                              f"(top-2 gap {div[1]:.2e})")
            continue
        lp = max((abs(x - y) for x, y in zip(a.logprobs, b.logprobs)), default=0.0)
        if lp > 1e-3:
            problems.append(f"q{q}: logprobs differ by {lp:.2e}")
    zooms = [t.n_zooms for t in want]
    if zooms != [2, 1, 3]:
        problems.append(f"forced zooms per question {zooms}, expected [2, 1, 3]")
    what = f"{dev.type} run vs CPU run" if ctx.cuda else "CPU run vs a second CPU run (determinism of the loop)"
    rep.check("cof/greedy_loop", not problems,
              f"{what}: 3 questions batched on one cache, zooms forced [2, 1, 3], "
              f"{sum(len(t.ids) for t in want)} tokens; " + ("same token ids, pixel values and log-probs (<= 1e-3)"
                                                              if not problems else "; ".join(problems))
              + (f"; near-ties: {'; '.join(notes)}" if notes else ""))

    # the compiled decode step (decode.Decoder) against the eager loop on the same device
    fast = cof.run(net, tok, images, COF_QUESTIONS, dataclasses.replace(cfg, compile=True),
                   logits_processor=bench.force_prefixes(tok, COF_PREFIXES))
    d = decode.decoder_for(net)
    divs = [(q, _divergence(a, b, net, dev)) for q, (a, b) in enumerate(zip(got, fast))]
    flips = [f"q{q}: tokens differ from position {v[0]} (top-2 gap {v[1]:.2e})" for q, v in divs if v]
    same = not any(v and v[1] >= FP32_TOL for _, v in divs)       # identical, or apart only after a near-tie
    lp = bench.logprob_gap(got, fast)
    details = (f"--cfg compile=true on {dev.type}: {d.compiles} graph(s) compiled"
               + ("" if d.compiled else " (torch.compile FAILED: decoded eagerly)")
               + f"; same token ids as the eager loop: {same}; log-probs max diff {lp:.2e} (<= 1e-4)"
               + (f"; {'; '.join(flips)}" if flips else ""))
    if not d.compiled and not ctx.cuda and same:   # a CPU without a working compiler: the fallback is what runs
        rep.add("SKIP", "cof/compiled_decode", details)
    else:
        rep.check("cof/compiled_decode", same and lp <= 1e-4 and d.compiled, details)

    _check_graphs(ctx, net, tok, images, cfg, fast)

    # sampled rollouts, group_size 3: the helper GRPO calls, then the loop with forced zooms against a full re-forward
    g = torch.Generator(device=dev).manual_seed(0)
    out = cof.rollouts(net, tok, images[:2], COF_QUESTIONS[:2], group_size=3, generator=g, max_new_tokens=16,
                       max_turns=2)
    problems = []
    if [t.group for t in out] != [0, 0, 0, 1, 1, 1] or len({tuple(t.ids) for t in out[:3]}) < 2:
        problems.append("rollouts: wrong groups or identical samples")
    scfg = cof.CofConfig(do_sample=True, max_new_tokens=40, max_turns=2, keep_images=True)
    forced = cof.run(net, tok, images[:2], COF_QUESTIONS[:2], scfg, group_size=3, generator=g,
                     logits_processor=bench.force_prefixes(tok, [[_call("[10, 10, 60, 50]")], []], group_size=3))
    banned = cof.vision_token_ids(tok)
    worst = 0.0
    for t in forced:
        full = _full_logits(net, t, dev)
        pos = [p for p in range(t.prompt_len, len(t.ids)) if t.gen_mask[p]]
        lp = logprobs.policy_logprobs(full[[p - 1 for p in pos]], torch.tensor([t.ids[p] for p in pos], device=dev), banned)
        worst = max(worst, float((lp.cpu() - torch.tensor([t.logprobs[p] for p in pos])).abs().max()))
        if len(t.ids) != len(t.gen_mask) or any(t.gen_mask[:t.prompt_len]):
            problems.append("masks do not line up with the ids")
    if not all(t.n_zooms >= 1 and t.turns[0]["status"] == "ok" for t in forced[:3]):
        problems.append("the forced zoom did not crop")
    if worst > 1e-3:
        problems.append(f"recorded log-probs differ from a full re-forward by {worst:.2e}")
    rep.check("cof/sampled_rollouts", not problems,
              f"cof.rollouts: 2 questions x G=3 sampled on {dev.type}; sampled loop with a forced zoom: recorded "
              f"log-probs vs a full re-forward max diff {worst:.2e} (<= 1e-3)" + ("" if not problems else
                                                                                 "; " + "; ".join(problems)))


def _check_graphs(ctx, net, tok, images, cfg, fast):
    """The compiled step replayed as CUDA graphs (decode.Graphs) against the compiled loop's run `fast`."""
    rep = ctx.report
    if not ctx.cuda:
        rep.add("SKIP", "cof/cuda_graphs", "CUDA graphs of the decode step: GPU only (the CPU suite checks their "
                                           "bookkeeping with a stand-in recorder, tests/test_decode.py)")
        return
    graphed = cof.run(net, tok, images, COF_QUESTIONS, dataclasses.replace(cfg, compile=True, cuda_graphs=True),
                      logits_processor=bench.force_prefixes(tok, COF_PREFIXES))
    twin = decode.decoder_for(net, cuda_graphs=True)
    same = all(a.ids == b.ids for a, b in zip(fast, graphed))
    lp = bench.logprob_gap(fast, graphed)
    rep.check("cof/cuda_graphs", twin.graphs is not None and same and lp <= 1e-6,
              f"--cfg cuda_graphs=true: {twin.graphs.records if twin.graphs else 0} graph(s) recorded"
              + ("" if twin.graphs else " (recording FAILED: decoded without graphs)")
              + f"; same token ids as the compiled loop: {same}; log-probs max diff {lp:.2e} (<= 1e-6)")


# ------------------------------------------------------------------------------------------------ 4. sft.py

SFT_COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (230, 200, 40)}


def _sft_dataset(root, n=16):
    """A tiny dataset in the released CoF-SFT format: a question on a main image, a zoom, the crop, the answer."""
    from PIL import Image
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    names, rows = list(SFT_COLOURS), []
    for k in range(n):
        colour = names[k % 4]
        for suffix, size in (("", (56, 56)), ("_z", (56, 28))):
            arr = np.zeros((size[1], size[0], 3), np.uint8)
            arr[:] = SFT_COLOURS[colour]
            arr[::4] = 255 - np.array(SFT_COLOURS[colour], np.uint8)       # texture: crops differ from main images
            Image.fromarray(arr).save(os.path.join(root, "images", f"{k}{suffix}.png"))
        options = " ".join(f"({'ABCD'[i]}) {c}" for i, c in enumerate(names))
        rows.append({"messages": [
            {"role": "system", "content": "You zoom."},
            {"role": "user", "content": f"<image> Question: what colour is the square? {options}"},
            {"role": "assistant", "content": f"<think>Too small.</think>\n{_call(f'[0, 0, {28 * (1 + k % 2)}, 28]')}"},
            {"role": "user", "content": "<image>\nThink first."},
            {"role": "assistant", "content": f"<think>It is {colour}.</think>\n<answer>{'ABCD'[k % 4]}</answer>"}],
            "images": [f"images/{k}.png", f"images/{k}_z.png"]})
    path = os.path.join(root, "train.json")
    with open(path, "w") as f:
        json.dump(rows, f)
    return path, [m["content"] for r in rows for m in r["messages"]]


SFT_ARGS = {"epochs": 0.0, "batch_size": 4, "grad_accum": 1, "lr": 5e-3, "warmup_ratio": 0.2,
            "eval.processor_min_pixels": 28 * 28, "eval.processor_max_pixels": 56 * 56, "freeze_vision": "no",
            "max_len": 4096, "save_every": 0, "progress": False}


def check_sft(ctx):
    rep = ctx.report
    data, corpus = _sft_dataset(ctx.path("sft", "data"))
    model_dir = tiny.make_tiny(ctx.path("sft", "model"), hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                            intermediate_size=64, vision_hidden_size=32, vision_depth=2, vision_heads=2,
                            vision_intermediate_size=64, corpus=corpus, bpe_vocab_size=400)
    steps = 20
    cfg = sft.TrainConfig.from_dict(dict(model=model_dir, data=data, out=ctx.path("sft", "run"), max_steps=steps,
                                         **SFT_ARGS))
    res = sft.train(cfg)
    losses = res["losses"]
    first, last = losses[0], float(np.mean(losses[-3:]))
    ok = len(losses) == steps and all(map(math.isfinite, losses)) and last < 0.5 * first
    rep.check("sft/train", ok, f"{steps} steps on {ctx.device.type}" + (" (bf16 autocast)" if ctx.cuda else " (fp32)")
              + f": loss {first:.3f} -> {last:.3f} (mean of the last 3; must halve)")

    # the checkpoint: our loader and transformers load it and agree (CPU, fp32)
    ckpt = res["checkpoint"]
    tok = T.Tokenizer.from_pretrained(ckpt)
    rows, _ = sft.load_rows(data, tok, cfg)
    b = sft.collate([sft.SFTData(rows, tok, cfg)[i] for i in (0, 1)], tok.pad_id)
    ours = M.Qwen25VL.from_pretrained(ckpt)
    with torch.no_grad():
        a = ours(b["input_ids"], b["pixel_values"], b["image_grid_thw"], b["attention_mask"])
    h = _hf_logits(_hf(ckpt, torch.float32, torch.device("cpu")), b["input_ids"], b["pixel_values"],
                   b["image_grid_thw"], b["attention_mask"])
    real = b["attention_mask"].bool()
    diff = float((a[real] - h[real]).abs().max())
    rep.check("sft/checkpoint_in_transformers", diff <= FP32_TOL,
              f"{os.path.basename(ckpt)} loads in transformers; logits on 2 training rows max |ours - transformers| "
              f"{diff:.2e} (tolerance {FP32_TOL:g}, CPU fp32)")

    if not ctx.cuda:
        rep.add("SKIP", "sft/torchrun", "needs CUDA (torchrun with NCCL); the CPU suite runs torchrun with gloo")
        return
    out = ctx.path("sft", "torchrun")
    args = ["--model", model_dir, "--data", data, "--out", out, "--max_steps", "3", "--progress", "false"]
    for k, v in SFT_ARGS.items():
        if k != "progress":
            args += [f"--{k}", str(v)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={_free_port()}",
           os.path.join(ROOT, "sft.py")] + args
    p = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = p.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        log = None
    finally:   # also when this script is stopped (gpu_session.sh's time limit: SIGTERM, a SystemExit here)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    if log is None:
        log, _ = p.communicate()
    metrics = os.path.join(out, "metrics.jsonl")
    n_loss = sum('"loss"' in line for line in open(metrics)) if os.path.exists(metrics) else 0
    backend = ("nccl" if re.search(r"backend \S*nccl", log)    # sft.py logs "backend cpu:gloo,cuda:nccl"
               else "none found in its log")
    ok = p.returncode == 0 and n_loss == 3 and os.path.isdir(os.path.join(out, "ckpt-000003")) and backend == "nccl"
    rep.check("sft/torchrun", ok, f"torchrun --nproc_per_node=1 sft.py, 3 steps: exit {p.returncode}, {n_loss} loss "
                                  f"lines, checkpoint written; distributed backend: {backend}")
    if not ok:
        rep.note(log[-3000:])


# ------------------------------------------------------------------------------------------------ 5. grpo.py

def _length_reward(records):
    """A reward that varies inside every group on random weights (longer responses score higher)."""
    return [len(r["response"]) / 100.0 for r in records]


def check_grpo(ctx):
    rep = ctx.report
    view = dict(min_pixels=56 * 56, max_pixels=112 * 112)
    synth = ctx.path("grpo", "synth")
    build.build(build.BuildConfig(out=synth, n=8, rl=8, val=2, test=2, per_kind=0, table_items=0))
    rows, _ = formats.read_sft(os.path.join(synth, "sft_train.json"))
    corpus = [m["content"].replace("<image>", "") for r in rows for m in r["messages"]]
    model_dir = tiny.make_tiny(ctx.path("grpo", "model"), corpus=corpus, bpe_vocab_size=500, init="train", **view)
    steps = 5 if ctx.cuda else 2
    loops = {f"{loop}.{k}": v for loop in ("rollout", "eval") for k, v in
             dict(processor_min_pixels=view["min_pixels"], processor_max_pixels=view["max_pixels"], system=False).items()}
    cfg = grpo.GRPOConfig.from_dict(dict(
        model=model_dir, data=os.path.join(synth, "rl_train.jsonl"), eval_data="", out=ctx.path("grpo", "run"),
        max_steps=steps, prompts_per_step=4, group_size=3, micro_batch=4, lr=1e-3, beta=0.01, freeze_vision="no",
        save_every=0, progress=False, eval_start=False, **loops, **{"rollout.max_new_tokens": 12,
        "rollout.max_turns": 3, "rollout.max_model_len": 1024,
        "rollout.compile": False}))   # the compiled step has cof's checks; two more compiles cost time
    res = grpo.train(cfg, reward_fn=_length_reward)
    hist = res["history"]
    finite = all(math.isfinite(h[k]) for h in hist for k in ("loss", "grad_norm", "kl", "reward", "logp_mismatch_max"))
    start = M.Qwen25VL.from_pretrained(model_dir).state_dict()
    end = M.Qwen25VL.from_pretrained(res["checkpoint"]).state_dict()
    moved = any(not torch.equal(start[k], end[k]) for k in start)
    ok = len(hist) == steps and finite and moved and any(h["grad_norm"] > 0 for h in hist)
    rep.check("grpo/train", ok,
              f"{steps} steps on {ctx.device.type} (4 prompts x G=3, up to 3 turns): reward "
              f"{hist[0]['reward']:.3f} -> {hist[-1]['reward']:.3f}, loss/grad norm/KL finite, weights moved, "
              f"checkpoint loads; sampler vs trainer log-prob max diff "
              f"{max(h['logp_mismatch_max'] for h in hist):.3g}; {res['seconds'] / steps:.1f} s/step")


# ------------------------------------------------------------------------------------------------ 6. 7B memory

def check_memory_7b(ctx):
    dev, rep = ctx.device, ctx.report
    tok = T.Tokenizer.from_pretrained(tiny.make_tiny(ctx.path("tok7b")))   # text only; the ids are valid 7B embedding rows
    gc.collect()                                        # what the earlier checks left behind
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    net = tiny.random_model(tiny.qwen25vl_7b_config(tok), dev, torch.bfloat16)
    ctx.sync()
    t_build = time.time() - t0
    weights = sum(p.numel() * p.element_size() for p in net.parameters()) / 2 ** 30

    pv, grid = ck.preprocess_image(_image(1008, 1008, 0))
    ids, _ = T.tokenize_chat(tok, cof.build_messages("What is the colour of the cup?\n(A) red\n(B) blue"), grid,
                             add_generation_prompt=True)
    ids = torch.tensor([ids], device=dev)
    pv = pv.to(dev)
    n_new = 32

    def prefill():
        cache = net.new_cache(1, capacity=ids.shape[1] + n_new)
        with torch.no_grad():
            return cache, net.extend(cache, ids, pixel_values=pv, image_grid_thw=grid, last_only=True)[:, 0]

    prefill()                                           # warm-up (kernel selection), then timed
    ctx.sync()
    t0 = time.time()
    cache, logits = prefill()
    ctx.sync()
    t_prefill = time.time() - t0
    t0 = time.time()
    with torch.no_grad():
        for _ in range(n_new):
            nxt = decode.sample_next(logits)
            logits = net.extend(cache, nxt[:, None], last_only=True)[:, 0]
    ctx.sync()
    t_decode = time.time() - t0
    peak = torch.cuda.max_memory_allocated(dev) / 2 ** 30
    finite = bool(torch.isfinite(logits).all())
    ok = finite and peak - weights < 2.0
    rep.check("memory7b/prefill_decode", ok,
              f"{torch.cuda.get_device_name(dev)}: weights {weights:.2f} GiB (built in {t_build:.1f} s), peak "
              f"{peak:.2f} GiB (activations + cache {peak - weights:.2f} GiB; must stay < 2 GiB); one 1008x1008 image "
              f"(grid {grid[0].tolist()}, {int(grid.prod()) // 4} image tokens) in a {ids.shape[1]}-token prompt: "
              f"prefill {t_prefill * 1e3:.0f} ms ({ids.shape[1] / t_prefill:.0f} tok/s), {n_new} decode steps "
              f"{t_decode * 1e3:.0f} ms ({n_new / t_decode:.1f} tok/s); logits finite: {finite}")
    net = cache = None                                  # free the 7B weights before the summary
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ the table

CHECKS = [  # (name, function, GPU only)
    ("model", check_model, False),
    ("crop", check_crop, True),
    ("cof", check_cof, False),
    ("memory7b", check_memory_7b, True),
    ("sft", check_sft, False),           # its sft/torchrun line is GPU only (SKIP on the CPU)
    ("grpo", check_grpo, False),
]


def main(argv=None):
    args = _parse(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    only = [s for s in args.only.split(",") if s]
    unknown = sorted(set(only) - {name for name, _, _ in CHECKS})
    rep = Report()
    if unknown:
        rep.add("FAIL", "setup", f"unknown check names {unknown}; known: {[name for name, _, _ in CHECKS]}")
        return 2
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        rep.add("FAIL", "setup", "--device cuda but torch sees no CUDA device")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False    # fp32 parity needs real fp32 matmuls and convolutions
    torch.backends.cudnn.allow_tf32 = False
    try:
        import transformers
        tf = transformers.__version__
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        tf = "not installed"
    try:
        import triton
        tr = triton.__version__
    except ImportError:
        tr = "not installed"
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# gpu_acceptance on {device} ({card}); torch {torch.__version__}, triton {tr}, transformers {tf}",
          flush=True)
    t_all = time.time()
    with tempfile.TemporaryDirectory(prefix="cof_gpu_acceptance_") as tmp:
        ctx = Ctx(device, tmp, rep)
        for name, fn, gpu_only in CHECKS:
            if only and name not in only:
                continue
            if gpu_only and device.type != "cuda":
                for line in GPU_ONLY:
                    if line.startswith(name + "/"):
                        rep.add("SKIP", line, "needs CUDA")
                continue
            torch.manual_seed(0)
            n_before = len(rep.rows)
            t0 = rep.t = time.time()
            with captured() as log:
                try:
                    fn(ctx)
                    error = None
                except Exception as e:  # noqa: BLE001 - one failing check must not hide the others
                    error = e, traceback.format_exc()
            if error is not None:
                rep.add("FAIL", f"{name}/error", f"{type(error[0]).__name__}: {str(error[0])[:500]}")
                rep.note("\n".join((log.getvalue()[-2000:] + error[1]).splitlines()[-30:]))
            elif any(s == "FAIL" for s, _, _ in rep.rows[n_before:]):
                rep.note("\n".join(log.getvalue().splitlines()[-20:]))
            print(f"# {name}: {time.time() - t0:.1f} s", flush=True)
    counts = {s: sum(1 for r in rep.rows if r[0] == s) for s in ("PASS", "FAIL", "SKIP")}
    print(f"SUMMARY: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped in "
          f"{time.time() - t_all:.0f} s on {device}", flush=True)
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # `timeout` stops us: unwind, so no child outlives us
    raise SystemExit(main())
