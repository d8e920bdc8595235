"""Hostile and careless input: whatever the model samples ends as a recorded turn, parsing is linear in the text,
a checkpoint that would unpickle code is refused, and a crash while re-saving a step leaves `latest` whole."""
import json
import os
import random
import re
import time

import pytest
import torch

import cof
import evaluate as E
import hub
import hostile_corpus as corpus
import model as M
import sft
import trainer
from data.tiny import make_tiny
from cof_fixtures import boost, img
from procs import ROOT
import tokenizer as T


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = make_tiny(str(tmp_path_factory.mktemp("hostile")), max_pixels=112 * 112, min_pixels=56 * 56)
    return M.Qwen25VL.from_pretrained(d).eval(), T.Tokenizer.from_pretrained(d)


HOSTILE = ["<tool_call>", "</tool_call>", "<answer>", "</answer>", "<think>", "{", "}", "[", "]", ",", "0", "9",
           '"bbox_2d"', '"arguments"', "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>",
           "<|im_start|>", "-", ".", "e", "99999999"]


@pytest.mark.parametrize("compiled", [False, True])
def test_a_thousand_sampled_rollouts_of_an_untrained_model(tiny, compiled):
    """125 questions x G = 8 at temperature 1.0, with the tool-call and vision tokens boosted so that tool calls,
    broken JSON and vision tokens are sampled all the time: every rollout ends, no exception, no vision pad in the
    ids the loss would see, and the training forward over the trajectories runs. Eager, and through the compiled
    decode step GRPO uses (rows ending turns at every step are taken out of the cache and put back)."""
    net, tok = tiny
    images = [img(112 + 28 * (i % 5), 140 + 28 * (i % 3), i) for i in range(125)]
    cfg = cof.CofConfig(do_sample=True, temperature=1.0, max_new_tokens=24, max_turns=4, invalid="text",
                        max_model_len=600, compile=compiled)
    out = []
    for i in range(0, 125, 25):
        out += cof.run(net, tok, images[i:i + 25], [f"question {k}" for k in range(i, i + 25)], cfg, group_size=8,
                       generator=torch.Generator().manual_seed(i), logits_processor=boost(tok, HOSTILE, 4.0))
    assert len(out) == 1000
    # the fuzzing reached the tool and its exits: unclosed and unparsable calls (answered with a text turn), a call
    # in the last turn, a conversation past max_model_len (an untrained model never writes a valid box)
    calls = [t for tr in out for t in tr.turns if t["tool_call"]]
    assert {"none", "limit", "context"} <= {t["status"] for t in calls} <= {"ok", "none", "error", "limit", "context"}
    messages = [t["message"] for t in calls]
    assert sum(m == "Invalid tool call: no <tool_call>...</tool_call> block found." for m in messages) > 100
    assert sum(m.startswith("Invalid tool call: the <tool_call> content is not valid JSON") for m in messages) > 50
    vision = set(cof.vision_token_ids(tok))
    for tr in out:
        assert len(tr.ids) == len(tr.gen_mask) == len(tr.logprobs)
        assert 1 <= len(tr.turns) <= cfg.max_turns and all(t["n_tokens"] <= cfg.max_new_tokens for t in tr.turns)
        assert tr.n_zooms == sum(t["tool_call"] for t in tr.turns)                # each call counted once
        last = tr.turns[-1]                          # an answer turn: no call, not cut by a vision token
        assert tr.finished == (not last["tool_call"] and last["stop"] not in ("vision_token", "context"))
        assert all((t.get("status") is not None) == t["tool_call"] or t["status"] == "context" for t in tr.turns)
        # invalid="text": only a valid box sends an image back, the main image is the first
        assert tr.image_grid_thw.shape[0] == 1 + sum(t.get("status") == "ok" for t in tr.turns)
        assert not any(g and i in vision for i, g in zip(tr.ids, tr.gen_mask))
        n_pad = sum(1 for i in tr.ids if i == tok.image_pad_id)
        assert n_pad == int(tr.image_grid_thw.prod(1).sum()) // 4         # every image run has its image
    with torch.no_grad():
        for tr in out[::97]:
            net(torch.tensor([tr.ids]), pixel_values=tr.pixel_values, image_grid_thw=tr.image_grid_thw)


def test_a_sampled_image_pad_ends_the_turn_when_the_ban_is_off(tiny):
    net, tok = tiny
    cfg = cof.CofConfig(do_sample=True, max_new_tokens=16, max_turns=3, ban_vision_tokens=False)
    out = cof.run(net, tok, [img(112, 112)], ["q"], cfg, group_size=4, generator=torch.Generator().manual_seed(0),
                  logits_processor=boost(tok, ["<|image_pad|>"], 30.0))
    for tr in out:
        assert tr.turns[-1]["stop"] == "vision_token" and not tr.finished and tr.answer == ""
        assert tok.image_pad_id not in tr.ids[tr.prompt_len:]
    # with the ban (the default) the same model never samples it
    out = cof.run(net, tok, [img(112, 112)], ["q"], cof.CofConfig(do_sample=True, max_new_tokens=16), group_size=4,
                  generator=torch.Generator().manual_seed(0), logits_processor=boost(tok, ["<|image_pad|>"], 30.0))
    assert all(tok.image_pad_id not in tr.ids[tr.prompt_len:] for tr in out)


def test_tool_call_numbers_past_the_int_limit_are_an_invalid_call():
    text = '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [' + "9" * 5000 + ', 0, 1, 1]}}</tool_call>'
    box, status, message = cof.find_box(text, 100, 100)
    assert box is None and status == "none" and "not valid JSON" in message
    assert cof.find_box(text.replace("9" * 5000, "1e999"), 100, 100)[1] == "none"    # inf: out of range


@pytest.mark.parametrize("text", ["<tool_call>" * 100_000, "<answer>" * 130_000, "<answer>\n x" * 100_000,
                                  "<tool_call><answer> " * 60_000 + "</answer>"],
                         ids=["open_tool_calls", "open_answers", "answers_with_newlines", "interleaved_then_close"])
def test_parsing_is_linear(text):
    assert len(text) >= 1_000_000
    t0 = time.time()
    cof.parse_zoom(text, 448, 448)
    cof.extract_answer(text)
    cof.judge_answer(text)
    assert time.time() - t0 < 1.0


def test_linear_parsers_equal_the_released_regexes():
    """The released code's regexes are the reference: first tool call (re.search, DOTALL), the RL reward's last
    answer (findall, DOTALL, stripped), the V* judge's first answer (re.search without DOTALL)."""
    tool = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
    last = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
    first = re.compile(r"<answer>\s*(.*?)\s*</answer>")
    pieces = ["<answer>", "</answer>", " ", "\n", "A", "b", "\t", "<tool_call>", "</tool_call>", "<", "<answer",
              "\u00a0", "<|im_end|>"]
    rng = random.Random(0)
    for _ in range(20000):
        t = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        m = tool.search(t)
        assert cof.first_tool_call(t) == (m.group(1) if m else None)
        f = last.findall(t)
        assert cof.extract_answer(t) == (f[-1].strip() if f else "")
        m = first.search(t.replace("<|im_end|>", ""))
        assert cof.judge_answer(t) == (m.group(1) if m else ""), repr(t)


def test_evaluation_takes_the_first_answer_rewards_the_last():
    text = "<think>x</think><answer>A</answer> then <answer>B</answer>"
    assert cof.judge_answer(text) == "A" and cof.extract_answer(text) == "B"
    assert cof.judge_answer("<answer>A\nB</answer><answer>C</answer>") == "C"        # no newline inside (no DOTALL)


# ---- checkpoints ---------------------------------------------------------------------------------------------------

class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))     # unpickling would create this file


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "optimizer.pt"
    torch.save({"state": {}, "param_groups": [], "x": _Evil(str(marker))}, bad)
    with pytest.raises(ValueError, match="refusing to load it"):
        trainer.load_trainer_file(bad)
    assert not marker.exists()
    good = tmp_path / "rng.pt"
    torch.save(trainer.rng_state(), good)
    state = trainer.load_trainer_file(good)          # what the trainer writes loads with weights_only=True
    before = (torch.rand(3), random.random())
    trainer.set_rng_state(state)
    assert torch.equal(torch.rand(3), before[0]) and random.random() == before[1]


def test_a_crash_while_resaving_a_step_leaves_latest_whole(tmp_path, monkeypatch):
    """Resuming from an older checkpoint re-saves steps that already have one. Kill the save between removing the old
    directory and moving the new one in: `latest` must still name a whole checkpoint."""
    d = make_tiny(str(tmp_path / "m"), hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                    intermediate_size=32, vision_hidden_size=32, vision_depth=1, vision_heads=2,
                    vision_intermediate_size=32, fullatt_block_indexes=(0,), bpe_vocab_size=300)
    raw = M.Qwen25VL.from_pretrained(d)
    cfg = sft.TrainConfig(out=str(tmp_path / "out"), keep_last=5)
    opt = trainer.make_optimizer(raw, cfg)
    trainer.save_checkpoint(raw, opt, 2, cfg, {})
    real = os.replace

    def crash(src, dst):
        if str(src).endswith(".tmp-ckpt-000002"):
            raise KeyboardInterrupt("killed while re-saving")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(raw, opt, 2, cfg, {})
    monkeypatch.setattr(os, "replace", real)
    ckpt = trainer.resolve_resume(sft.TrainConfig(out=cfg.out, resume="auto"))
    assert (ckpt / "trainer" / "state.json").is_file() and json.loads((ckpt / "trainer" / "state.json").read_text())["step"] == 2
    M.Qwen25VL.from_pretrained(str(ckpt))
    trainer.save_checkpoint(raw, opt, 2, cfg, {})        # the next save cleans up and points `latest` back
    assert (tmp_path / "out" / "latest").read_text().strip() == "ckpt-000002"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ckpt-000002", "latest"]


def test_metrics_of_a_resumed_run_have_no_duplicate_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 7)) + '{"step": 7, "lo')
    m = trainer.Metrics(str(path), start=4)
    m.log(step=5, loss=0.0)
    steps = [json.loads(l)["step"] for l in path.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("argv, words", [
    (["--lr", "inf"], "--lr must be a finite number"), (["--lr", "nan"], "--lr must be a finite number"),
    (["--min_lr_ratio", "nan"], "--min_lr_ratio must be a finite number"),
    (["--max_steps", "-5"], "--max_steps must be a whole number >= 0, got -5"),
    (["--log_every", "0"], "--log_every must be a whole number >= 1"),
    (["--eval.processor_max_pixels", "0"], "--eval.processor_max_pixels must be a whole number >= 1"),
    (["--batch_size", "-1"], "--batch_size must be a whole number >= 1"),
    (["--beta2", "1"], "--beta2 must be a finite number >= 0 and < 1, got 1.0"),
    (["--seed", "-1"], "--seed must be a whole number >= 0 and <= 4294967295, got -1"),
    (["--dist", "zero"], "--dist must be one of ddp, fsdp"),
])
def test_bad_numbers_in_the_trainer_options(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        sft.parse_args(["--model", "x"] + argv)
    assert e.value.code == 2 and words in capsys.readouterr().err


# ---- trust boundaries: files ---------------------------------------------------------------------------------------

def test_a_sharded_index_cannot_point_outside_the_checkpoint(tmp_path):
    import shutil
    from safetensors import safe_open
    d = make_tiny(str(tmp_path / "m"), bpe_vocab_size=300)
    os.makedirs(tmp_path / "outside")
    shutil.move(os.path.join(d, "model.safetensors"), tmp_path / "outside" / "model.safetensors")
    with safe_open(str(tmp_path / "outside" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    for where in ("../outside/model.safetensors", str(tmp_path / "outside" / "model.safetensors")):
        (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: where for k in keys}}))
        with pytest.raises(hub.CheckpointError, match="outside the checkpoint directory"):
            M.Qwen25VL.from_pretrained(d)
    (tmp_path / "m" / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(hub.CheckpointError, match="model.safetensors.index.json: not valid JSON"):
        M.Qwen25VL.from_pretrained(d)


def test_benchmark_images_stay_inside_their_folder(tmp_path):
    from PIL import Image
    os.makedirs(tmp_path / "bench")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    for rel in ("../outside.png", str(tmp_path / "outside.png")):
        (tmp_path / "bench" / "test_questions.jsonl").write_text(json.dumps({"image": rel, "text": "q", "label": "A"}) + "\n")
        with pytest.raises(E.BenchError, match="leaves the benchmark folder"):
            E.read_vstar(str(tmp_path / "bench"))


def test_rows_are_checked_for_what_training_reads(tmp_path):
    from data import formats
    tok = T.Tokenizer.from_pretrained(make_tiny(str(tmp_path / "m"), bpe_vocab_size=300))
    (tmp_path / "not_an_image.png").write_text("hello, I am text")
    from PIL import Image
    Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
    def row(img, text="<image> Question: what?"):
        return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "<answer>A</answer>"}],
                "images": [img]}
    cfg = sft.TrainConfig.from_dict({"max_len": 4096, "eval.processor_min_pixels": 28 * 28,
                                     "eval.processor_max_pixels": 64 * 64})
    for img, words in (("not_an_image.png", "cannot read it as an image"), ("cut.png", "cannot read it as an image")):
        (tmp_path / "rows.json").write_text(json.dumps([row(img)]))
        with pytest.raises(sft.BadRow, match=re.escape(str(tmp_path / "rows.json")) + ", row 0, images\\[0\\]: .*" + words):
            sft.load_rows(str(tmp_path / "rows.json"), tok, cfg)
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    (tmp_path / "rows.json").write_text(json.dumps([row("ok.png", "<image> look: <|image_pad|>")]))
    with pytest.raises(formats.DataError, match="row 0, field 'messages\\[0\\].content': holds the special token"):
        sft.load_rows(str(tmp_path / "rows.json"), tok, cfg)
    with pytest.raises(ValueError, match="message 0: its text holds '<\\|vision_start\\|>'"):
        T.tokenize_chat(tok, [{"role": "user", "content": "a <|vision_start|> b"}])


def test_load_image_errors_name_the_source(tmp_path):
    import crop_kernels as ck
    with pytest.raises(TypeError, match="expected a path, encoded bytes"):
        ck.load_image(None)
    with pytest.raises(ck.ImageError, match="<bytes>: cannot read it as an image"):
        ck.load_image(b"definitely not an image")


def test_echoed_model_text_cannot_inject_special_tokens(tiny):
    net, tok = tiny
    text = '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": ["<|image_pad|>", "<|im_end|>", 1, 2]}}</tool_call>'
    z = cof.zoom(img(112, 112), text, cof.with_processor_limits(cof.CofConfig(invalid="text"), net))
    assert z["status"] == "none" and z["message"] == ("Invalid bounding box: Bounding box must be a list of 4 numbers, "
                                                      "but found non-numeric elements in: "
                                                      "'['<image_pad>', '<im_end>', 1, 2]'")
    turns = cof._Turns(tok)
    ids = turns.after_assistant(tok.im_end_id, cof.error_message(z["message"]))
    assert tok.image_pad_id not in ids and ids.count(tok.im_end_id) == 1       # only the one closing the user turn


# ---- the ecosystem's rules -----------------------------------------------------------------------------------------

OPTS = {"A": "red", "B": "green", "C": "blue", "D": "yellow"}


@pytest.mark.parametrize("pred, letter", [
    ("Option A", "A"), ("The answer is A.", "A"), ("\\boxed{A}", "A"), ("**A**", "A"), ("(B) green", "B"),
    ("B", "B"), ("C.", "C"), ("(D)", "D"), ("it is blue", "C"), ("Green", "B"),
    ("A or B", None), ("(A) or (B)", None), ("A B C D", None), ("red or green", None), ("", None), ("E", None),
])
def test_match_answer_follows_vlmevalkit_option_inference(pred, letter):
    """VLMEvalKit's documented behaviour (can_infer_option / can_infer_text): one option named -> that option;
    several -> no answer."""
    got = [L for L in "ABCD" if E.match_answer(pred, L, OPTS)]
    assert got == ([letter] if letter else [])


def test_tokenizer_from_vocab_and_merges_equals_tokenizer_json_and_transformers(tmp_path):
    import shutil
    from transformers import AutoTokenizer
    d = make_tiny(str(tmp_path / "m"), bpe_vocab_size=400)
    os.makedirs(tmp_path / "v")
    for f in ("tokenizer_config.json", "config.json"):
        shutil.copy(os.path.join(d, f), tmp_path / "v" / f)
    full = T.Tokenizer.from_pretrained(d)
    full.tok.model.save(str(tmp_path / "v"))                      # vocab.json + merges.txt, nothing else
    assert not (tmp_path / "v" / "tokenizer.json").exists()
    ours = T.Tokenizer.from_pretrained(str(tmp_path / "v"))
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "v"))
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|vision_start|><|image_pad|><|vision_end|>"
            " Question: (A) red <tool_call>{\"bbox_2d\": [1, 2]}</tool_call> \u00fcn\u00ef \u65e5\u672c  \n\n x")
    assert ours.encode(text) == full.encode(text) == hf.encode(text, add_special_tokens=False)
    assert (ours.im_end_id, ours.image_pad_id) == (full.im_end_id, full.image_pad_id)


@pytest.mark.parametrize("change, words", [
    (lambda c: c.update(rms_norm_eps=float("nan")), "rms_norm_eps must be a finite number > 0, got nan"),
    (lambda c: c.update(num_attention_heads=0), "num_attention_heads must be a whole number >= 1, got 0"),
    (lambda c: c.update(num_hidden_layers=2.5), "num_hidden_layers must be a whole number >= 1, got 2.5"),
    (lambda c: c["vision_config"].update(depth="2"), "depth must be a whole number >= 1, got '2'"),
    (lambda c: c["vision_config"].update(fullatt_block_indexes=[5]), "fullatt_block_indexes must be block indices"),
    (lambda c: c.update(rope_scaling={"type": "mrope", "mrope_section": [2, "3", 3]}), "mrope_section must be a list"),
])
def test_bad_config_values_are_named(tmp_path, change, words):
    d = make_tiny(str(tmp_path / "m"), bpe_vocab_size=300)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    change(cfg)
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(hub.CheckpointError, match=re.escape(words)):
        M.Qwen25VL.from_pretrained(d)


def test_bad_checkpoint_files_are_named(tmp_path):
    from safetensors.torch import load_file, save_file
    d = make_tiny(str(tmp_path / "m"), bpe_vocab_size=300)
    (tmp_path / "m" / "config.json").write_text("[1, 2]")
    with pytest.raises(hub.CheckpointError, match="config.json: expected a JSON object, got list"):
        M.Qwen25VL.from_pretrained(d)
    d = make_tiny(str(tmp_path / "n"), bpe_vocab_size=300)
    (tmp_path / "n" / "generation_config.json").write_text("{oops")
    with pytest.raises(hub.CheckpointError, match="generation_config.json: not a valid generation config"):
        M.Qwen25VL.from_pretrained(d)
    (tmp_path / "n" / "generation_config.json").unlink()
    sd = load_file(str(tmp_path / "n" / "model.safetensors"))
    sd["model.norm.weight"] = sd["model.norm.weight"].long()
    save_file(sd, str(tmp_path / "n" / "model.safetensors"))
    with pytest.raises(hub.CheckpointError, match="'model.norm.weight' is stored as I64, not a floating-point type"):
        M.Qwen25VL.from_pretrained(d)
    (tmp_path / "n" / "tokenizer.json").write_text("not json")
    with pytest.raises(hub.CheckpointError, match="tokenizer.json: not a tokenizers file"):
        T.Tokenizer.from_pretrained(d)


def test_raw_errors_become_named_errors(tmp_path):
    import crop_kernels as ck
    from data import formats
    for kw, words in ((dict(height=float("nan"), width=10), "height must be a finite number > 0, got nan"),
                      (dict(height=10, width=10, factor=0), "factor must be a finite number > 0, got 0"),
                      (dict(height=float("inf"), width=10), "height must be a finite number > 0, got inf")):
        with pytest.raises(ValueError, match=re.escape(words)):
            ck.smart_resize(**kw)
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"messages": [{"role": "user", "content": "<image>q"},
                                              {"role": "assistant", "content": "a"}], "images": ["a\u0000b.png"]}]))
    with pytest.raises(formats.DataError, match="row 0, field 'images\\[0\\]': image path .* holds a NUL byte"):
        formats.read_sft(str(rows))
    assert formats.read_sft(str(rows), skip_bad=True) == ([], 1)                   # and --skip_bad skips it
    rows.write_bytes('[{"messages": "caf\u00e9"}]'.encode("latin-1"))
    with pytest.raises(formats.DataError, match="not UTF-8 text"):
        formats.read_sft(str(rows))
    rows.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(formats.DataError, match="not valid JSON"):
        formats.read_sft(str(rows))
    bench = tmp_path / "b"
    os.makedirs(bench)
    (bench / "test_questions.jsonl").write_text('[1, 2]\n')
    with pytest.raises(E.BenchError, match="line 1: expected a JSON object, got list"):
        E.read_vstar(str(bench))
    (bench / "test_questions.jsonl").write_text(json.dumps({"image": 5, "text": "q", "label": "A"}) + "\n")
    with pytest.raises(E.BenchError, match="image must be a non-empty path string, got 5"):
        E.read_vstar(str(bench))
    res = tmp_path / "results.jsonl"
    res.write_text('{"no_key": 1}\n[1]\n{"key": "orig:1", "correct": true}\n{"key": "orig:2", "corr')
    assert list(E.load_results(str(res))) == ["orig:1"]
    tsv = tmp_path / "hr.tsv"
    tsv.write_text("index\tquestion\tanswer\tcategory\tA\tB\tcycle_category\timage\n0\tq\tA\tsingle\tx\ty\tzero\tQUJD\n")
    with pytest.raises(E.BenchError, match="cycle_category must be an integer"):
        E.read_hrbench(str(tsv))


_RESAVER = """
import sys
import model as M, sft, trainer
d, out = sys.argv[1], sys.argv[2]
raw = M.Qwen25VL.from_pretrained(d)
cfg = sft.TrainConfig(out=out, keep_last=5)
opt = trainer.make_optimizer(raw, cfg)
step = 0
while True:                        # re-save step 2 over and over (what a run resumed from step 1 does), and step 3
    step += 1
    trainer.save_checkpoint(raw, opt, 2 if step % 3 else 3, cfg, {})
    print("saved", flush=True)
"""


def test_kill_9_during_resaves_never_leaves_latest_broken(tmp_path):
    """A real SIGKILL, at random moments, of a process that keeps re-saving an existing step: after every kill
    `--resume auto` finds a whole checkpoint (config, weights, trainer state) and the next save cleans up."""
    import signal
    import subprocess
    import sys
    import threading
    d = make_tiny(str(tmp_path / "m"), hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                    intermediate_size=32, vision_hidden_size=32, vision_depth=1, vision_heads=2,
                    vision_intermediate_size=32, fullatt_block_indexes=(0,), bpe_vocab_size=300)
    out = tmp_path / "out"
    rng = random.Random(0)
    for trial in range(4):
        p = subprocess.Popen([sys.executable, "-c", _RESAVER, d, str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                             env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"), text=True)
        watchdog = threading.Timer(120, p.kill)       # a hung child must not hang the suite
        watchdog.start()
        for _ in range(2 + trial):                    # let it finish a few saves, so the next one is a re-save
            assert p.stdout.readline().startswith("saved"), "the re-saving process died on its own"
        watchdog.cancel()
        time.sleep(rng.uniform(0.0, 0.05))            # then kill it somewhere inside a save
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stdout.close()
        ckpt = trainer.resolve_resume(sft.TrainConfig(out=str(out), resume="auto"))
        assert json.loads((ckpt / "trainer" / "state.json").read_text())["step"] in (2, 3)
        trainer.load_trainer_file(ckpt / "trainer" / "optimizer.pt")
        M.Qwen25VL.from_pretrained(str(ckpt))


# ---- the hostile corpus (tests/hostile_corpus.py): every public function and command line, each case asserting the
# error type and the words of its message, or the documented fallback ------------------------------------------------

@pytest.fixture(scope="module")
def corpus_env():
    env = corpus.Env()
    yield env
    env.close()


@pytest.mark.parametrize("name", list(corpus.CASES))
def test_corpus(corpus_env, name):
    problem, _ = corpus.run_case(name, corpus_env)
    assert problem is None, f"{name}: {problem}"


# issue 29's categories -> the corpus's case prefixes for them, and the fewest cases each must have
CATEGORIES = {
    "sampling arguments (sample_next, generate, CofConfig, cof.run / rollouts)":
        (("sample_next", "generate", "CofConfig", "cof.run"), 40),
    "reward functions returning too many / too few / None / NaN rewards": (("reward_fn",), 8),
    "RL rows and records with a label or question that is not a string": (("rl_row", "rl_records"), 10),
    "evaluation output: its source recorded, a rerun refused or restarted, the summary's folder":
        (("eval_source", "eval_out", "evaluate.evaluate", "evaluate.load_results"), 10),
    "trainer files that fail to load (rng, optimizer, trainable, state.json, metrics.jsonl, latest)": (("resume",), 25),
    "command-line numbers and choices of every main": (("sft.py", "grpo.py", "sweep.py", "data.build", "bench.py",
                                                        "crop_kernels/sources", "crop_kernels/threads", "evaluate.py"), 80),
    "raw errors from deep inside (parse_zoom, tokenize_chat, token ids, resize, config vs weights)":
        (("parse_zoom", "extract_answer", "tokenize_chat", "tokenizer", "model", "config", "crop_kernels"), 50),
    "files: truncated, corrupt, not UTF-8": (("files", "checkpoint"), 30),
    "the rest of the public functions: bad types and numbers": (("library",), 25),
}


def test_corpus_covers_every_category_of_issue_29():
    for category, (prefixes, fewest) in CATEGORIES.items():
        n = sum(any(name.split("/")[0].startswith(p) or name.startswith(p) for p in prefixes) for name in corpus.CASES)
        assert n >= fewest, f"{category}: {n} cases, want at least {fewest}"
    kinds = {type(expect).__name__ for _, expect in corpus.CASES.values()}
    assert kinds == {"Raises", "Exits", "Returns"}
