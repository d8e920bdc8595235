"""Generation: sampling, `generate`, and a fixed-shape decode step that torch.compile compiles once.

model.py ends at `Qwen25VL.extend`, the readable way to run any chunk (any length, any padding, images) on a
KV cache. This file builds generation on it, as gpt-fast keeps generate.py beside model.py
(`../shared/reference/style-anchors.md`):
  * `sample_next`: greedy, or temperature -> top-k -> top-p (transformers' warper order), then one uniform draw per
    row (inverse CDF);
  * `generate(model, ...)`: prefill + decode loop, transformers' `generate` semantics (eos list, pad after stop);
  * `step_graph`, compiled by `Decoder`: the decode step of `generate` and of cof.py's zoom loop, one text token per
    row, written so that its shapes do not depend on the data and the whole step (all layers, rotary, cache writes,
    the attention mask, the head) compiles into one graph with no host sync inside, with symbolic sizes: neither
    finished rows leaving the batch nor a growing cache recompile. On a CPU its one-row graph is rewritten first
    (`lower_for_cpu`); on a GPU it can be replayed as CUDA graphs (`Graphs`, opt-in). New turns (the environment's
    reply with a crop image) go through `extend`.
It gives `extend`'s greedy tokens, and its log-probs within ~1e-6 in fp32 (tests/test_decode.py); docs/details.md
has the step's layout and its numerics.
"""
from __future__ import annotations

import copy
import types
import warnings
import weakref

import torch
import torch.nn.functional as F

import checks
import model as M

KEY_BUCKET = 64   # the step reads a multiple of 64 cache slots: one key count per 64 decode steps, not one per step


def key_count(n_tokens: int) -> int:
    """The cache slots a step reads once the cache holds n_tokens (this step's token included)."""
    return -(-n_tokens // KEY_BUCKET) * KEY_BUCKET


def check_sampling(do_sample, temperature, top_p, top_k, generator=None):
    """The sampling arguments of sample_next / generate: do_sample a bool, temperature >= 0 (0: greedy), top_p in
    (0, 1], top_k a whole number >= 0 (0: off), generator a torch.Generator or None. TypeError / ValueError naming
    the argument (a negative temperature would sample the inverted distribution, NaN one token forever)."""
    checks.kind(do_sample, "do_sample", bool, "True or False")
    checks.number(temperature, "temperature", lo=0)
    checks.number(top_p, "top_p", lo=0, hi=1, lo_open=True)
    checks.number(top_k, "top_k", lo=0, whole=True)
    checks.kind(generator, "generator", torch.Generator, "a torch.Generator", none=True)


def sample_next(logits, do_sample=False, temperature=1.0, top_p=1.0, top_k=0, generator=None,
                checked=False) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. Greedy, or temperature -> top-k -> top-p (transformers' warper order), then
    inverse-CDF sampling: one uniform draw per row from `generator` (B random numbers, not multinomial's B x V).
    The arguments are checked (check_sampling) unless `checked`: the decode loops check them once per call, not once
    per token."""
    if not checked:
        check_sampling(do_sample, temperature, top_p, top_k, generator)
        checks.kind(logits, "logits", torch.Tensor, "a float tensor [B, V]")
        if logits.dim() != 2 or not logits.is_floating_point() or logits.shape[1] == 0:
            raise ValueError(f"logits must be a float tensor [B, V], got {logits.dtype} of shape {tuple(logits.shape)}")
    if not do_sample or temperature == 0:
        return logits.argmax(-1)
    x = logits.float() / temperature
    if top_k and top_k > 0:
        kth = torch.topk(x, min(top_k, x.shape[-1]), dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        s, idx = torch.sort(x, descending=True, dim=-1)
        cum = s.softmax(-1).cumsum(-1)
        drop = cum - s.softmax(-1) >= top_p                                   # keep the smallest set reaching top_p
        drop[..., 0] = False
        x = x.masked_fill(torch.zeros_like(drop).scatter(-1, idx, drop), float("-inf"))
    p = x.softmax(-1)                                                         # [B, V]
    # token i owns [cdf[i-1], cdf[i]), so a p = 0 token must own nothing; a parallel scan (CUDA's cumsum regroups the
    # additions) can still grow the total there by an ulp. Each p = 0 token takes the total before it (cummax is
    # exact); the CPU's sequential sum is left as it was.
    cdf = p.cumsum(-1).masked_fill(p == 0, 0).cummax(-1).values              # [B, V]
    u = torch.rand(p.shape[0], 1, generator=generator, device=p.device) * cdf[:, -1:]   # [B, 1]
    last = p.shape[-1] - 1 - (p > 0).flip(-1).int().argmax(-1)                # [B] a draw rounding up to the total
    return torch.minimum(torch.searchsorted(cdf, u, right=True).squeeze(-1), last)   # never lands on a p = 0 token


@torch.no_grad()
def generate(model, input_ids, pixel_values=None, image_grid_thw=None, attention_mask=None, max_new_tokens=64,
             do_sample=False, temperature=1.0, top_p=1.0, top_k=0, eos_token_id=None, pad_token_id=None,
             generator=None, compile=False, cuda_graphs=False) -> torch.Tensor:
    """Prefill + decode. Returns new tokens only, LongTensor [B, <=max_new_tokens]; rows that stopped are padded
    with the pad id after their stop token. eos_token_id: int or list; default generation_config.json's
    eos_token_id if the checkpoint has one (hub: [<|im_end|>, <|endoftext|>]), else config.json's. compile: decode
    through the compiled `Decoder` (default: `model.extend`); cuda_graphs: replay it as CUDA graphs (with compile)."""
    if cuda_graphs and not compile:
        raise ValueError("generate(cuda_graphs=True) replays the compiled decode step: pass compile=True as well")
    check_sampling(do_sample, temperature, top_p, top_k, generator)
    checks.number(max_new_tokens, "max_new_tokens", lo=1, whole=True)
    checks.kind(input_ids, "input_ids", torch.Tensor, "a LongTensor [B, T]")
    if input_ids.dim() != 2 or 0 in input_ids.shape:
        raise ValueError(f"input_ids must be [B, T] with B, T >= 1, got shape {tuple(input_ids.shape)}")
    M.check_token_ids(input_ids, model.cfg.text.vocab_size)       # once: the loop then feeds sampled tokens only
    B, T = input_ids.shape
    dev = model.device
    eos = model.generation_eos if eos_token_id is None else eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else checks.sequence(eos, "eos_token_id", empty=True))
    pad = pad_token_id if pad_token_id is not None else (
        model.generation_pad if model.generation_pad is not None else (eos[0] if eos else 0))
    for i in eos + [pad]:   # ids the loop compares sampled tokens with, or writes
        checks.number(i, "eos_token_id / pad_token_id", lo=0, hi=model.cfg.text.vocab_size, hi_open=True, whole=True)
    eos_t = torch.tensor(eos, dtype=torch.long, device=dev)
    step = decoder_for(model, cuda_graphs) if compile else None
    cache = model.new_cache(B, capacity=T + min(max_new_tokens, 4096))   # grows past that if the rows go on
    logits = model.extend(cache, input_ids, attention_mask, pixel_values, image_grid_thw, last_only=True)[:, 0]
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    out = []
    for i in range(max_new_tokens):
        nxt = sample_next(logits, do_sample, temperature, top_p, top_k, generator, checked=True)  # [B]
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        out.append(nxt)
        done = done | torch.isin(nxt, eos_t)
        n_done = int(done.sum())  # the one host sync per step
        if i == max_new_tokens - 1 or n_done == B:
            break
        live = None if n_done == 0 else ~done                                 # [B]
        if step is not None:
            logits = step(cache, nxt, live)                                   # [B, V]
        else:
            logits = model.extend(cache, nxt[:, None], None if live is None else live[:, None], last_only=True)[:, 0]
    return torch.stack(out, 1) if out else torch.zeros(B, 0, dtype=torch.long, device=dev)


# ---- The compiled decode step ----------------------------------------------------------------------------------

def step_graph(model, inv_freq, k, v, tokens, live, length, next_pos, last_hidden, n_keys: int):
    """One text token per cache row (eager; `Decoder` compiles it). inv_freq: model.text_inv_freq() (an input, so
    the graph does not compute it on the host); k/v: the cache's per-layer [B, KV, C, hd] tensors, written in place
    at slot length[b] of each row; tokens [B] long; live [B] bool (False: a padding row, its token not kept);
    length, next_pos [B] long; last_hidden [B, D]; n_keys <= C: the slots queries read (every length[b] < n_keys).
    Returns (logits [B, V] at each row's last real token, the new last_hidden [B, D])."""
    B = tokens.shape[0]
    x = model.model.embed_tokens(tokens[:, None])                             # [B, 1, D]
    pos = next_pos[None, :, None].expand(3, B, 1)                             # [3, B, 1] text: t = h = w
    cos, sin = model._text_rope(pos, x.dtype, inv_freq)                       # [B, 1, 1, hd]
    keys = torch.arange(n_keys, device=tokens.device)                         # [n_keys]
    mask = (keys[None, :] <= length[:, None])[:, None, None]                  # [B, 1, 1, n_keys] its tokens + this one
    slots = length[:, None]                                                   # [B, 1] where this token goes
    for i, layer in enumerate(model.model.layers):
        x = layer(x, cos, sin, mask, (k[i], v[i], slots, n_keys))             # [B, 1, D]
    h = model.model.norm(x)[:, 0]                                             # [B, D]
    last = torch.where(live[:, None], h, last_hidden)                         # [B, D] padding rows keep theirs
    return model._lm_head(last), last                                         # [B, V], [B, D]


class Decoder:
    """`decoder(cache, tokens, live)` == `model.extend(cache, tokens[:, None], live[:, None], last_only=True)[:, 0]`
    for one token per row, through `step_graph`: compiled on first use when `compile` (falling back to eager, with a
    warning, where torch.compile is unavailable or fails), replayed as CUDA graphs when `cuda_graphs` (a CUDA model
    only; without them, with a warning, where recording fails). Use `decoder_for(model)` to share one compiled step."""

    def __init__(self, model, compile: bool = True, cuda_graphs: bool = False):
        self.model = weakref.ref(model)   # not a strong reference: decoder_for keeps one Decoder per live model
        self.fn, self.compiled, self.compiles, self.lowered = step_graph, False, 0, 0
        self.graphs = _graphs(model) if cuda_graphs else None
        if compile:
            try:   # its own copy of the function: dynamo keeps compiled graphs per code object, at most 8, so each
                   # model's graphs live (and die) with its Decoder instead of crowding out the next model's
                fn = types.FunctionType(step_graph.__code__.replace(), step_graph.__globals__, "step_graph")
                self.fn = torch.compile(fn, backend=self._backend, dynamic=True, fullgraph=True)
                self.compiled = True
            except Exception as e:  # e.g. a Python version dynamo does not support yet
                warnings.warn(f"torch.compile is unavailable ({type(e).__name__}: {e}); decoding eagerly")

    def replaying(self) -> "Decoder":
        """A Decoder that runs this one's compiled step through CUDA graphs: one compilation serves both."""
        twin = copy.copy(self)
        twin.graphs = _graphs(self.model())
        return twin

    def _backend(self, gm, example_inputs):
        self.compiles += 1   # dynamo calls the backend once per graph it compiles
        self.lowered += lower_for_cpu(gm)
        return torch._dynamo.lookup_backend("inductor")(gm, example_inputs)

    def __call__(self, cache: M.KVCache, tokens, live=None):
        """tokens [B] long, one per cache row; live [B] bool, or None: every row's token is real. -> logits [B, V]."""
        if tokens.shape != (cache.batch_size,):
            raise ValueError(f"a decode step takes one token per cache row: got shape {tuple(tokens.shape)}, "
                             f"the cache has {cache.batch_size} rows")
        all_live = live is None
        live = torch.ones_like(tokens, dtype=torch.bool) if all_live else live
        n_keys = key_count(cache.size + 1)
        cache.reserve(n_keys + 1 - cache.size)   # capacity > n_keys: a read never spans the whole cache (which
                                                 # torch would compile as a second graph)
        model = self.model()
        args = (model, model.text_inv_freq(), cache.k, cache.v, tokens, live, cache.length, cache.next_pos,
                cache.last_hidden, n_keys)
        logits, last = self._replay(cache, args) if self.graphs is not None else self._run(*args)
        cache.record_step(live, all_live, last)
        return logits

    def _run(self, *args):
        try:
            with torch._dynamo.config.patch(**_NO_SYMBOLIC_FLOATS):
                return self.fn(*args)
        except Exception as e:   # failing mid-step is harmless: the eager rerun writes the same slots again
            if not self.compiled:
                raise
            warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e)[:300]}); decoding eagerly")
            self.fn, self.compiled = step_graph, False
            return self.fn(*args)

    def _replay(self, cache, args):
        try:
            return self.graphs(self._run, cache, args)
        except Exception as e:   # a step recorded or replayed halfway only rewrote the slots the rerun writes
            warnings.warn(f"CUDA graphs failed ({type(e).__name__}: {str(e)[:300]}); decoding without them")
            self.graphs = None
            return self._run(*args)


# ---- CUDA graphs of the step ------------------------------------------------------------------------------------
# Compiled, a decode step is still a few hundred kernel launches issued one by one by Python (inductor's wrapper,
# dynamo's guards): at 7B on a GPU that host time is of the order of the step's own ~4 ms of weight reads. A CUDA
# graph records the launches once and replays them with one call, as gpt-fast's torch.compile(mode="reduce-overhead")
# does; it is written out here because our cache is an argument of the step, not a module buffer. A graph reads and
# writes fixed addresses, so everything the step reads is copied into buffers of its own before each replay, except
# the cache's key/value tensors, which it writes in place: a graph is valid only for the tensors it was recorded on,
# and a cache whose tensors were replaced (a new cache, rows compacted by `select`, a `reserve` that grew it) drops
# every graph and records again.

def record_cuda(run, pool):
    """Record run() as a CUDA graph -> (replay, outputs): replay() reruns the recorded kernels, refilling outputs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):   # one run outside the graph: compiles, and lets cuBLAS / inductor set themselves up
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = run()
    return graph.replay, out


def _graphs(model):
    if model.device.type == "cuda":
        return Graphs()
    warnings.warn(f"CUDA graphs need a model on a CUDA device, this one is on {model.device}: decoding without them")
    return None


class Graphs:
    """One recorded step per key count n_keys (a new one every KEY_BUCKET steps), for the tensors they were recorded
    on. `record` is `record_cuda`; tests give it a CPU stand-in with the same contract."""

    def __init__(self, record=record_cuda):
        self.record, self.records = record, 0
        self.cache, self.weights = (lambda: None), ()   # the last cache seen (weakly), and where the weights were then
        self.on, self.steps, self.pool = None, {}, None

    def __call__(self, run, cache, args):
        """run(*args) -> (logits, last_hidden) for a step on `cache`, replayed from the graph recorded for its tensors
        and n_keys (recorded first if there is none)."""
        model, inv_freq, k, v, *inputs, n_keys = args  # inputs: tokens, live, length, next_pos, last_hidden
        if cache is not self.cache():                  # a new generation: the weights may have moved (`.to`, a load)
            self.cache, self.weights = weakref.ref(cache), tuple(p.data_ptr() for p in model.parameters())
        on = (self.weights, k[0].shape, k[0].dtype, tuple(t.data_ptr() for t in k + v))
        if on != self.on:   # not the tensors the graphs were recorded on (a new cache may well be: same memory)
            self.on, self.steps = on, {}
            self.pool = torch.cuda.graph_pool_handle() if k[0].is_cuda else None   # the old pool goes with its graphs
        if n_keys not in self.steps:
            mine = [t.clone() for t in inputs]          # the graph's own input buffers
            replay, out = self.record(lambda: run(model, inv_freq, k, v, *mine, n_keys), self.pool)
            self.steps[n_keys], self.records = (replay, mine, out), self.records + 1
        replay, mine, out = self.steps[n_keys]
        for buf, t in zip(mine, inputs):
            buf.copy_(t)
        replay()
        return tuple(t.clone() for t in out)   # the next replay refills out (the graphs share one memory pool)


# ---- CPU lowering of the traced step ---------------------------------------------------------------------------
# Decoding one token reads every weight once, so on a CPU the step is as fast as its matrix-vector products read
# memory. MKL's sgemm at M = 1 (what F.linear calls) reads this machine's weights at ~13 GB/s; the same product
# written as a broadcast multiply and a sum over the input dimension, which inductor compiles into one vectorised
# pass over the weight, reads them at ~25 GB/s (a plain sum over the same bytes: ~19-25). The step's attention (one
# query per head against n_keys cached slots under a boolean mask) is likewise faster as three plain ops than
# through the CPU flash kernel of scaled_dot_product_attention (~120 us a layer at 640 keys). Both only pay for one
# row: from two rows up MKL's products are the faster (measured at 8 rows), and at GRPO's 512 rows the flash kernel
# is (whole rollouts 2.3x the eager loop with it, 2.1x without). torch compiles a batch of one row as a graph of its
# own, so that graph alone is rewritten, on the traced graph before inductor sees it: model.py stays the one
# definition of a layer.

def _matvec(x, w, b=None):
    """F.linear(x, w, b) for x [1, ..., 1, K], w [N, K]: a multiply and a sum over K, fused by inductor."""
    y = (x.unsqueeze(-2) * w).sum(-1)                                         # [1, ..., 1, N]
    return y if b is None else y + b


def _attend(q, k, v, attn_mask, scale):
    """scaled_dot_product_attention(q, k, v, attn_mask=<bool>, scale=scale) as plain ops: q [B, KV, G, hd],
    k/v [B, KV, S, hd], attn_mask [B, 1, 1, S] (True: attend; every query attends at least its own slot)."""
    s = (q @ k.transpose(-1, -2)) * scale                                     # [B, KV, G, S]
    return s.masked_fill(~attn_mask, float("-inf")).softmax(-1) @ v          # [B, KV, G, hd]


def _traced(arg):
    """The example tensor dynamo recorded for a graph argument, or None (a constant, or no record)."""
    return arg.meta.get("example_value") if isinstance(arg, torch.fx.Node) else None


def lower_for_cpu(gm) -> int:
    """Rewrite a traced CPU decode step in place (see above); returns the number of calls rewritten."""
    def one(sizes):   # sizes that are all a static 1 (a symbolic batch size is not)
        return all(type(d) is int and d == 1 for d in sizes)

    n = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (F.linear, F.scaled_dot_product_attention):
            continue
        x = _traced(node.args[0])                                            # linear's input, or q [B, KV, G, hd]
        if x is None or x.device.type != "cpu":
            continue
        if node.target is F.linear and one(x.shape[:-1]):
            node.target, n = _matvec, n + 1
        elif (node.target is F.scaled_dot_product_attention and one(x.shape[:1]) and len(node.args) == 3
              and set(node.kwargs) == {"attn_mask", "scale"}
              and getattr(_traced(node.kwargs["attn_mask"]), "dtype", None) == torch.bool):
            node.target, n = _attend, n + 1
    if n:
        gm.recompile()
    return n


# The model's float constants (rope theta, norm eps, attention scale) stay constants: with dynamic=True, dynamo would
# first trace them as symbols, find they cannot be, and compile everything a second time.
_NO_SYMBOLIC_FLOATS = dict(specialize_float=True) if hasattr(torch._dynamo.config, "specialize_float") else {}
_DECODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def decoder_for(model, cuda_graphs: bool = False) -> Decoder:
    """The model's compiled Decoder (with or without CUDA graphs), made on first use and kept for as long as the model
    lives: a compiled step is reused by every call (the rollouts of every GRPO step) instead of compiled again."""
    mine = _DECODERS.setdefault(model, {})
    if False not in mine:
        mine[False] = Decoder(model)
    if cuda_graphs and True not in mine:
        mine[True] = mine[False].replaying()
    return mine[cuda_graphs]
