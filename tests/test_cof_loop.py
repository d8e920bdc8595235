"""The CoF loop end to end: a scripted stand-in model (emits given texts through model.py's cache interface) checks the
turn layout token by token against tokenizer.tokenize_chat of the whole conversation, the zoom limit, fallbacks, batching
and grouping; the batched loop (cof.run) gives each conversation what the spec loop (cof.reference_run: one
conversation, the whole chat encoded again every turn) gives it, on scripted texts and on a tiny random Qwen2.5-VL
(data.tiny.make_tiny) that runs the real cache path on the CPU, batched with zooms and bad tool calls."""
import os

import pytest
import torch

import bench
import cof
import crop_kernels as ck
import model as M
from cof_fixtures import ScriptedModel, call, img
from data.tiny import make_tiny
import tokenizer as T


DEV = os.environ.get("COF_TEST_DEVICE", "cpu")   # COF_TEST_DEVICE=cuda runs the tiny-model tests on a GPU


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = make_tiny(str(tmp_path_factory.mktemp("tiny_cof")))
    return M.Qwen25VL.from_pretrained(d, device=DEV).eval(), T.Tokenizer.from_pretrained(d)


def reference_ids(tok, question, texts, grids, env=None):
    """tokenize_chat of the equivalent whole conversation (the chat template, one string), without the final '\\n'."""
    msgs = cof.build_messages(question)
    for k, t in enumerate(texts):
        msgs.append({"role": "assistant", "content": t})
        if k < len(texts) - 1:
            msgs.append(env[k] if env else cof.zoom_message())
    ids, amask = T.tokenize_chat(tok, msgs, image_grid_thw=grids)
    assert ids[-1] == tok.encode("\n")[0]
    return ids[:-1], amask[:-1]


Q = "What is the colour of the cup?\n(A) red\n(B) blue\nAnswer with the option's letter from the given choices directly."


def test_turn_layout_matches_whole_conversation(tiny):
    _, tok = tiny
    texts = ["<think>The cup is small.</think> " + call("[20, 30, 60, 70]"),
             "<think>Closer.</think> " + call("[40, 40, 100, 90]"),
             "<think>It is red.</think> <answer>A</answer>"]
    sm = ScriptedModel(tok, [texts])
    main = img(168, 224)
    tr = cof.run(sm, tok, [main], [Q], cof.CofConfig(keep_images=True))[0]
    ids, amask = reference_ids(tok, Q, texts, tr.image_grid_thw)
    assert tr.ids == ids
    assert tr.gen_mask == amask                               # generated = assistant content + its <|im_end|>
    assert tr.prompt_len == len(T.tokenize_chat(tok, cof.build_messages(Q), tr.image_grid_thw[:1],
                                                add_generation_prompt=True)[0])
    assert [t["text"] for t in tr.turns] == texts and tr.answer == "A" and tr.finished and tr.n_zooms == 2
    # crop sizes: box enlarged x1.5, then x2 + smart_resize; taken from the resized main image each time
    assert tr.main_size == (168, 224)
    for k, box in enumerate([(10, 20, 70, 80), (25, 27, 115, 102)]):
        assert tuple(tr.turns[k]["box"]) == box
        h, w = cof.zoom_size(box)
        assert tr.image_grid_thw[k + 1].tolist() == [1, h // 14, w // 14]
        ref = ck.resize(ck.crop(main, box), (h, w), "lanczos")
        assert torch.equal(tr.images[k + 1], ref)
        assert torch.equal(tr.pixel_values[sum(int(g.prod()) for g in tr.image_grid_thw[:k + 1]):][:h * w // 196],
                           ck.patchify(ref)[0])


def test_model_sees_exactly_the_trajectory(tiny):
    _, tok = tiny
    texts = [call("[0, 0, 50, 50]"), "<answer>B</answer>"]
    sm = ScriptedModel(tok, [texts])
    seen = {}
    orig_new = sm.new_cache

    def spy(n):
        seen["cache"] = orig_new(n)
        return seen["cache"]
    sm.new_cache = spy
    tr = cof.run(sm, tok, [img(112, 112)], [Q])[0]
    assert seen["cache"].rows[0] == tr.ids[:-1]               # everything but the final <|im_end|>
    assert torch.equal(torch.cat(seen["cache"].images[0]), tr.pixel_values)


def test_zoom_limit_and_unexecuted_last_call(tiny):
    _, tok = tiny
    texts = [call(f"[{i}, {i}, {i + 30}, {i + 30}]") for i in range(10)]
    sm = ScriptedModel(tok, [texts])
    tr = cof.run(sm, tok, [img(140, 140)], [Q])[0]
    assert len(tr.turns) == 6 and tr.n_zooms == 6 and not tr.finished and tr.answer == ""
    assert tr.image_grid_thw.shape[0] == 6                   # main image + 5 crops: the 6th call is never executed
    assert tr.turns[-1]["status"] == "limit"
    tr = cof.run(sm, tok, [img(140, 140)], [Q], cof.CofConfig(max_turns=2))[0]
    assert len(tr.turns) == 2 and tr.image_grid_thw.shape[0] == 2


def test_max_new_tokens_cut_closes_the_turn(tiny):
    _, tok = tiny
    long = "<think>" + "very " * 40 + "</think> " + call("[0, 0, 50, 50]")
    sm = ScriptedModel(tok, [[long, "<answer>A</answer>"]])
    tr = cof.run(sm, tok, [img(112, 112)], [Q], cof.CofConfig(max_new_tokens=10))[0]
    t0 = tr.turns[0]
    assert t0["stop"] == "length" and t0["n_tokens"] == 10 and not t0["tool_call"]
    assert len(tr.turns) == 1 and tr.answer == "" and tr.finished
    # a cut turn that holds a tool call: the environment closes it with <|im_end|> (not a model token)
    short_call = "<tool_call>" + "x" * 60
    sm = ScriptedModel(tok, [[short_call, "<answer>A</answer>"]])
    tr = cof.run(sm, tok, [img(112, 112)], [Q], cof.CofConfig(max_new_tokens=3))[0]
    assert tr.turns[0]["stop"] == "length" and tr.turns[0]["status"] == "none"
    p = tr.prompt_len
    assert tr.gen_mask[p:p + 3] == [True] * 3 and tr.ids[p + 3] == tok.im_end_id and not tr.gen_mask[p + 3]
    assert len(tr.turns) == 2 and tr.turns[1]["text"] == tok.decode(tok.encode("<answer>A</answer>")[:3])


def test_invalid_box_policies(tiny):
    _, tok = tiny
    texts = [call("[0, 0, 999, 50]"), "<answer>A</answer>"]
    main = img(112, 140)
    tr = cof.run(ScriptedModel(tok, [texts]), tok, [main], [Q], cof.CofConfig(keep_images=True))[0]
    assert tr.turns[0]["status"] == "none"                   # released: whole image, x2
    assert tr.images[1].shape[1:] == cof.zoom_size((0, 0, 140, 112))
    tr = cof.run(ScriptedModel(tok, [texts]), tok, [main], [Q], cof.CofConfig(invalid="text"))[0]
    msg = tr.turns[0]["message"]
    assert msg.startswith("Invalid bounding box") and tr.image_grid_thw.shape[0] == 1
    ids, amask = reference_ids(tok, Q, texts, tr.image_grid_thw, env=[cof.error_message(msg)])
    assert tr.ids == ids and tr.gen_mask == amask


def test_batch_rows_finish_and_zoom_at_different_times(tiny):
    _, tok = tiny
    scripts = [["<answer>A</answer>"],
               [call("[0, 0, 40, 40]"), call("[10, 10, 90, 60]"), call("[5, 5, 20, 20]"), "<answer>B</answer>"],
               ["<think>" + "hmm " * 30 + "</think>" + call("[1, 2, 30, 40]"), "<answer>C</answer>"],
               [call("[0, 0, 1, 1]"), "<think>x</think><answer>D</answer>"],
               [call("[3, 3, 3, 3]")] * 8]
    images = [img(112 + 28 * i, 140, seed=i) for i in range(5)]
    qs = [f"Question {i}?" for i in range(5)]
    sm = ScriptedModel(tok, scripts)
    batch = cof.run(sm, tok, images, qs)
    for i in range(5):
        single = cof.run(ScriptedModel(tok, [scripts[i]]), tok, [images[i]], [qs[i]])[0]
        assert batch[i].ids == single.ids and batch[i].gen_mask == single.gen_mask
        assert torch.equal(batch[i].pixel_values, single.pixel_values)
        assert batch[i].image_grid_thw.tolist() == single.image_grid_thw.tolist()
    assert [t.answer for t in batch] == ["A", "B", "C", "D", ""]
    assert [t.n_zooms for t in batch] == [0, 3, 1, 1, 6]


def test_groups_repeat_the_prefix(tiny):
    _, tok = tiny
    scripts = [[call("[0, 0, 40, 40]"), "<answer>A</answer>"], ["<answer>B</answer>"]]
    out = cof.run(ScriptedModel(tok, scripts), tok, [img(112, 112), img(112, 140, 1)], ["q0", "q1"], group_size=3)
    assert [t.group for t in out] == [0, 0, 0, 1, 1, 1]
    assert [t.answer for t in out] == ["A"] * 3 + ["B"] * 3
    assert all(t.ids == out[0].ids for t in out[:3]) and all(t.ids == out[3].ids for t in out[3:])


# ---- the tiny random model: the real cache path --------------------------------------------------------------------

def forced_positions(tok, ids, prefixes):
    header = tok.encode("<|im_start|>assistant\n")
    n = len(header)
    starts = [i + n for i in range(len(ids) - n + 1) if ids[i:i + n] == header]
    return {s + j for k, s in enumerate(starts) if k < len(prefixes) for j in range(len(tok.encode(prefixes[k])))}


def test_tiny_model_end_to_end_batched_with_zooms_matches_full_forward(tiny):
    model, tok = tiny
    prefixes = [["<think>look</think> " + call("[10, 10, 60, 50]"), "<think>more</think>" + call("[30, 20, 90, 80]")],
                [call("[0, 0, 200, 30]")],
                []]
    images = [img(140, 168, 1), img(112, 224, 2), img(168, 112, 3)]
    cfg = cof.CofConfig(max_new_tokens=12, max_turns=3)
    trajs = cof.run(model, tok, images, [Q, "Where?", "Which?"], cfg,
                    logits_processor=bench.force_prefixes(tok, prefixes))
    assert trajs[0].n_zooms >= 2 and trajs[1].n_zooms >= 1
    assert trajs[0].image_grid_thw.shape[0] == 1 + min(trajs[0].n_zooms, cfg.max_turns - 1)
    n_checked = 0
    for q, tr in enumerate(trajs):
        with torch.no_grad():   # re-encode the whole conversation at once
            full = model(torch.tensor([tr.ids], device=DEV), pixel_values=tr.pixel_values, image_grid_thw=tr.image_grid_thw)[0]
        logp = torch.log_softmax(full.float().index_fill(-1, torch.tensor(cof.vision_token_ids(tok)), float("-inf")), -1)  # [T, V]
        forced = forced_positions(tok, tr.ids, prefixes[q])
        for p in range(tr.prompt_len, len(tr.ids)):
            if not tr.gen_mask[p] or p in forced:
                continue
            # the cache path's log-prob and greedy token equal those of the full re-encode at every free position
            assert abs(tr.logprobs[p] - logp[p - 1, tr.ids[p]].item()) < 1e-3
            top2 = torch.topk(full[p - 1], 2).values
            if top2[0] - top2[1] > 1e-4:
                assert full[p - 1].argmax().item() == tr.ids[p]
                n_checked += 1
    assert n_checked > 10        # free greedy tokens agree with re-encoding the whole conversation


def assert_same_conversation(got, spec, logprob_tol=0.0):
    """The batched loop's Trajectory `got` is the spec loop's `spec`: every token (generated or not), every turn's
    text, stop, tool call, box, status, message and crop size, the images, the answer and the counts."""
    assert got.ids == spec.ids and got.gen_mask == spec.gen_mask and got.prompt_len == spec.prompt_len
    assert got.turns == spec.turns
    assert (got.answer, got.n_zooms, got.n_generated, got.finished) == (spec.answer, spec.n_zooms, spec.n_generated,
                                                                        spec.finished)
    assert got.image_grid_thw.tolist() == spec.image_grid_thw.tolist()
    assert torch.equal(got.pixel_values, spec.pixel_values)
    assert (got.original_size, got.main_size) == (spec.original_size, spec.main_size)
    assert max(abs(a - b) for a, b in zip(got.logprobs, spec.logprobs)) <= logprob_tol


SPEC_SCRIPTS = [["<answer>A</answer>"],                                                        # answers at once
                [call("[0, 0, 40, 40]"), call("[10, 10, 90, 60]"), "<answer>B</answer>"],      # two zooms
                [call("[0, 0, 999, 50]"), "<think>x</think><answer>C</answer>"],                # a box off the image
                ["<think>" + "hmm " * 30 + "</think>" + call("[1, 2, 30, 40]"), "<answer>D</answer>"],  # cut turn
                ['<tool_call>{"bbox": [1, 2]}</tool_call>', "<answer>A</answer>"],             # no bbox_2d: "error"
                [call("[3, 3, 30, 30]")] * 8]                                                  # the turn limit


@pytest.mark.parametrize("invalid", ["image", "text"])
def test_batched_loop_equals_the_spec_loop_scripted(tiny, invalid):
    """Six conversations of different lengths in one batch (an answer, zooms, a box off the image, a turn cut at
    max_new_tokens, a tool call without a box, the turn limit), under both invalid-box policies: each is what the
    spec loop makes of it alone."""
    _, tok = tiny
    images = [img(112 + 28 * i, 140, seed=i) for i in range(len(SPEC_SCRIPTS))]
    qs = [f"Question {i}?" for i in range(len(SPEC_SCRIPTS))]
    cfg = cof.CofConfig(max_new_tokens=40, max_turns=4, invalid=invalid)
    batch = cof.run(ScriptedModel(tok, SPEC_SCRIPTS), tok, images, qs, cfg)
    for q, script in enumerate(SPEC_SCRIPTS):
        assert_same_conversation(batch[q], cof.reference_run(ScriptedModel(tok, [script]), tok, images[q], qs[q], cfg))
    assert [t.answer for t in batch] == ["A", "B", "C", "", "A", ""]
    assert [t["status"] for t in batch[2].turns[:1] + batch[4].turns[:1] + batch[5].turns[-1:]] == [
        "none", "error", "limit"]
    assert batch[3].turns[0]["stop"] == "length" and batch[1].n_zooms == 2
    assert batch[2].image_grid_thw.shape[0] == (2 if invalid == "image" else 1)   # the crop, or the error text


def test_batched_loop_equals_the_spec_loop_tiny_model(tiny):
    """The real cache path (ragged prefill, one-token steps, crop turns appended to the cache) against the spec
    (each turn the whole chat prefilled again into a fresh cache, one question at a time), greedy: the same tokens,
    turns, boxes and answers, with zooms and a bad tool call answered by its error text."""
    model, tok = tiny
    prefixes = [["<think>look</think> " + call("[10, 10, 60, 50]"), call("[30, 20, 90, 80]")],
                [call("[0, 0, 200, 30]")],
                [call("[0, 0, 40, 40]"), call("[0, 0, 999, 50]"), call("[5, 5, 50, 50]")]]      # a box off the image
    images = [img(140, 168, 1), img(112, 224, 2), img(168, 112, 3)]
    qs = [Q, "Where?", "Which?"]
    cfg = cof.CofConfig(max_new_tokens=40, max_turns=4, invalid="text")
    batched = cof.run(model, tok, images, qs, cfg, logits_processor=bench.force_prefixes(tok, prefixes))
    assert [t.n_zooms for t in batched] == [2, 1, 3] and batched[0].turns[1]["status"] == "ok"
    assert [t["status"] for t in batched[2].turns[:3]] == ["ok", "none", "ok"]
    assert batched[2].turns[1]["message"].startswith("Invalid bounding box") and batched[2].image_grid_thw.shape[0] == 3
    for q in range(3):
        spec = cof.reference_run(model, tok, images[q], qs[q], cfg,
                                 logits_processor=bench.force_prefixes(tok, [prefixes[q]]))
        assert_same_conversation(batched[q], spec, logprob_tol=1e-3)


def test_spec_loop_is_greedy_only(tiny):
    _, tok = tiny
    with pytest.raises(ValueError, match="do_sample=False"):
        cof.reference_run(ScriptedModel(tok, [["<answer>A</answer>"]]), tok, img(112, 112), "q",
                          cof.CofConfig(do_sample=True))


def test_tiny_model_rollouts_for_grpo(tiny):
    model, tok = tiny
    prefixes = [[call("[10, 10, 60, 50]")], []]
    g = torch.Generator(device=DEV).manual_seed(0)
    cfg = cof.CofConfig(do_sample=True, max_new_tokens=8, max_turns=2, keep_images=True)
    out = cof.run(model, tok, [img(140, 168, 1), img(112, 140, 2)], [Q, "q"], cfg, group_size=3, generator=g,
                  logits_processor=bench.force_prefixes(tok, prefixes, group_size=3))
    assert len(out) == 6 and [t.group for t in out] == [0, 0, 0, 1, 1, 1]
    assert len({tuple(t.ids) for t in out[:3]}) > 1                       # distinct samples in a group
    for t in out:
        assert len(t.ids) == len(t.gen_mask) == len(t.logprobs)
        assert not any(t.gen_mask[:t.prompt_len])
        pads = [i for i, x in enumerate(t.ids) if x == tok.image_pad_id]
        assert not any(t.gen_mask[i] for i in pads)                        # crop tokens are environment tokens
        assert sum(int(g_.prod()) // 4 for g_ in t.image_grid_thw) == len(pads)
        assert len(t.images) == t.image_grid_thw.shape[0]
        with torch.no_grad():
            full = model(torch.tensor([t.ids], device=DEV), pixel_values=t.pixel_values, image_grid_thw=t.image_grid_thw)[0]
        logp = torch.log_softmax(full.float().index_fill(-1, torch.tensor(cof.vision_token_ids(tok)), float("-inf")), -1)
        forced = forced_positions(tok, t.ids, prefixes[t.group])
        for p in range(t.prompt_len, len(t.ids)):
            if t.gen_mask[p] and p not in forced:
                assert abs(t.logprobs[p] - logp[p - 1, t.ids[p]].item()) < 1e-3
    assert all(t.n_zooms >= 1 for t in out[:3])


@pytest.mark.parametrize("compile", [False, True])
def test_zoom_loop_under_autocast(tiny, compile):
    """Under bf16 autocast (what a training forward runs in on CUDA; here the CPU's) the fp32 cache takes bf16 keys
    and values: sampled rollouts with a zoom, rows of different lengths and G = 2 run, eager and through the compiled
    step, and their log-probs are an fp32 full forward's to within bf16 rounding."""
    model, tok = tiny
    prefixes = [[call("[10, 10, 60, 50]")], []]
    cfg = cof.CofConfig(do_sample=True, max_new_tokens=8, max_turns=2, compile=compile)
    with torch.autocast(DEV, dtype=torch.bfloat16):
        out = cof.run(model, tok, [img(140, 168, 1), img(112, 140, 2)], [Q, "q"], cfg, group_size=2,
                      generator=torch.Generator(device=DEV).manual_seed(0),
                      logits_processor=bench.force_prefixes(tok, prefixes, group_size=2))
    assert [t.n_zooms >= 1 for t in out] == [True, True, False, False]
    gaps = []
    for t in out:
        with torch.no_grad():
            full = model(torch.tensor([t.ids], device=DEV), pixel_values=t.pixel_values, image_grid_thw=t.image_grid_thw)[0]
        logp = torch.log_softmax(full.float().index_fill(-1, torch.tensor(cof.vision_token_ids(tok)), float("-inf")), -1)
        forced = forced_positions(tok, t.ids, prefixes[t.group])
        gaps += [abs(t.logprobs[p] - logp[p - 1, t.ids[p]].item()) for p in range(t.prompt_len, len(t.ids))
                 if t.gen_mask[p] and p not in forced]
    assert len(gaps) > 20 and max(gaps) < 0.1 and 0 < sum(gaps) / len(gaps), max(gaps)


def test_context_limit(tiny):
    _, tok = tiny
    texts = ["<think>a</think> " + call("[0, 0, 60, 60]"), "<answer>A</answer>"]
    full = cof.run(ScriptedModel(tok, [texts]), tok, [img(112, 112)], [Q])[0]
    assert full.answer == "A"
    # the crop turn would not fit: stop there with no answer (vLLM refuses the prompt; the released loop records "")
    first_turn_end = full.prompt_len + full.turns[0]["n_tokens"]
    cut = cof.run(ScriptedModel(tok, [texts]), tok, [img(112, 112)], [Q],
                  cof.CofConfig(max_model_len=first_turn_end + 5))[0]
    assert cut.turns[-1]["status"] == "context" and cut.answer == "" and not cut.finished
    assert cut.ids == full.ids[:first_turn_end] and cut.image_grid_thw.shape[0] == 1
    # generation stops at the limit inside a turn
    cut = cof.run(ScriptedModel(tok, [texts]), tok, [img(112, 112)], [Q], cof.CofConfig(max_model_len=full.prompt_len + 4))[0]
    assert len(cut.ids) == full.prompt_len + 4 and cut.turns[0]["stop"] == "length"
    # a prompt that is already too long gets no generation
    cut = cof.run(ScriptedModel(tok, [texts]), tok, [img(112, 112)], [Q], cof.CofConfig(max_model_len=50))[0]
    assert cut.n_generated == 0 and cut.turns[0]["status"] == "context" and cut.answer == ""


def test_rollouts_helper(tiny):
    _, tok = tiny
    scripts = [[call("[0, 0, 40, 40]"), "<answer>A</answer>"]]
    out = cof.rollouts(ScriptedModel(tok, scripts), tok, [img(112, 112)], ["q"], group_size=2,
                       generator=torch.Generator().manual_seed(0), max_turns=3, temperature=0.01)
    assert len(out) == 2 and all(t.answer == "A" and t.n_zooms == 1 for t in out)
    with pytest.raises(ValueError, match="unknown CofConfig keys"):
        cof.rollouts(ScriptedModel(tok, scripts), tok, [img(112, 112)], ["q"], group_size=2, max_turn=3)


def test_processor_limits_come_from_the_checkpoint(tmp_path):
    """A tiny checkpoint whose processor caps images at 112*112 is run at that cap unless the config says otherwise."""
    d = make_tiny(tmp_path / "m", max_pixels=112 * 112, bpe_vocab_size=300)
    net = M.Qwen25VL.from_pretrained(d)
    cfg = cof.with_processor_limits(cof.CofConfig(), net)
    assert (cfg.processor_min_pixels, cfg.processor_max_pixels) == (3136, 12544)
    cfg = cof.with_processor_limits(cof.CofConfig(processor_max_pixels=50176), net)
    assert cfg.processor_max_pixels == 50176
    img = torch.randint(0, 256, (3, 448, 448), dtype=torch.uint8)
    _, grid, _ = cof._encode(img, (0, 0, 448, 448), (448, 448), cof.with_processor_limits(cof.CofConfig(), net), False)
    assert grid.tolist() == [[1, 8, 8]]  # 448x448 -> 112x112 -> 8x8 patches of 14 px

