"""Benchmarks: our code against its baseline, in the same run, printed as a table with ratios.

    python bench.py model [--threads 1] [--hidden 512 --layers 4 ...]   model.py vs transformers: prefill and decode
                                                                        tokens/s, same random checkpoint, greedy
                                                                        tokens compared
    python bench.py cof [--model DIR] [--n 8 --zooms 2 ...]             whole CoF conversations: the batched one-cache
                                                                        loop vs the released cost model (re-encode
                                                                        the whole chat every turn), same tokens

The crop kernels have their own microbenchmark beside them: `python crop_kernels.py --bench`. This file stays out of
the runtime code because its baselines are not runtime dependencies (transformers is a test-only oracle) and because
the released loop's cost model (`Reencode`) is a baseline, not a way to run CoF.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

import cof
import crop_kernels as ck
import model as M
import tokenizer as T
from data.tiny import make_tiny


class Reencode:
    """The released cost model as a stand-in for the model in cof.run: vLLM re-encodes the whole chat for every
    turn, so here every new turn (a chunk of more than one token: the environment's reply, maybe with a crop) is not
    appended to the cache; the whole conversation so far is prefilled again into a fresh cache. One conversation at a
    time. The tokens are those of the one-cache loop (tests/test_cof_loop.py checks it); only the cost differs."""

    def __init__(self, model):
        self.model = model
        self.ids, self.pixel_values, self.grids = [], [], []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def new_cache(self, batch_size, capacity=0):
        if batch_size != 1:
            raise ValueError("Reencode (the re-prefill baseline) runs one conversation at a time")
        self.ids, self.pixel_values, self.grids = [], [], []
        return self.model.new_cache(1, capacity)

    def extend(self, cache, input_ids, mask=None, pixel_values=None, image_grid_thw=None, last_only=False):
        real = input_ids[0] if mask is None else input_ids[0][mask[0]]                   # [n] the chunk's real tokens
        first = not self.ids
        self.ids += real.tolist()
        if pixel_values is not None:
            self.pixel_values.append(pixel_values)
            self.grids.append(image_grid_thw)
        if first or real.numel() <= 1:          # the prompt, or one decoded token: appended as usual
            return self.model.extend(cache, input_ids, mask, pixel_values, image_grid_thw, last_only)
        fresh = self.model.new_cache(1)
        ids = torch.tensor([self.ids], device=input_ids.device)                            # [1, whole chat]
        out = self.model.extend(fresh, ids, None, torch.cat(self.pixel_values), torch.cat(self.grids), last_only)
        cache.__dict__.update(fresh.__dict__)   # the loop's cache object now holds the fresh prefill
        return out


# --------------------------------------------------------------------------------------------------------------------
# python bench.py model

def bench_model(args):
    """Prefill and decode tokens/s, ours vs transformers, same random checkpoint, one run on this machine."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    ours_m, ref, ids, pv, grid = _model_pair(args, device)
    mm = (ids == ours_m.cfg.image_token_id).int()
    never = ours_m.cfg.text.vocab_size - 1                  # a token id no random model stops at: fixed-length decode
    n_new = args.new_tokens

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def ours_prefill():
        cache = ours_m.new_cache(args.batch, capacity=ids.shape[1] + n_new + 1)
        return cache, ours_m.extend(cache, ids, pixel_values=pv, image_grid_thw=grid, last_only=True)[:, 0]

    def ours_decode():  # generate's loop, timed after the prefill
        cache, logits = ours_prefill()
        sync()
        t0 = time.perf_counter()
        for _ in range(n_new):
            nxt = M.sample_next(logits)
            logits = ours_m.extend(cache, nxt[:, None], last_only=True)[:, 0]
        sync()
        return time.perf_counter() - t0

    class _Clock:  # transformers calls streamer.put(prompt) then put(token) once per step
        def __init__(self):
            self.t = []

        def put(self, value):
            sync()
            self.t.append(time.perf_counter())

        def end(self):
            pass

    def hf_decode():
        clock = _Clock()
        ref.generate(input_ids=ids, pixel_values=pv, image_grid_thw=grid, mm_token_type_ids=mm,
                     attention_mask=torch.ones_like(ids), max_new_tokens=n_new + 1, min_new_tokens=n_new + 1,
                     do_sample=False, eos_token_id=never, pad_token_id=0, streamer=clock)
        return clock.t[-1] - clock.t[1]  # first new token (end of prefill) -> last new token: n_new decode steps

    def hf_prefill():
        return ref(input_ids=ids, pixel_values=pv, image_grid_thw=grid, mm_token_type_ids=mm, use_cache=True,
                   logits_to_keep=1)

    def once(fn):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    # ours and transformers alternate within each repetition, so load from other processes hits both alike
    times = {"ours": ([], []), "transformers": ([], [])}
    with torch.no_grad():
        for rep in range(args.reps + 1):  # the first repetition is a warm-up
            for name, prefill, decode in (("ours", ours_prefill, ours_decode), ("transformers", hf_prefill, hf_decode)):
                tp, td = once(prefill), decode()
                if rep:
                    times[name][0].append(tp)
                    times[name][1].append(td)
        res = {k: (args.batch * ids.shape[1] / statistics.median(tp), args.batch * n_new / statistics.median(td))
               for k, (tp, td) in times.items()}
        a = ours_m.generate(ids, pv, grid, max_new_tokens=16, eos_token_id=never)
        b = ref.generate(input_ids=ids, pixel_values=pv, image_grid_thw=grid, mm_token_type_ids=mm,
                         attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False, eos_token_id=never,
                         pad_token_id=0)[:, ids.shape[1]:]
    _model_table(args, device, res, ids, grid, a.tolist() == b.tolist())
    return res


def _model_pair(args, device):
    """Ours and transformers' model on one random checkpoint of the asked size, and one prompt with one image."""
    from transformers import Qwen2_5_VLForConditionalGeneration  # benchmark-only dependency

    dtype = getattr(torch, args.dtype)
    d = make_tiny(os.path.join(tempfile.mkdtemp(prefix="bench_qwen25vl_"), "m"), hidden_size=args.hidden,
                  num_layers=args.layers, num_heads=args.hidden // 64, num_kv_heads=max(1, args.hidden // 256),
                  intermediate_size=args.hidden * 11 // 4, vision_hidden_size=args.hidden, vision_depth=args.layers,
                  vision_heads=args.hidden // 64, vision_intermediate_size=args.hidden * 2,
                  fullatt_block_indexes=(args.layers - 1,))
    ours = M.Qwen25VL.from_pretrained(d, dtype=dtype, device=device)
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(d, dtype=dtype).to(device).eval()
    tok = T.Tokenizer.from_pretrained(d)
    img = torch.randint(0, 256, (3, args.image, args.image), dtype=torch.uint8)
    pv, grid = ck.preprocess_image(img)
    msgs = [{"role": "system", "content": cof.SYSTEM_PROMPT},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the color of the cup?"}]}]
    ids, _ = T.tokenize_chat(tok, msgs, grid, add_generation_prompt=True)
    ids = torch.tensor([ids] * args.batch, device=device)                                     # [B, T]
    return ours, ref, ids, torch.cat([pv] * args.batch).to(device), torch.cat([grid] * args.batch)


def _model_table(args, device, res, ids, grid, same):
    """The result as a markdown table with ratios, naming the device."""
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"Qwen2.5-VL forward benchmark on {dev_name}, {args.dtype}; text+vision {args.layers} layers, hidden "
          f"{args.hidden}; batch {args.batch}; one {args.image}x{args.image} image ({int(grid[0].prod()) // 4} image "
          f"tokens) in a {ids.shape[1]}-token prompt; {args.new_tokens} decode steps; median of {args.reps}; torch "
          f"{torch.__version__}")
    print(f"| {'':14s} | {'prefill tok/s':>14s} | {'decode tok/s':>13s} |")
    print(f"|{'-' * 16}|{'-' * 16}|{'-' * 15}|")
    for name, (p, dcd) in res.items():
        print(f"| {name:14s} | {p:14.1f} | {dcd:13.1f} |")
    print(f"| {'ours / HF':14s} | {res['ours'][0] / res['transformers'][0]:13.2f}x | "
          f"{res['ours'][1] / res['transformers'][1]:12.2f}x |")
    print(f"greedy tokens identical for 16 steps: {same}")


# --------------------------------------------------------------------------------------------------------------------
# python bench.py cof

def bench_cof(a):
    """`python bench.py cof`: the batched one-cache loop against the released cost model (one question at a time,
    the whole conversation prefilled again after every zoom), same questions, same run. Random weights never zoom,
    so every question is made to call the tool `--zooms` times (forced tool-call prefixes), then the model runs on."""
    path = a.model or make_tiny(tempfile.mkdtemp(prefix="cof_bench_"), hidden_size=a.hidden, num_layers=a.layers,
                                num_heads=4, num_kv_heads=2, intermediate_size=4 * a.hidden,
                                vision_hidden_size=128, vision_depth=4, vision_heads=4, vision_intermediate_size=256)
    model, tok = cof.load(path, a.device, a.dtype)
    g = torch.Generator().manual_seed(0)
    h, w = a.size * 3 // 4, a.size
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for _ in range(a.n)]
    mh, mw = cof.main_size(h, w)
    prefixes = [[f'<tool_call>\n{{"name": "image_zoom_in_tool", "arguments": {{"bbox_2d": '
                 f'[{int(mw * (0.05 + 0.1 * k))}, {int(mh * 0.1)}, {int(mw * (0.3 + 0.1 * k))}, {int(mh * 0.4)}]}}}}'
                 f'\n</tool_call>' for k in range(a.zooms)] for _ in range(a.n)]
    qs = [f"Question {i}: what is in the picture?" for i in range(a.n)]
    cfg = cof.CofConfig(max_new_tokens=a.new_tokens, max_turns=a.zooms + 1)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)

    def timed(fn):
        sync()
        t0 = time.time()
        out = fn()
        sync()
        return out, time.time() - t0

    cof.run(model, tok, images[:1], qs[:1], cfg, logits_processor=cof.force_prefixes(tok, prefixes[:1]))   # warm-up
    results = []
    base, t_base = timed(lambda: [cof.run(Reencode(model), tok, [im], [q], cfg,
                                          logits_processor=cof.force_prefixes(tok, [pf]))[0]
                                  for im, q, pf in zip(images, qs, prefixes)])
    results.append(("re-encode each turn, 1 question at a time (released)", base, t_base))
    seq, t_seq = timed(lambda: [cof.run(model, tok, [im], [q], cfg, logits_processor=cof.force_prefixes(tok, [pf]))[0]
                                for im, q, pf in zip(images, qs, prefixes)])
    results.append(("one KV cache, 1 question at a time", seq, t_seq))
    bat, t_bat = timed(lambda: cof.run(model, tok, images, qs, cfg, logits_processor=cof.force_prefixes(tok, prefixes)))
    results.append((f"one KV cache, batch of {a.n}", bat, t_bat))
    print(f"device: {model.device} ({torch.cuda.get_device_name() if model.device.type == 'cuda' else 'cpu'}), "
          f"dtype {model.dtype}, {a.n} questions, image {w}x{h} -> {mw}x{mh}, {a.zooms} zooms each, "
          f"<= {a.new_tokens} new tokens a turn")
    rows = []
    for name, trs, t in results:
        gen = sum(x.n_generated for x in trs)
        same = all(x.ids == y.ids for x, y in zip(trs, base))
        rows.append(dict(mode=name, seconds=t, s_per_q=t / a.n, gen_tok_per_s=gen / t, speedup=t_base / t,
                         zooms=statistics.fmean([x.n_zooms for x in trs]), same_tokens_as_baseline=same))
    print(cof.format_table(rows))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    m = sub.add_parser("model", help="prefill/decode tokens/s, model.py vs transformers")
    m.add_argument("--layers", type=int, default=4)
    m.add_argument("--hidden", type=int, default=512)
    m.add_argument("--image", type=int, default=448, help="side of the square test image in pixels")
    m.add_argument("--batch", type=int, default=1)
    m.add_argument("--new_tokens", type=int, default=64)
    m.add_argument("--reps", type=int, default=5)
    m.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    m.add_argument("--dtype", default="float32")
    m.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    c = sub.add_parser("cof", help="whole CoF conversations: one-cache batched loop vs re-encoding every turn")
    c.add_argument("--model", default=None, help="checkpoint (default: a random model of --hidden/--layers)")
    c.add_argument("--hidden", type=int, default=256)
    c.add_argument("--layers", type=int, default=4)
    c.add_argument("--n", type=int, default=8, help="questions")
    c.add_argument("--size", type=int, default=448, help="long side of the random images")
    c.add_argument("--zooms", type=int, default=2)
    c.add_argument("--new-tokens", type=int, default=32, help="max new tokens per turn")
    c.add_argument("--device", default=None)
    c.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"])
    c.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    return bench_model(a) if a.what == "model" else bench_cof(a)


if __name__ == "__main__":
    main()
