"""Benchmarks: our code against its baseline, in the same run, printed as a table with ratios.

    python bench.py model [--threads 1] [--hidden 512 --layers 4 ...]   model.py vs transformers: prefill and decode
                                                                        (eager and compiled, theirs too where it
                                                                        can), same random checkpoint, greedy
                                                                        tokens compared
    python bench.py cof [--model DIR] [--n 8 --zooms 2 ...]             whole CoF conversations: the batched one-cache
                                                                        loop, eager and compiled, vs the released
                                                                        cost model (re-encode the whole chat every
                                                                        turn), same tokens
    python bench.py cof --model DIR --data FILE --n 64 --samples 8      GRPO-style sampled rollouts on real questions,
                                                                        eager vs compiled decode step: generated
                                                                        tokens/s, questions/s, same tokens

The crop kernels have their own microbenchmark beside them: `python crop_kernels.py --bench`. This file stays out of
the runtime code because its baselines are not runtime dependencies (transformers is a test-only oracle). The
released loop's cost is cof.reference_run's: the spec loop, which encodes the whole chat again every turn.
"""
from __future__ import annotations

import ctypes
import gc
import math
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

import checks
import cof
import crop_kernels as ck
import decode
import evaluate as E
import hub
import logprobs
import model as M
import tokenizer as T
from data import tiny


# --------------------------------------------------------------------------------------------------------------------
# Forced tool calls: random weights never zoom on their own

def force_prefixes(tokenizer, prefixes, group_size=1):
    """A logits_processor that makes turn k of question q start with the text prefixes[q][k] (then the model goes
    on by itself). For the benchmarks here and the tests on random weights, which never zoom on their own."""

    enc = [[tokenizer.encode(p) for p in checks.sequence(ps, f"prefixes[{q}]", empty=True)]
           for q, ps in enumerate(checks.sequence(prefixes, "prefixes"))]

    def proc(views, logits):
        for i, (row, k, turn) in enumerate(views):
            pre = enc[row // group_size]
            if k < len(pre) and len(turn) < len(pre[k]):
                logits[i] = torch.finfo(logits.dtype).min
                logits[i, pre[k][len(turn)]] = 0.0
        return logits
    return proc


# --------------------------------------------------------------------------------------------------------------------
# python bench.py model

def bench_model(args):
    """Every step of a CoF rollout and of training, ours vs transformers, on one random checkpoint, one run: the
    vision encoder, prefill, decode at batch 1, one prompt x G samples (prefill once, then G rows decoding), a
    training forward + backward; agreement (logits, greedy tokens); transformers' own compiled static-cache decode
    last (compiling it is the slowest part of a 7B run: a run cut at its time limit loses only those rows); then the
    crop kernels' table."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    ours, ref, ids, pv, grid = _model_pair(args, device)
    ours.eval()
    mm = (ids == ours.cfg.image_token_id).int()                                               # [1, T]
    never = ours.cfg.text.vocab_size - 1                  # a token id no random model stops at: fixed-length decode
    G, T = args.samples, ids.shape[1]
    hf_in = dict(input_ids=ids, pixel_values=pv, image_grid_thw=grid, mm_token_type_ids=mm)
    hf_g = {k: torch.cat([v] * G) for k, v in hf_in.items()}                                  # G copies of the prompt
    run = _ModelBench(args, ours, ref, ids, pv, grid, never)
    with torch.no_grad():
        _inference_rows(run, hf_in, hf_g)
    run.add((f"training forward + backward, {T} tokens", "ms", *run.clock.pair(
        lambda: _train_step(ours, lambda: ours(ids, pv, grid)), lambda: _train_step(ref, lambda: ref(**hf_in).logits))))
    with torch.no_grad():
        diff = (ours(ids, pv, grid)[:, -1].float() - ref(**hf_in).logits[:, -1].float()).abs().max().item()
        a = decode.generate(ours, ids, pv, grid, max_new_tokens=16, eos_token_id=never)
        c = decode.generate(ours, ids, pv, grid, max_new_tokens=16, eos_token_id=never, compile=True)
        b = ref.generate(**hf_in, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                         eos_token_id=never, pad_token_id=0)[:, T:]
        same = a.tolist() == b.tolist() == c.tolist()
        print(f"measured: {_agreement(diff, same)}", flush=True)
        if args.hf_static:
            _static_rows(run, hf_in, hf_g)
    _model_table(args, device, ours.cfg, run.rows, ids, grid, diff, same, run.fast)
    if not args.no_crop:
        ck.bench(sources=args.crop_source)
    return dict(rows=run.rows, max_logit_diff=diff, greedy_same=same)


class _ModelBench:
    """What the rows of `bench.py model` share: both models, the prompt, the clock, our compiled decode step, and
    the rows measured so far, each printed as it is measured (a run cut short, a GPU lease, still shows them)."""

    def __init__(self, args, ours, ref, ids, pv, grid, never):
        self.ours, self.ref, self.ids, self.pv, self.grid, self.never = ours, ref, ids, pv, grid, never
        self.n_new, self.G = args.new_tokens, args.samples
        self.clock = _Clock(ours.device, args.reps)
        self.fast = decode.decoder_for(ours)
        self.rows = []   # (step, unit, ours, transformers): unit "ms" (lower is better) or "tok/s" (higher is better)

    def add(self, row):
        self.rows.append(row)
        print(f"measured: {row[0]}: ours {row[2]:.1f} {row[1]}, transformers {row[3]:.1f} {row[1]}", flush=True)

    def decode(self, rows, step=None):
        """Seconds of our n_new decode steps for `rows` rows sharing the prompt (eager, or through `step`)."""
        return _decode(self.ours, self.ids, self.pv, self.grid, self.n_new, rows, self.clock, step)

    def hf_decode(self, hf_x, static=None):
        return _hf_decode(self.ref, hf_x, self.n_new, self.never, self.clock, static)

    def decode_row(self, name, rows, hf_x, step=None, static=None):
        self.add((name, "tok/s", *self.clock.pair(lambda: self.decode(rows, step), lambda: self.hf_decode(hf_x, static),
                                                  rate=rows * self.n_new)))


def _inference_rows(b: _ModelBench, hf_in, hf_g):
    """Vision, prefill and decode rows against transformers' default (eager) paths; on CUDA also our compiled step
    replayed as CUDA graphs."""
    ours, ref, ids, pv, grid, G = b.ours, b.ref, b.ids, b.pv, b.grid, b.G
    b.add((f"vision encoder, {pv.shape[0]} patches", "ms", *b.clock.pair(
        lambda: ours.visual(pv, grid), lambda: _hf_visual(ref)(pv, grid_thw=grid))))
    b.add((f"prefill, vision + {ids.shape[1]} tokens", "ms", *b.clock.pair(
        lambda: _prefill(ours, ids, pv, grid, b.n_new), lambda: ref(**hf_in, use_cache=True, logits_to_keep=1))))
    for rows in (1, G):                                                 # compile outside the timings (batch 1 and G)
        b.decode(rows, b.fast)
    b.decode_row("decode, batch 1", 1, hf_in)
    b.decode_row("decode, batch 1: ours compiled", 1, hf_in, b.fast)
    b.add((f"one prompt x {G} samples: prefill", "ms", *b.clock.pair(
        lambda: _prefill(ours, ids, pv, grid, b.n_new).repeat_interleave(G),
        lambda: ref(**hf_g, use_cache=True, logits_to_keep=1))))
    b.decode_row(f"one prompt x {G} samples: decode", G, hf_g)
    b.decode_row(f"one prompt x {G} samples: decode, ours compiled", G, hf_g, b.fast)
    if ours.device.type == "cuda":   # the compiled step replayed as CUDA graphs
        graphed = decode.decoder_for(ours, cuda_graphs=True)
        for rows in (1, G):                                             # recorded outside the timings
            b.decode(rows, graphed)
        for rows, hf_x, name in ((1, hf_in, "decode, batch 1"), (G, hf_g, f"one prompt x {G} samples: decode")):
            before = graphed.graphs.records if graphed.graphs else 0
            b.decode_row(f"{name}: ours compiled + CUDA graphs", rows, hf_x, graphed)
            recorded = (f"{graphed.graphs.records - before} recorded inside the timed runs (0: every step replayed)"
                        if graphed.graphs else "none (they failed: see the warning above)")
            print(f"CUDA graphs: {recorded}", flush=True)


def _static_rows(b: _ModelBench, hf_in, hf_g):
    """Our compiled step against transformers' static cache with its forward compiled, batch 1 and G rows."""
    for rows, hf_x, name in ((1, hf_in, "decode, batch 1: both compiled (transformers: static cache)"),
                             (b.G, hf_g, f"one prompt x {b.G} samples: decode, both compiled")):
        static = _hf_static(b.ref, hf_x, b.n_new, b.never, b.clock)     # compiles outside the timings
        if static:
            b.decode_row(name, rows, hf_x, b.fast, static)


class _Clock:
    """Median wall time over `reps` runs after one warm-up, ours and transformers alternating within each repetition
    so that load from other processes hits both alike. A function may return its own duration (decode loops time
    only their decode steps); otherwise the whole call is timed."""

    def __init__(self, device, reps=None):
        self.device, self.reps = device, reps

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def now(self):
        self.sync()
        return time.perf_counter()

    def timed(self, fn):
        """(fn's result, seconds the call took)."""
        t0 = self.now()
        out = fn()
        return out, self.now() - t0

    def once(self, fn):
        out, t = self.timed(fn)
        return out if isinstance(out, float) else t

    def pair(self, ours, theirs, rate=None):
        """(ours, transformers): median ms, or `rate` units per second when rate is given."""
        times = ([], [])
        for rep in range(self.reps + 1):
            for k, fn in enumerate((ours, theirs)):
                t = self.once(fn)
                if rep:
                    times[k].append(t)
        med = [statistics.median(t) for t in times]
        return tuple(rate / m for m in med) if rate else tuple(1e3 * m for m in med)


def _hf_visual(ref):
    return getattr(ref, "visual", None) or ref.model.visual


def _prefill(model, ids, pv, grid, n_new):
    cache = model.new_cache(ids.shape[0], capacity=ids.shape[1] + n_new + 1)
    model.extend(cache, ids, pixel_values=pv, image_grid_thw=grid, last_only=True)
    return cache


def _decode(model, ids, pv, grid, n_new, G, clock, step=None):
    """generate's loop for G rows sharing one prefilled prompt, through `extend` or a decode `step`
    (decode.Decoder); returns the seconds of the n_new decode steps."""
    # room for the last step's key bucket: a Decoder never grows this cache mid-run (a CUDA graph recorded on its
    # tensors stays valid, and no timed step pays for a copy)
    cache = model.new_cache(1, capacity=decode.key_count(ids.shape[1] + n_new + 1) + 1)
    logits = model.extend(cache, ids, pixel_values=pv, image_grid_thw=grid, last_only=True)[:, 0]    # [1, V]
    cache.repeat_interleave(G)
    logits = logits.repeat_interleave(G, dim=0)                                                     # [G, V]
    t0 = clock.now()
    for _ in range(n_new):
        nxt = decode.sample_next(logits)                                                           # [G]
        logits = step(cache, nxt) if step else model.extend(cache, nxt[:, None], last_only=True)[:, 0]
    return clock.now() - t0


class _Streamer:  # transformers calls streamer.put(prompt), then put(new tokens [B]) once per step
    def __init__(self, clock):
        self.clock, self.t = clock, []

    def put(self, value):
        self.t.append(self.clock.now())

    def end(self):
        pass


def _hf_decode(ref, hf_in, n_new, never, clock, static=None):
    """transformers' greedy generate on a batch of prompts (G copies for the samples rows: it has no shared prefill);
    the seconds from its first new token to its last (n_new decode steps). static: generate's keywords for its
    static cache, compiled (`_hf_static`)."""
    streamer = _Streamer(clock)
    ref.generate(**hf_in, attention_mask=torch.ones_like(hf_in["input_ids"]), max_new_tokens=n_new + 1,
                 min_new_tokens=n_new + 1, do_sample=False, eos_token_id=never, pad_token_id=0, streamer=streamer,
                 **(static or {}))
    return streamer.t[-1] - streamer.t[1]


def _hf_static(ref, hf_in, n_new, never, clock):
    """generate's keywords for transformers' static cache with its forward compiled (on CUDA it compiles that by
    itself; on the CPU only when asked through CompileConfig's `_compile_all_devices`), after one warm-up call that
    compiles it; None (with the reason printed) where this transformers cannot."""
    try:
        from transformers import CompileConfig
        cc = CompileConfig(mode="default" if ref.device.type == "cpu" else "reduce-overhead")
        cc._compile_all_devices = True
        kw = dict(cache_implementation="static", compile_config=cc)
        _hf_decode(ref, hf_in, n_new, never, clock, kw)
        return kw
    except Exception as e:  # an older transformers, or no compiler
        print(f"transformers' static-cache compiled generate unavailable here: {type(e).__name__}: {str(e)[:200]}")
        return None


def _train_step(model, logits_fn):
    """One training forward + backward of a stand-in loss (logsumexp of the logits), gradients dropped after."""
    model.zero_grad(set_to_none=True)
    logits_fn().float().logsumexp(-1).mean().backward()
    model.zero_grad(set_to_none=True)


def _model_pair(args, device):
    """Ours and transformers' model on one random checkpoint of the asked size, and one prompt with one image. The
    small config is written by make_tiny and both models load it; the 7B preset's weights are drawn on the device
    (tiny.random_model: seconds, where drawing 8 B numbers on a CPU takes minutes), written once with
    save_pretrained, and transformers loads those files."""
    from transformers import Qwen2_5_VLForConditionalGeneration  # benchmark-only dependency

    dtype = getattr(torch, args.dtype)
    seven = args.preset == "7b"   # 15 GiB of files: in memory where the machine has room (seconds, not a minute)
    ram = seven and os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 40 * 2**30
    d = os.path.join(tempfile.mkdtemp(prefix="bench_qwen25vl_", dir="/dev/shm" if ram else None), "m")
    if seven:
        tok = T.Tokenizer.from_pretrained(tiny.make_tiny(d))     # the tokenizer and processor files
        cfg = tiny.qwen25vl_7b_config(tok)
        _check_memory(cfg, dtype, device)
        ours = tiny.random_model(cfg, device, dtype)
        ours.save_pretrained(d)                                  # replaces make_tiny's weights and config
    else:
        heads = args.hidden // 64                               # kv heads divide heads at every --hidden
        tiny.make_tiny(d, hidden_size=args.hidden, num_layers=args.layers, num_heads=heads,
                       num_kv_heads=math.gcd(heads, max(1, heads // 4)), intermediate_size=args.hidden * 11 // 4,
                       vision_hidden_size=args.hidden, vision_depth=args.layers, vision_heads=heads,
                       vision_intermediate_size=args.hidden * 2, fullatt_block_indexes=(args.layers - 1,))
        ours = M.Qwen25VL.from_pretrained(d, dtype=dtype, device=device)
        tok = T.Tokenizer.from_pretrained(d)
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(d, dtype=dtype).to(device).eval()
    shutil.rmtree(os.path.dirname(d))                            # 15 GiB for the 7B preset; both models hold theirs
    img = torch.randint(0, 256, (3, args.image, args.image), dtype=torch.uint8)
    pv, grid = ck.preprocess_image(img)
    msgs = [{"role": "system", "content": cof.SYSTEM_PROMPT},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the color of the cup?"}]}]
    ids, _ = T.tokenize_chat(tok, msgs, grid, add_generation_prompt=True)
    # grid on the device too: transformers builds the vision positions on grid's device, and a CPU grid with a
    # CUDA model fails there (ours reads it to the host either way)
    return ours, ref, torch.tensor([ids], device=device), pv.to(device), grid.to(device)     # ids [1, T]


def _check_memory(cfg, dtype, device):
    """Refuse a preset the device cannot hold: two copies of the weights (ours and transformers') plus one set of
    gradients (the training row), with a fifth spare for activations."""
    need = 3.2 * sum(math.prod(s) for s in M.weight_shapes(cfg).values()) * torch.empty(0, dtype=dtype).element_size()
    if device.type == "cuda":
        have, where = torch.cuda.mem_get_info(device)[0], torch.cuda.get_device_name(device)
    else:
        have, where = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "this machine's free memory"
    if need > have:
        raise SystemExit(f"bench.py model --preset 7b needs about {need / 2**30:.0f} GiB ({dtype}: two models and "
                         f"one set of gradients); {where} has {have / 2**30:.0f} GiB free. Run it on a GPU.")


def _model_table(args, device, cfg, rows, ids, grid, diff, same, fast):
    """The rows as a markdown table with ratios (> 1 = ours is faster), naming the device and the versions."""
    import transformers

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    t, v = cfg.text, cfg.vision
    print(f"Qwen2.5-VL benchmark on {dev_name}, {args.dtype}; text {t.num_hidden_layers} layers, hidden {t.hidden_size}, "
          f"vocabulary {t.vocab_size}; vision {v.depth} blocks, hidden {v.hidden_size}; "
          f"one {args.image}x{args.image} image ({int(grid[0].prod()) // 4} image tokens) in a {ids.shape[1]}-token "
          f"prompt; {args.new_tokens} decode steps; median of {args.reps}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}")
    print("| step | unit | ours | transformers | ours vs transformers |")
    print("|---|---|---|---|---|")
    for step, unit, o, h in rows:
        ratio = h / o if unit == "ms" else o / h
        print(f"| {step} | {unit} | {o:.1f} | {h:.1f} | {ratio:.2f}x |")
    print(f"agreement: {_agreement(diff, same)}; our decode step compiled {fast.compiles} "
          f"graph(s){'' if fast.compiled else ' (torch.compile failed: decoded eagerly)'}")


def _agreement(diff, same):
    return (f"max |logit difference| at the last prompt token {diff:.2e}; greedy tokens identical for 16 steps "
            f"(ours eager, ours compiled, transformers): {same}")


# --------------------------------------------------------------------------------------------------------------------
# python bench.py cof

def bench_cof(a):
    """`python bench.py cof`: the batched one-cache loop against the released loop's cost, the spec loop
    cof.reference_run (one question at a time, the whole conversation prefilled again every turn), same questions,
    same run. Random weights never zoom, so every question is made to call the tool `--zooms` times (forced
    tool-call prefixes), then the model runs on."""
    path = a.model or tiny.make_tiny(tempfile.mkdtemp(prefix="cof_bench_"), hidden_size=a.hidden, num_layers=a.layers,
                                num_heads=4, num_kv_heads=2, intermediate_size=4 * a.hidden,
                                vision_hidden_size=128, vision_depth=4, vision_heads=4, vision_intermediate_size=256)
    model, tok = E.load(path, a.device, a.dtype)
    g = torch.Generator().manual_seed(0)
    h, w = a.size * 3 // 4, a.size
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for _ in range(a.n)]
    mh, mw = cof.main_size(h, w)
    prefixes = [[f'<tool_call>\n{{"name": "image_zoom_in_tool", "arguments": {{"bbox_2d": '
                 f'[{int(mw * (0.05 + 0.1 * k))}, {int(mh * 0.1)}, {int(mw * (0.3 + 0.1 * k))}, {int(mh * 0.4)}]}}}}'
                 f'\n</tool_call>' for k in range(a.zooms)] for _ in range(a.n)]
    qs = [f"Question {i}: what is in the picture?" for i in range(a.n)]
    cfg = cof.CofConfig(max_new_tokens=a.new_tokens, max_turns=a.zooms + 1)
    timed = _Clock(model.device).timed
    cof.run(model, tok, images[:1], qs[:1], cfg, logits_processor=force_prefixes(tok, prefixes[:1]))   # warm-up
    results = []
    base, t_base = timed(lambda: [cof.reference_run(model, tok, im, q, cfg,
                                                    logits_processor=force_prefixes(tok, [pf]))
                                  for im, q, pf in zip(images, qs, prefixes)])
    results.append(("re-encode each turn, 1 question at a time (released)", base, t_base))
    seq, t_seq = timed(lambda: [cof.run(model, tok, [im], [q], cfg, logits_processor=force_prefixes(tok, [pf]))[0]
                                for im, q, pf in zip(images, qs, prefixes)])
    results.append(("one KV cache, 1 question at a time", seq, t_seq))
    bat, t_bat = timed(lambda: cof.run(model, tok, images, qs, cfg, logits_processor=force_prefixes(tok, prefixes)))
    results.append((f"one KV cache, batch of {a.n}", bat, t_bat))
    fast = replace(cfg, compile=True)
    cof.run(model, tok, images, qs, fast, logits_processor=force_prefixes(tok, prefixes))     # compiles
    com, t_com = timed(lambda: cof.run(model, tok, images, qs, fast, logits_processor=force_prefixes(tok, prefixes)))
    results.append((f"one KV cache, batch of {a.n}, compiled decode step", com, t_com))
    print(f"device: {model.device} ({torch.cuda.get_device_name() if model.device.type == 'cuda' else 'cpu'}), "
          f"dtype {model.dtype}, {a.n} questions, image {w}x{h} -> {mw}x{mh}, {a.zooms} zooms each, "
          f"<= {a.new_tokens} new tokens a turn")
    rows = []
    for name, trs, t in results:
        gen = sum(x.n_generated for x in trs)
        same = all(x.ids == y.ids for x, y in zip(trs, base))
        rows.append(dict(mode=name, seconds=t, s_per_q=t / a.n, gen_tok_per_s=gen / t, speedup=t_base / t,
                         zooms=statistics.fmean([x.n_zooms for x in trs]), same_tokens_as_baseline=same))
    print(E.format_table(rows))
    return rows


def bench_rollouts(a):
    """`python bench.py cof --data FILE --samples G`: GRPO rollouts as grpo.py runs them: the first --n questions of a
    held-out file (evaluate.read_synthetic: V*-layout JSONL or RL records), G sampled conversations each (temperature 1,
    one generator), all in one batched one-cache loop; generated tokens/s, questions/s and rollouts/s."""
    model, tok = E.load(a.model, a.device, a.dtype)
    items = E.read_synthetic(a.data)[:a.n]
    images = [E.load_item_image(it) for it in items]
    questions = [it["question"] for it in items]
    cfg = a.cof_cfg
    clock = _Clock(model.device)
    modes = [("eager extend", dict(compile=False, cuda_graphs=False)),
             ("compiled decode step", dict(compile=True, cuda_graphs=False))]
    if model.device.type == "cuda":
        modes.append(("compiled decode step + CUDA graphs", dict(compile=True, cuda_graphs=True)))
    rows = []
    for rep in range(a.reps):
        runs = []
        for name, kw in modes:
            c = replace(cfg, **kw)
            if rep == 0:   # warm-up, untimed: the same rollouts once, and one row alone (the step compiles a batch
                for n, G in ((len(images), a.samples), (1, 1)):   # of one row as a graph of its own)
                    cof.rollouts(model, tok, images[:n], questions[:n], G, c,
                                 generator=torch.Generator(device=model.device).manual_seed(9))
            g = torch.Generator(device=model.device).manual_seed(rep)
            trs, t = clock.timed(lambda: cof.rollouts(model, tok, images, questions, a.samples, c, generator=g))
            runs.append((trs, t))
            eager, t_eager = runs[0]                    # this seed's eager run (for the eager row: itself)
            gen = sum(x.n_generated for x in trs)
            rows.append(dict(mode=f"{len(items)} questions x G={a.samples}, seed {rep}: {name}",
                             seconds=t, gen_tokens=gen, gen_tok_per_s=gen / t, questions_per_s=len(items) / t,
                             rollouts_per_s=len(trs) / t, zooms=statistics.fmean(x.n_zooms for x in trs),
                             speedup=t_eager / t, same_tokens_as_eager=all(x.ids == y.ids for x, y in zip(eager, trs)),
                             max_logprob_diff=logprob_gap(eager, trs)))
    print(f"device: {model.device} ({torch.cuda.get_device_name() if model.device.type == 'cuda' else 'cpu'}, "
          f"{torch.get_num_threads()} threads), dtype {model.dtype}, model {a.model}, data {a.data}, cfg {a.cfg or []}")
    print(E.format_table(rows))
    return rows


def logprob_gap(a, b):
    """Largest difference between the recorded log-probs of two runs' trajectories that have the same tokens."""
    return max((max((abs(p - q) for p, q in zip(x.logprobs, y.logprobs)), default=0.0)
                for x, y in zip(a, b) if x.ids == y.ids), default=float("nan"))


POSITIVE = checks.arg(lo=1, whole=True)
THREADS = checks.arg(lo=0, hi=checks.THREADS_MAX, whole=True)
DEVICE = checks.arg(lambda text, name: str(checks.device(text, name)))


def _hidden(text, name, step=64):
    """--hidden: the random models' hidden size, a multiple of `step` (64: their attention heads are 64 or 16 * k
    wide; 128 for memory's 7B head dim)."""
    h = checks.parse_number(text, name, lo=step, whole=True)
    if h % step:
        raise ValueError(f"must be a multiple of {step}, got {h}")
    return h


def _parts(text, name):
    """--parts: a comma list of attention / logprobs."""
    return [checks.one_of(p.strip(), name, ("attention", "logprobs")) for p in text.split(",")]


def _lengths(text, name):
    """--lengths: a comma list of prompt lengths, each a whole number >= 8 and a multiple of 8 (4 prompts: L/8 ...)."""
    out = [checks.parse_number(v, name, lo=8, whole=True) for v in text.split(",")]
    if any(v % 8 for v in out):
        raise ValueError(f"each length must be a multiple of 8, got {text!r}")
    return out


def _batches(text, name):
    """--batches: a comma list of ROWSxTOKENS, e.g. 2x2048,4x4096."""
    out = []
    for b in text.split(","):
        rows, x, tokens = b.strip().partition("x")
        if not x:
            raise ValueError(f"each batch is ROWSxTOKENS such as 2x2048, got {b!r}")
        out.append((checks.parse_number(rows, name, lo=1, whole=True), checks.parse_number(tokens, name, lo=2, whole=True)))
    return out


HIDDEN = checks.arg(_hidden)
# --------------------------------------------------------------------------------------------------------------------
# python bench.py memory

class _Peak:
    """Peak memory of a call above what was in use before it, and its seconds. CUDA: torch.cuda.max_memory_allocated;
    CPU: the process's resident peak (VmHWM of /proc/self/status, reset by writing 5 to /proc/self/clear_refs)."""

    def __init__(self, device):
        self.device = device
        if device.type == "cpu" and not os.access("/proc/self/clear_refs", os.W_OK):
            raise SystemExit("bench.py memory measures a CPU peak through /proc/self/clear_refs (Linux >= 4.0), which "
                             "this system does not let it write; run it on Linux, or with --device cuda")

    @staticmethod
    def _kib(path, field):
        with open(path) as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    def free_gib(self):
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0] / 2**30
        return self._kib("/proc/meminfo", "MemAvailable") / 2**20

    def __call__(self, fn):
        """(peak GiB above the memory in use before fn(), seconds); fn's result is dropped."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")                                                    # VmHWM := VmRSS
            before = 1024 * self._kib("/proc/self/status", "VmRSS")
        t0 = time.perf_counter()
        fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            top = torch.cuda.max_memory_allocated(self.device)
        else:
            top = 1024 * self._kib("/proc/self/status", "VmHWM")
        return (top - before) / 2**30, time.perf_counter() - t0


def _ragged(lengths, left, generator, device):
    """Random text ids [B, max(lengths)] and their mask: row b has lengths[b] real tokens, padded left or right."""
    L = max(lengths)
    ids = torch.randint(5, 500, (len(lengths), L), generator=generator)
    real = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]                        # [B, L] right-padded
    return ids.to(device), (real.flip(1) if left else real).to(device)


def _memory_attention(a, device, peak):
    """(a) Ragged batches through one decoder layer at Qwen2.5-VL-7B's attention shapes (28 query heads, 4 KV heads,
    head dim 128; the MLP and the vocabulary cut to sizes attention memory does not depend on): for each L of
    --lengths, 4 left-padded prompts of L/8, L/4, L/2 and L tokens (prefill), then one crop turn of --turn, 3/4, 1/2
    and 1/4 of it appended to the cache (ragged); ours (extend) and transformers' Qwen2.5-VL on one checkpoint."""
    from transformers import Qwen2_5_VLForConditionalGeneration  # benchmark-only dependency

    d = tempfile.mkdtemp(prefix="bench_memory_")
    tiny.make_tiny(d, hidden_size=3584, num_layers=1, num_heads=28, num_kv_heads=4, intermediate_size=a.mlp,
                   vision_hidden_size=32, vision_depth=1, vision_heads=2, vision_intermediate_size=64,
                   fullatt_block_indexes=(0,))
    ours = M.Qwen25VL.from_pretrained(d, dtype=a.dtype, device=device)
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(d, dtype=a.dtype).to(device).eval()
    shutil.rmtree(d)
    gen, rows = torch.Generator().manual_seed(0), []
    for L in a.lengths:
        lens, turns = [L // 8, L // 4, L // 2, L], [a.turn * k // 4 for k in (4, 3, 2, 1)]
        prompt, pmask = _ragged(lens, True, gen, device)                                     # [4, L]
        turn, tmask = _ragged(turns, False, gen, device)                                     # [4, turn]
        hf, held = {}, {}   # the caches: made inside the measured call, as transformers' grows inside its own
        with torch.no_grad():
            prefill = peak(lambda: ours.extend(held.setdefault("cache", ours.new_cache(4, capacity=L + a.turn)),
                                               prompt, pmask, last_only=True))
            append = peak(lambda: ours.extend(held["cache"], turn, tmask, last_only=True))
            del held["cache"]
            hf_prefill = peak(lambda: hf.update(out=ref(input_ids=prompt, attention_mask=pmask, logits_to_keep=1)))
            hf_append = peak(lambda: ref(input_ids=turn, attention_mask=torch.cat([pmask, tmask], 1),
                                         past_key_values=hf.pop("out").past_key_values, logits_to_keep=1))
        rows += [_mem_row(f"(a) prefill, 4 prompts of {'/'.join(map(_k, lens))} tokens", prefill, None, hf_prefill),
                 _mem_row(f"(a) then a crop turn of {'/'.join(map(str, turns))} tokens", append, None, hf_append)]
        print(f"measured: {rows[-2]}\nmeasured: {rows[-1]}", flush=True)
    return rows


def _k(n):
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _mem_row(case, ours, dense, hf):
    """A table row from (GiB, seconds) of ours and of each baseline (None: not measured; said where decided)."""
    row = dict(case=case, ours_GiB=ours[0])
    for name, m in (("dense", dense), ("transformers", hf)):
        row[f"{name}_GiB"] = "-" if m is None else m[0]
        row[f"ours/{name}"] = "-" if m is None else f"{ours[0] / m[0]:.2f}x"
    row.update(ours_s=ours[1], dense_s="-" if dense is None else dense[1], transformers_s="-" if hf is None else hf[1])
    return row


_GRPO, _REF, _SFT = ("GRPO log-probs + entropy, forward + backward", "reference log-probs, no gradient",
                     "SFT loss, forward + backward")


def _our_logprob_cases(net, ids, targets, banned):
    """(b) ours: Qwen25VL.forward(targets=...), as grpo.token_logprobs and sft.sft_step call it."""
    return {_GRPO: lambda: net(ids, targets=targets, banned=banned, entropy=True)[0].sum().backward(),
            _REF: lambda: _no_grad(lambda: net(ids, targets=targets, banned=banned)),
            _SFT: lambda: (-net(ids, targets=targets)[0].sum()).backward()}


def _dense_logprob_cases(logits, targets, banned):
    """(b) the dense computation from the full logits() [B, T, V]: grpo.token_logprobs and sft.sft_loss before
    logprobs.token_logprobs (the policy log-softmax, or cross-entropy, of the scored rows)."""
    sel = targets >= 0                                                                       # [B, T]

    def lp(entropy):
        x = logprobs.policy_log_softmax(logits()[sel], banned)                                      # [N, V]
        with torch.no_grad():
            ent = -(x.exp() * x.nan_to_num(0.0)).sum(-1) if entropy else None                # [N]
        return x.gather(-1, targets[sel][:, None])[:, 0], ent                                # [N]

    return {_GRPO: lambda: lp(True)[0].sum().backward(),
            _REF: lambda: _no_grad(lambda: lp(False)),
            _SFT: lambda: F.cross_entropy(logits()[sel].float(), targets[sel], reduction="sum").backward()}


def _no_grad(fn):
    with torch.no_grad():
        fn()


def _memory_logprobs(a, device, peak):
    """(b) GRPO's policy log-probs (forward + backward, with the entropy), the reference's (no gradient) and SFT's loss
    (forward + backward) for the B x T text tokens of --batches, every position scored (the next token), vocabulary
    --vocab (152,064) and hidden --hidden (3,584, Qwen2.5-VL-7B's; the head's time grows with it, the memory of its
    logits does not) in one decoder layer (head dim 128, GQA 7:1; the MLP cut to --mlp): ours,
    the dense computation (full logits), and transformers' Qwen2.5-VL (its logits; SFT: its own loss from labels).
    Embedding and head are frozen, as under the released LoRA recipe: a trained head's [V, D] gradient (2 GiB in
    fp32) is the same for every method. A baseline that would not fit in the free memory (~5x the fp32 logits) is
    skipped, saying so."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # benchmark-only dependency

    d = tempfile.mkdtemp(prefix="bench_memory_")
    tok = T.Tokenizer.from_pretrained(tiny.make_tiny(d))
    shutil.rmtree(d)
    cfg = tiny.qwen25vl_7b_config(tok)
    heads = a.hidden // 128                                   # head dim 128, GQA 7:1 as at 7B (28 / 4 at 3,584)
    cfg = replace(cfg, torch_dtype="float32", text=replace(cfg.text, num_hidden_layers=1, intermediate_size=a.mlp,
                                                           vocab_size=a.vocab, hidden_size=a.hidden,
                                                           num_attention_heads=heads,
                                                           num_key_value_heads=max(1, heads // 7)),
                  vision=replace(cfg.vision, depth=1, hidden_size=32, num_heads=2, intermediate_size=64,
                                 fullatt_block_indexes=(0,)))
    banned, results = cof.vision_token_ids(tok), {}

    def measure(which, cases, B, Tn):
        for case, fn in cases.items():
            need = 5 * B * Tn * cfg.text.vocab_size * 4 / 2**30
            if which != "ours" and need > 0.9 * peak.free_gib():
                print(f"{which}, {case}, {B} x {Tn}: not run (needs ~{need:.0f} GiB, {peak.free_gib():.0f} GiB free)")
                continue
            results.setdefault((B, Tn, case), {})[which] = peak(fn)
            print(f"measured: {which}, {case}, {B} x {Tn}: {results[(B, Tn, case)][which]}", flush=True)

    net = tiny.random_model(cfg, device, a.dtype).train()
    net.model.embed_tokens.requires_grad_(False)
    net.lm_head.requires_grad_(False)
    for B, Tn in a.batches:
        ids = torch.randint(5, 500, (B, Tn), generator=torch.Generator().manual_seed(B * Tn)).to(device)
        targets = F.pad(ids[:, 1:], (0, 1), value=-100)                                     # [B, T] all but the last
        measure("ours", _our_logprob_cases(net, ids, targets, banned), B, Tn)
        measure("dense", _dense_logprob_cases(lambda: net(ids), targets, banned), B, Tn)
    del net
    ref = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(cfg.to_hf())).to(device, a.dtype).train()
    ref.get_input_embeddings().requires_grad_(False)
    ref.lm_head.requires_grad_(False)
    for B, Tn in a.batches:
        ids = torch.randint(5, 500, (B, Tn), generator=torch.Generator().manual_seed(B * Tn)).to(device)
        targets = F.pad(ids[:, 1:], (0, 1), value=-100)
        cases = _dense_logprob_cases(lambda: ref(input_ids=ids).logits, targets, banned)
        cases[_SFT] = lambda: ref(input_ids=ids, labels=ids).loss.backward()         # it shifts the labels itself
        measure("transformers", cases, B, Tn)
    return [_mem_row(f"(b) {case}, {B} x {_k(Tn)} tokens", r["ours"], r.get("dense"), r.get("transformers"))
            for (B, Tn, case), r in results.items()]


def bench_memory(a):
    """`python bench.py memory`: the peak memory of (a) ragged attention and (b) log-probs and loss at 7B shapes,
    ours against the dense computation and transformers, as a table with ratios (lower is better)."""
    import transformers

    device = torch.device(a.device)
    peak = _Peak(device)
    if device.type == "cpu":   # glibc to map every block of 64 KiB or more on its own (M_MMAP_THRESHOLD), so that a
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)   # freed tensor leaves the resident set: by default it keeps
        # blocks up to 32 MiB for reuse, which a peak would count or not by chance. For this process: not in tests.
    rows = (_memory_attention(a, device, peak) if "attention" in a.parts else []) + \
        (_memory_logprobs(a, device, peak) if "logprobs" in a.parts else [])
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    how = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "resident peak, VmHWM"
    print(f"peak memory above the model ({how}) on {where}, {a.dtype}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}")
    print(E.format_table(rows))
    return rows


def parser():
    ap = checks.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    m = sub.add_parser("model", help="prefill/decode tokens/s, model.py vs transformers")
    m.add_argument("--preset", choices=("small", "7b"), default="small",
                   help="small: a random model of --hidden/--layers (the CPU default); 7b: Qwen2.5-VL-7B's shapes, "
                        "random weights, bf16 and a 1008 x 1008 image unless told (a GPU)")
    m.add_argument("--layers", type=POSITIVE, default=4)
    m.add_argument("--hidden", type=HIDDEN, default=512, help="hidden size: a multiple of 64 (heads of 64)")
    m.add_argument("--image", type=checks.arg(lo=28, whole=True), default=None,
                   help="side of the square test image in pixels (small: 448, 7b: 1008, the issue's 1296 image tokens)")
    m.add_argument("--samples", type=POSITIVE, default=8, help="G: samples of one prompt decoded together")
    m.add_argument("--new_tokens", type=POSITIVE, default=64)
    m.add_argument("--reps", type=POSITIVE, default=5)
    m.add_argument("--no_crop", action="store_true", help="skip the crop kernels' table")
    m.add_argument("--no_hf_static", dest="hf_static", action="store_false",
                   help="skip transformers' compiled static-cache decode rows (the last ones; compiling them takes "
                        "minutes at 7B shapes)")
    m.add_argument("--crop_source", type=checks.arg(ck.parse_sources), default=[(7680, 4320)],
                   help="WxH of the source image the crop kernels' table crops from (a comma list: several)")
    m.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=DEVICE)
    m.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="small: float32, 7b: bfloat16")
    m.add_argument("--threads", type=THREADS, default=0, help="CPU threads for torch (0 = torch's default)")
    c = sub.add_parser("cof", help="whole CoF conversations: one-cache batched loop vs re-encoding every turn")
    c.add_argument("--model", default=None, help="checkpoint (default: a random model of --hidden/--layers)")
    c.add_argument("--hidden", type=HIDDEN, default=256, help="hidden size: a multiple of 64 (4 heads of 16 * k)")
    c.add_argument("--layers", type=POSITIVE, default=4)
    c.add_argument("--n", type=POSITIVE, default=8, help="questions")
    c.add_argument("--size", type=checks.arg(lo=28, whole=True), default=448, help="long side of the random images")
    c.add_argument("--zooms", type=checks.arg(lo=0, whole=True), default=2)
    c.add_argument("--new_tokens", type=POSITIVE, default=32, help="max new tokens per turn")
    c.add_argument("--device", default=None, type=DEVICE)
    c.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"])
    c.add_argument("--threads", type=THREADS, default=0, help="CPU threads for torch (0 = torch's default)")
    c.add_argument("--data", default=None, help="with --model and --samples: held-out records to run GRPO-style "
                                                "sampled rollouts on (e.g. runs/synth/val.jsonl)")
    c.add_argument("--samples", type=checks.arg(lo=0, whole=True), default=0,
                   help="G sampled conversations per question (needs --data)")
    c.add_argument("--reps", type=POSITIVE, default=1, help="timed repetitions of the sampled rollouts (seeds 0, 1, ...)")
    c.add_argument("--cfg", action="append", metavar="KEY=VALUE",
                   help="CofConfig option for the sampled rollouts (repeatable), as in `evaluate.py --cfg`")
    m = sub.add_parser("memory", help="peak memory: ragged attention, log-probs and loss at 7B shapes")
    m.add_argument("--parts", type=checks.arg(_parts), default=["attention", "logprobs"],
                   help="attention (a): ragged prefill + crop turn; logprobs (b): GRPO / reference / SFT")
    m.add_argument("--lengths", type=checks.arg(_lengths), default=[2048, 4096, 8192, 16384],
                   help="(a) longest prompt of each batch (4 prompts: L/8, L/4, L/2, L), a multiple of 8")
    m.add_argument("--turn", type=checks.arg(lo=4, whole=True), default=1024,
                   help="(a) longest crop turn appended (4 rows: 1, 3/4, 1/2, 1/4)")
    m.add_argument("--batches", type=checks.arg(_batches), default=[(2, 2048), (4, 4096)],
                   help="(b) rows x tokens, e.g. 2x2048,4x4096")
    m.add_argument("--mlp", type=POSITIVE, default=1024, help="MLP width of the one layer (memory of attention and of "
                                                              "the head does not depend on it)")
    m.add_argument("--vocab", type=POSITIVE, default=152064, help="(b) vocabulary (Qwen2.5-VL's: 152,064)")
    m.add_argument("--hidden", type=checks.arg(_hidden, step=128), default=3584,
                   help="(b) hidden size, a multiple of 128 (7B: 3,584); the logits' memory does not depend on it, "
                        "the time does")
    m.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=DEVICE)
    m.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="default: float32 on the CPU, bfloat16 on CUDA (its flash kernel's, and 7B's, dtype)")
    m.add_argument("--threads", type=THREADS, default=0, help="CPU threads for torch (0 = torch's default)")
    return ap


def main(argv=None):
    """A bad option is argparse's one-line error (exit 2); a file that does not load one line (exit 1)."""
    ap = parser()
    a = ap.parse_args(argv)
    if a.what == "cof":
        try:
            a.cof_cfg = E.cfg_from_args(a.cfg, do_sample=True)
        except ValueError as e:
            ap.error(str(e))
    with checks.one_line_errors("bench.py", E.BenchError, FileNotFoundError, hub.CheckpointError):
        return _run(ap, a)


def _run(ap, a):
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.what == "memory":
        a.dtype = getattr(torch, a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32"))
        return bench_memory(a)
    if a.what == "model":
        seven = a.preset == "7b"
        a.image = a.image or (1008 if seven else 448)
        a.dtype = a.dtype or ("bfloat16" if seven else "float32")
        return bench_model(a)
    if a.samples or a.data:
        if not (a.samples and a.data and a.model):
            ap.error("sampled rollouts need --model, --data and --samples together")
        return bench_rollouts(a)
    return bench_cof(a)


if __name__ == "__main__":
    main()
