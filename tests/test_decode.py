"""decode.py: the sampler against the distribution it samples, the decode step (eager and compiled) against
`Qwen25VL.extend`, generate and the CoF loop with the compiled step against the eager loop (greedy and sampled,
multi-turn with crops, ragged rows, G > 1), recompiles counted, and the fallback where torch.compile is missing."""
import copy
import types
import warnings

import pytest
import torch

import bench
import cof
import decode
import model as M
from cof_fixtures import call, img
from data.tiny import make_tiny
import tokenizer as T

TOL = 1e-5   # fp32 logits / log-probs, compiled or take/put path vs the plain extend path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = make_tiny(str(tmp_path_factory.mktemp("tiny_decode")))
    return M.Qwen25VL.from_pretrained(d).eval(), T.Tokenizer.from_pretrained(d)


def compiled(model):
    """The shared compiled Decoder; skips the test where this machine cannot compile (it decodes eagerly then)."""
    d = decode.decoder_for(model)
    if not d.compiled:
        pytest.skip("torch.compile is unavailable here: the Decoder fell back to eager")
    return d


def prompt_cache(model, rows=(7, 3, 5), seed=0):
    """A cache after a ragged (padded) prefill of random text rows; returns (cache, logits [B, V])."""
    g = torch.Generator().manual_seed(seed)
    L = max(rows)
    ids = torch.randint(10, 200, (len(rows), L), generator=g)
    mask = torch.arange(L)[None, :] < torch.tensor(rows)[:, None]
    cache = model.new_cache(len(rows))
    with torch.no_grad():
        logits = model.extend(cache, ids, mask=mask, last_only=True)[:, 0]
    return cache, logits


def test_sampler_draws_the_softmax_distribution_and_never_a_zero_probability_token(monkeypatch):
    logits = torch.tensor([[0.0, 1.0, float("-inf"), 2.0, -1.0, float("-inf")],
                           [3.0, float("-inf"), 0.5, 0.5, 0.0, 1.0]])
    p = logits.softmax(-1)
    g = torch.Generator().manual_seed(0)
    n = 40000
    draws = decode.sample_next(logits.repeat(n, 1), True, generator=g).view(n, 2)              # [n, 2]
    freq = torch.stack([torch.bincount(draws[:, r], minlength=6) for r in range(2)]).float() / n
    sigma = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 5 * sigma + 1e-9).all(), (freq, p)
    assert freq[0, 2] == freq[0, 5] == freq[1, 1] == 0
    # a draw that rounds up to the total lands on the last token with p > 0, not on a banned tail token
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.ones(a[0], a[1]))
    assert decode.sample_next(logits, True).tolist() == [4, 5]
    # a scan that sums in another order (CUDA's) can give a p = 0 token a sliver of the total: it still gets no draw
    row = torch.tensor([[0.0, float("-inf"), 0.0]])                                           # p = [0.5, 0, 0.5]
    scan = torch.Tensor.cumsum
    monkeypatch.setattr(torch.Tensor, "cumsum", lambda t, dim: scan(t, dim) + torch.tensor([0.0, 6e-8, 0.0]))
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.full((a[0], a[1]), 0.5))      # u = 0.5: the boundary
    assert decode.sample_next(row, True).tolist() == [2]


def test_decode_step_equals_extend_with_padding_rows(tiny):
    """The step (eager and compiled) gives extend's logits and cache state, step after step, with ragged prompts
    and some rows padding (finished) in some steps."""
    model, _ = tiny
    ref, logits = prompt_cache(model)
    steps = {"eager": decode.Decoder(model, compile=False), "compiled": compiled(model)}
    caches = {k: prompt_cache(model)[0] for k in steps}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i in range(6):
            tokens = torch.randint(10, 200, (3,), generator=g)
            live = None if i < 2 else torch.tensor([True, i % 2 == 0, True])
            want = model.extend(ref, tokens[:, None], None if live is None else live[:, None], last_only=True)[:, 0]
            for name, step in steps.items():
                got = step(caches[name], tokens, live)
                assert (got - want).abs().max() < TOL, (name, i)
                assert torch.equal(caches[name].length, ref.length) and torch.equal(caches[name].next_pos, ref.next_pos)
                assert caches[name].size == ref.size


def test_one_row_graph_is_lowered_to_fused_products_and_still_equals_extend(tiny):
    """A batch of one row compiles its own graph, where every linear and the attention are rewritten
    (decode.lower_for_cpu); it still gives extend's logits step after step. A graph of several rows is not
    rewritten."""
    model, _ = tiny
    d = decode.Decoder(model)        # its own Decoder: count the rewrites of exactly the graphs compiled here
    if not d.compiled:
        pytest.skip("torch.compile is unavailable here: the Decoder fell back to eager")
    ref, cache = prompt_cache(model, rows=(6,))[0], prompt_cache(model, rows=(6,))[0]
    layers = model.cfg.text.num_hidden_layers
    with torch.no_grad():
        for i, t in enumerate([11, 12, 13, 14]):
            want = model.extend(ref, torch.tensor([[t]]), last_only=True)[:, 0]
            got = d(cache, torch.tensor([t]))
            assert (got - want).abs().max() < TOL, i
        assert (d.compiles, d.lowered) == (1, 7 * layers + 1 + layers)   # q k v o gate up down per layer, the head,
        d(prompt_cache(model)[0], torch.tensor([11, 12, 13]))            # and one attention per layer
    assert (d.compiles, d.lowered) == (2, 7 * layers + 1 + layers)


def test_take_and_put_equal_extending_the_whole_cache(tiny):
    model, _ = tiny
    ref, _ = prompt_cache(model)
    cache, _ = prompt_cache(model)
    chunk = torch.randint(10, 200, (3, 4), generator=torch.Generator().manual_seed(2))
    rows = torch.tensor([0, 2])
    with torch.no_grad():
        want = model.extend(ref, chunk, mask=torch.tensor([[True] * 4, [False] * 4, [True, True, False, False]]),
                            last_only=True)[:, 0]
        part = cache.take(rows)
        got = model.extend(part, chunk[rows], mask=torch.tensor([[True] * 4, [True, True, False, False]]),
                           last_only=True)[:, 0]
        cache.put(rows, part)
        assert (got - want[rows]).abs().max() < TOL
        assert torch.equal(cache.length, ref.length) and torch.equal(cache.next_pos, ref.next_pos)
        nxt = torch.tensor([5, 6, 7])     # the next token of every row sees the same keys either way
        a = model.extend(ref, nxt[:, None], last_only=True)[:, 0]
        b = model.extend(cache, nxt[:, None], last_only=True)[:, 0]
        assert (a - b).abs().max() < TOL


def test_generate_compiled_equals_eager_with_rows_stopping_early(tiny):
    model, tok = tiny
    compiled(model)
    ids = torch.randint(10, 200, (4, 9), generator=torch.Generator().manual_seed(3))
    free = decode.generate(model, ids, max_new_tokens=12, eos_token_id=[])
    eos = [free[0, 3].item(), free[2, 6].item()]          # rows stop at different steps
    for kw in (dict(eos_token_id=[]), dict(eos_token_id=eos, pad_token_id=0)):
        eager = decode.generate(model, ids, max_new_tokens=12, **kw)
        fast = decode.generate(model, ids, max_new_tokens=12, compile=True, **kw)
        assert torch.equal(eager, fast)


ZOOMS = [["<think>look</think> " + call("[10, 10, 60, 50]"), call("[30, 20, 90, 80]")],
         [call("[0, 0, 200, 30]")],
         []]
IMAGES = [img(140, 168, 1), img(112, 224, 2), img(168, 112, 3)]
QUESTIONS = ["What is the colour of the cup?\n(A) red\n(B) blue", "Where?", "Which?"]


def both(model, tok, cfg, group_size=1, seed=None, prefixes=ZOOMS, images=IMAGES, questions=QUESTIONS):
    """The same CoF batch through the eager loop and the compiled one (same generator seed when sampling)."""
    out = []
    for comp in (False, True):
        g = None if seed is None else torch.Generator().manual_seed(seed)
        out.append(cof.run(model, tok, images, questions, cof.CofConfig(**{**cfg, "compile": comp}),
                           group_size=group_size, generator=g,
                           logits_processor=bench.force_prefixes(tok, prefixes, group_size)))
    return out


def assert_same(eager, fast):
    assert len(eager) == len(fast)
    for a, b in zip(eager, fast):
        assert a.ids == b.ids and a.gen_mask == b.gen_mask and a.n_zooms == b.n_zooms
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < TOL


def test_cof_loop_compiled_equals_eager_greedy_multi_turn(tiny):
    model, tok = tiny
    compiled(model)
    eager, fast = both(model, tok, dict(max_new_tokens=24, max_turns=3))
    assert [t.n_zooms for t in eager] == [2, 1, 0]                      # crops in two rows, none in the third
    assert len({len(t.ids) for t in eager}) == 3                        # ragged rows
    assert_same(eager, fast)


def test_cof_loop_compiled_equals_eager_sampled_groups(tiny):
    model, tok = tiny
    compiled(model)
    eager, fast = both(model, tok, dict(do_sample=True, max_new_tokens=16, max_turns=3), group_size=4, seed=5)
    assert len({tuple(t.ids) for t in eager[:4]}) > 1                   # the G samples differ
    assert len({sum(t.gen_mask) for t in eager}) > 2                    # and finish at different lengths
    assert_same(eager, fast)


def test_no_recompile_after_warm_up(tiny):
    """One warm-up batch (which reaches a single live row), then three more turns of other lengths, other images,
    other batch sizes: the compiled step is not compiled again."""
    model, tok = tiny
    d = compiled(model)
    cfg = dict(max_new_tokens=64, max_turns=4)
    both(model, tok, cfg, prefixes=[[call("[0, 0, 50, 50]")], []], images=IMAGES[:2], questions=QUESTIONS[:2])
    warm = d.compiles
    if not d.compiled:
        pytest.skip("torch.compile failed here: the Decoder fell back to eager")
    assert warm >= 1
    eager, fast = both(model, tok, cfg, group_size=2, seed=None,
                       prefixes=[[call("[5, 5, 150, 100]"), call("[0, 0, 30, 90]"), "x" * 3 + call("[1, 1, 80, 80]")],
                                 ["a longer first turn " * 3 + call("[20, 20, 60, 60]")]],
                       images=[img(200, 120, 7), img(120, 260, 8)], questions=["q", "a longer question " * 4])
    assert [t.n_zooms for t in eager[::2]] == [3, 1]
    assert_same(eager, fast)
    assert d.compiles == warm


def test_falls_back_to_eager_where_compile_is_missing_or_fails(tiny, monkeypatch):
    model, _ = tiny
    cache, _ = prompt_cache(model)
    ref, _ = prompt_cache(model)
    tokens = torch.tensor([11, 12, 13])
    with torch.no_grad():
        want = model.extend(ref, tokens[:, None], last_only=True)[:, 0]

    def missing(*a, **k):
        raise RuntimeError("Dynamo is not supported on this Python")
    with monkeypatch.context() as mp:
        mp.setattr(torch, "compile", missing)
        with pytest.warns(UserWarning, match="torch.compile is unavailable"):
            d = decode.Decoder(model)
    assert not d.compiled

    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler")
    failing = decode.Decoder(model)
    failing._backend = broken
    failing.fn = torch.compile(decode.step_graph, backend=broken, dynamic=True, fullgraph=True)
    with torch.no_grad(), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = failing(cache, tokens)
    assert any("torch.compile failed" in str(x.message) for x in w) and not failing.compiled
    assert (got - want).abs().max() < TOL and torch.equal(cache.length, ref.length)


def test_the_traced_step_makes_its_tensors_on_the_cache_device(tiny):
    """Every tensor the traced decode step creates is made on the device it runs on, and nothing is copied to it:
    a table computed on the host inside the step (the rotary frequencies once were) would on CUDA mean a host
    sync in every step, and a copy a CUDA graph cannot record."""
    model, _ = tiny
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    d = decode.Decoder(model, compile=False)
    fresh = types.FunctionType(decode.step_graph.__code__.replace(), decode.step_graph.__globals__, "step_graph")
    d.fn = torch.compile(fresh, backend=keep, dynamic=True, fullgraph=True)
    cache, logits = prompt_cache(model)
    with torch.no_grad():
        want = copy.deepcopy(model).extend(copy.deepcopy(cache), logits.argmax(-1)[:, None], last_only=True)[:, 0]
        got = d(cache, logits.argmax(-1))
    assert (got - want).abs().max() < TOL and len(graphs) == 1
    nodes = list(graphs[0].graph.nodes)
    made = [n for n in nodes if n.op == "call_function" and n.target in (torch.arange, torch.zeros, torch.ones,
                                                                          torch.full, torch.empty, torch.tensor)]
    assert made and all(n.kwargs.get("device") is not None for n in made), [n.format_node() for n in made]
    moved = [n for n in nodes if n.op == "call_method" and n.target == "to"
             and any(isinstance(a, (torch.device, str)) for a in [*n.args[1:], *n.kwargs.values()])]
    assert not moved, [n.format_node() for n in moved]


def test_every_model_in_a_process_gets_its_own_compiled_step(tmp_path):
    """dynamo keeps at most 8 compiled graphs per code object; nine models in one process (say, an evaluation of nine
    checkpoints) must still each decode compiled, not fall back to eager."""
    d = make_tiny(str(tmp_path / "m"))
    ids = torch.randint(10, 200, (2, 6), generator=torch.Generator().manual_seed(4))
    for i in range(9):
        model = M.Qwen25VL.from_pretrained(d).eval()
        want = decode.generate(model, ids, max_new_tokens=3, eos_token_id=[])
        got = decode.generate(model, ids, max_new_tokens=3, eos_token_id=[], compile=True)
        if i == 0 and not decode.decoder_for(model).compiled:
            pytest.skip("torch.compile is unavailable here: the Decoder fell back to eager")
        assert torch.equal(got, want) and decode.decoder_for(model).compiled, f"model {i}"


# ---- CUDA graphs: the bookkeeping, checked on the CPU with a stand-in recorder ------------------------------------

def replaying_stand_in(run, pool):
    """A CPU stand-in for decode.record_cuda with its contract: the outputs are buffers that every replay refills,
    computed from whatever the recorded input buffers and cache tensors hold at replay time (a graph that missed a
    new input, or ran on a cache it was not recorded for, gives wrong tokens here as it would on a GPU)."""
    out = run()

    def replay():
        for buf, new in zip(out, run()):
            buf.copy_(new)
    return replay, out


def stand_in_graphs(decoder):
    decoder.graphs = decode.Graphs(record=replaying_stand_in)
    return decoder.graphs


def test_graphs_replay_the_compiled_step_through_the_zoom_loop(tiny):
    """The CoF loop with cuda_graphs (stand-in recorder): the compiled loop's tokens and log-probs, greedy multi-turn
    with crops and ragged rows, and sampled groups whose rows finish (compaction replaces the cache tensors)."""
    model, tok = tiny
    d = compiled(model)
    with pytest.warns(UserWarning, match="CUDA graphs need a model on a CUDA device"):
        twin = decode.decoder_for(model, cuda_graphs=True)
    assert twin is not d and twin.fn is d.fn and twin.graphs is None          # one compilation; CPU: no graphs
    graphs = stand_in_graphs(twin)
    for cfg, g, seed in ((dict(max_new_tokens=24, max_turns=3), 1, None),
                         (dict(do_sample=True, max_new_tokens=16, max_turns=3), 4, 5)):
        fast, graphed = [cof.run(model, tok, IMAGES, QUESTIONS, cof.CofConfig(**cfg, compile=True, cuda_graphs=cg),
                                 group_size=g, generator=None if seed is None else torch.Generator().manual_seed(seed),
                                 logits_processor=bench.force_prefixes(tok, ZOOMS, g)) for cg in (False, True)]
        assert [t.n_zooms for t in fast[::g]] == [2, 1, 0] and len({len(t.ids) for t in fast}) > 2
        assert_same(fast, graphed)
    ids = torch.randint(10, 200, (4, 9), generator=torch.Generator().manual_seed(3))
    eos = decode.generate(model, ids, max_new_tokens=12, eos_token_id=[])[[0, 2], [3, 6]].tolist()   # rows stop early
    assert torch.equal(decode.generate(model, ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=0),
                       decode.generate(model, ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=0, compile=True,
                                       cuda_graphs=True))
    assert graphs.records >= 4 and twin.graphs is graphs                      # recorded, and never switched off


def test_graphs_record_again_only_for_other_tensors_or_key_counts(tiny):
    model, _ = tiny
    d = decode.Decoder(model, compile=False)
    graphs = stand_in_graphs(d)
    cache, logits = prompt_cache(model)
    ref, _ = prompt_cache(model)

    def step(live=None):
        nonlocal logits
        tokens = logits.argmax(-1)
        logits = d(cache, tokens, live)
        want = model.extend(ref, tokens[:, None], None if live is None else live[:, None], last_only=True)[:, 0]
        assert (logits - want).abs().max() < TOL and torch.equal(cache.length, ref.length)

    with torch.no_grad():
        step()
        step(torch.tensor([True, False, True]))                               # a padding row: same graph, new inputs
        assert graphs.records == 1
        for _ in range(decode.KEY_BUCKET):                                    # into the next key count
            step()
        assert graphs.records == 2
        for rows, records in (([2, 0, 1], 3), ([2, 0], 4)):                    # rows reordered, then compacted: new
            cache.select(rows)                                                # tensors (of the same shape, first)
            ref.select(rows)
            logits = logits[rows]
            step()
            assert graphs.records == records
        cache, logits = prompt_cache(model)                                   # a new cache of the same shape (other
        ref, _ = prompt_cache(model)                                          # memory: the old one was alive)
        step()
        assert graphs.records == 5
        cache = copy.copy(cache)                                              # a new generation on the same tensors
        step()
        assert graphs.records == 5
        w = model.model.norm.weight
        try:
            model.model.norm.weight = torch.nn.Parameter(w.detach().clone())  # replaced, not updated in place
            cache = copy.copy(cache)
            step()
            assert graphs.records == 6
        finally:
            model.model.norm.weight = w


def test_cuda_graphs_need_compile_and_a_cuda_model(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="set compile=true"):
        cof.CofConfig(cuda_graphs=True)
    with pytest.raises(ValueError, match="pass compile=True"):
        decode.generate(model, torch.tensor([[11, 12]]), max_new_tokens=2, cuda_graphs=True)
    with pytest.warns(UserWarning, match="on cpu: decoding without them"):
        d = decode.Decoder(model, compile=False, cuda_graphs=True)
    assert d.graphs is None
    cache, logits = prompt_cache(model)
    ref, _ = prompt_cache(model)
    with torch.no_grad():
        got = d(cache, logits.argmax(-1))
        want = model.extend(ref, logits.argmax(-1)[:, None], last_only=True)[:, 0]
    assert (got - want).abs().max() < TOL


def test_a_failed_recording_warns_and_decodes_without_graphs(tiny):
    """Recording that fails (here: the real recorder on a machine without CUDA, and one that fails after its warm-up
    run has written the step's cache slots) falls back to the plain step with a warning: same logits, same cache."""
    model, _ = tiny

    def fails_after_warm_up(run, pool):
        run()
        raise RuntimeError("operation not permitted when stream is capturing")

    for record in (decode.record_cuda, fails_after_warm_up):
        d = decode.Decoder(model, compile=False)
        d.graphs = decode.Graphs(record=record)
        cache, logits = prompt_cache(model)
        ref, _ = prompt_cache(model)
        tokens = logits.argmax(-1)
        with torch.no_grad(), pytest.warns(UserWarning, match="CUDA graphs failed"):
            got = d(cache, tokens)
        with torch.no_grad():
            want = model.extend(ref, tokens[:, None], last_only=True)[:, 0]
            assert d.graphs is None and (got - want).abs().max() < TOL and torch.equal(cache.length, ref.length)
            tokens = got.argmax(-1)
            got, want = d(cache, tokens), model.extend(ref, tokens[:, None], last_only=True)[:, 0]
        assert (got - want).abs().max() < TOL
