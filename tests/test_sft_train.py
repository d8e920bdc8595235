"""sft.py training runs on a tiny model and a hand-written dataset in the released CoF-SFT format (CPU).

Loss goes down; torchrun with 2 ranks (DDP and FSDP2) == one process with the same global batch; resume after step k
reproduces steps k+1..n bit for bit; a crash in the middle of a save leaves the previous checkpoint whole; the
checkpoint (LoRA merged) loads in transformers with our logits; bad rows are reported with file and row.
"""
import json
import re
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import model as M
import sft
import trainer
from data.formats import DataError
from procs import run_script
from data import tiny
import tokenizer as T
import crop_kernels as ck

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (230, 200, 40)}


def _png(path, rgb, size):
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[:] = rgb
    arr[::4] = 255 - np.array(rgb, np.uint8)           # some texture so that crops differ from main images
    Image.fromarray(arr).save(path)


def _row(k, names):
    """A CoF-shaped row: question on a main image, a zoom (tool call), the crop, the answer."""
    colour, w = names[k % 4], 28 * (1 + k % 2)
    call = f"{{\"name\": \"image_zoom_in_tool\", \"arguments\": {{\"bbox_2d\": [0, 0, {w}, 28]}}}}"
    return {"messages": [
        {"role": "system", "content": "You zoom."},
        {"role": "user", "content": f"<image> Question: what colour is the square? (A) {names[0]} (B) {names[1]} "
                                    f"(C) {names[2]} (D) {names[3]}"},
        {"role": "assistant", "content": f"<think>Too small.</think>\n<tool_call>\n{call}\n</tool_call>"},
        {"role": "user", "content": "<image>\nThink first."},
        {"role": "assistant", "content": f"<think>It is {colour}.</think>\n<answer>{'ABCD'[k % 4]}</answer>"}],
        "images": [f"images/{k}.png", f"images/{k}_z.png"]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    names = list(COLOURS)
    os.makedirs(root / "data" / "images")
    rows = []
    for k in range(16):
        _png(root / "data" / "images" / f"{k}.png", COLOURS[names[k % 4]], (56, 56))
        _png(root / "data" / "images" / f"{k}_z.png", COLOURS[names[k % 4]], (56, 28))
        rows.append(_row(k, names))
    data = root / "data" / "train.json"
    data.write_text(json.dumps(rows))
    corpus = [m["content"] for r in rows for m in r["messages"]]
    model_dir = tiny.make_tiny(str(root / "model"), hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                            intermediate_size=64, vision_hidden_size=32, vision_depth=2, vision_heads=2,
                            vision_intermediate_size=64, corpus=corpus, bpe_vocab_size=400)
    return dict(root=root, data=str(data), model=model_dir, rows=rows)


def _cfg(setup, out, **kw):
    base = dict(model=setup["model"], data=setup["data"], out=str(setup["root"] / out), epochs=0.0, max_steps=6,
                batch_size=2, grad_accum=2, lr=3e-3, warmup_ratio=0.2, freeze_vision="no", max_len=4096, save_every=3,
                progress=False, threads=1, **{"eval.processor_min_pixels": 28 * 28, "eval.processor_max_pixels": 56 * 56})
    base.update(kw)
    return sft.TrainConfig.from_dict(base)


def test_loss_goes_down(setup):
    res = sft.train(_cfg(setup, "down", max_steps=24, batch_size=4, grad_accum=1, save_every=0, lr=5e-3))
    first, last = res["losses"][0], np.mean(res["losses"][-4:])
    assert last < 0.5 * first, res["losses"]


def test_activation_checkpointing_gives_the_same_steps(setup):
    a = sft.train(_cfg(setup, "ac-off", max_steps=3, save_every=0))
    b = sft.train(_cfg(setup, "ac-on", max_steps=3, save_every=0, act_ckpt=True))
    assert np.allclose(a["losses"], b["losses"], rtol=1e-6, atol=1e-6), (a["losses"], b["losses"])


# LoRA with dropout (consumes the RNG) + a fully trained vision tower: every piece of saved state matters
LORA_KW = dict(lora_rank=4, lora_dropout=0.1, lora_targets="q_proj,v_proj,down_proj")


@pytest.fixture(scope="module")
def lora_run(setup):
    """One uninterrupted 6-step LoRA run (checkpoints at steps 3 and 6), shared by the tests that need it."""
    return sft.train(_cfg(setup, "full", **LORA_KW))


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(setup, lora_run):
    full = lora_run
    out = setup["root"] / "resumed"
    os.makedirs(out)
    shutil.copytree(setup["root"] / "full" / "ckpt-000003", out / "ckpt-000003")
    res = sft.train(_cfg(setup, "resumed", resume=str(out / "ckpt-000003"), **LORA_KW))
    assert res["start"] == 3 and len(res["losses"]) == 3
    assert res["losses"] == full["losses"][3:]                                    # exact float equality
    from safetensors.torch import load_file
    a = load_file(str(setup["root"] / "full" / "ckpt-000006" / "trainer" / "trainable.safetensors"))
    b = load_file(str(out / "ckpt-000006" / "trainer" / "trainable.safetensors"))
    assert a.keys() == b.keys() and any("lora_A" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_loads_in_transformers_with_identical_logits(setup, lora_run):
    from transformers import Qwen2_5_VLForConditionalGeneration
    ckpt = lora_run["checkpoint"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(ckpt))
    tok = T.Tokenizer.from_pretrained(ckpt)
    cfg = _cfg(setup, "unused")
    rows, _ = sft.load_rows(setup["data"], tok, cfg)
    b = sft.collate([sft.SFTData(rows, tok, cfg)[i] for i in (0, 1)], tok.pad_id)
    ours = M.Qwen25VL.from_pretrained(ckpt)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        a = ours(b["input_ids"], b["pixel_values"], b["image_grid_thw"], b["attention_mask"])
        h = hf(input_ids=b["input_ids"], pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"],
               attention_mask=b["attention_mask"], mm_token_type_ids=(b["input_ids"] == tok.image_pad_id).int()).logits
    real = b["attention_mask"].bool()
    assert (a[real] - h[real]).abs().max() <= 1e-4
    # the merged checkpoint is the trained LoRA model: rebuild it unmerged from the base + trainable params
    run = M.Qwen25VL.from_pretrained(setup["model"])
    trainer.add_lora(run, sft.TrainConfig(lora_rank=4, lora_targets="q_proj,v_proj,down_proj"))
    trainer.set_trainable(run, sft.TrainConfig(lora_rank=4, freeze_vision="no"), pretrained=False)
    trainer.load_trainable(run, ckpt)
    run.eval()
    with torch.no_grad():
        u = run(b["input_ids"], b["pixel_values"], b["image_grid_thw"], b["attention_mask"])
    assert (a[real] - u[real]).abs().max() <= 1e-4


def test_cached_samples_equal_fresh_ones_and_the_processor(setup):
    """The sample cache keeps uint8 images and patchifies on every read: same tensors as an uncached read, and the
    pixel values are model.preprocess_image's (the processor) for every image of the row."""
    from crop_kernels import load_image
    tok = T.Tokenizer.from_pretrained(setup["model"])
    cfg = _cfg(setup, "unused", **{"eval.processor_max_pixels": 56 * 28})   # 56x56 main images -> 28x28, 56x28 crops kept
    rows, _ = sft.load_rows(setup["data"], tok, cfg)
    cached, fresh = sft.SFTData(rows, tok, cfg, cache=True), sft.SFTData(rows, tok, cfg)
    for i in (0, 1, 0):
        a, b = cached[i], fresh[i]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        want = [ck.preprocess_image(load_image(p), cfg.eval.processor_min_pixels, cfg.eval.processor_max_pixels)
                for p in rows[i]["images"]]
        assert torch.equal(a["pixel_values"], torch.cat([pv for pv, _ in want]))
        assert torch.equal(a["image_grid_thw"], torch.cat([g for _, g in want]))
        assert a["image_grid_thw"].tolist() == [[1, 2, 2], [1, 2, 4]]
    assert set(cached.cache) == {0, 1} and all(im.dtype == torch.uint8 for _, ims in cached.cache.values() for im in ims)
    assert set(cached.images) == {p for i in (0, 1) for p in rows[i]["images"]}       # one entry per file
    assert all(im is cached.images[p] for i in (0, 1) for im, p in zip(cached.cache[i][1], rows[i]["images"]))


def test_crash_during_save_keeps_the_previous_checkpoint(setup, monkeypatch):
    calls = []
    real_fsync = trainer._fsync_tree

    def crashing(path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("simulated crash while writing the checkpoint")
        real_fsync(path)

    monkeypatch.setattr(trainer, "_fsync_tree", crashing)
    with pytest.raises(OSError, match="simulated crash"):
        sft.train(_cfg(setup, "crash", max_steps=4, save_every=2, grad_accum=1))
    out = setup["root"] / "crash"
    assert (out / "latest").read_text().strip() == "ckpt-000002"
    assert not (out / "ckpt-000004").exists()
    M.Qwen25VL.from_pretrained(str(out / "ckpt-000002"))                         # whole and loadable
    monkeypatch.setattr(trainer, "_fsync_tree", real_fsync)
    res = sft.train(_cfg(setup, "crash", max_steps=4, save_every=2, grad_accum=1, resume="auto"))
    assert res["start"] == 2 and (out / "latest").read_text().strip() == "ckpt-000004"


def _run(args, nproc=None):
    run_script("sft.py", args, nproc)


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(l)["loss"] for l in f if '"loss"' in l]


@pytest.mark.parametrize("mode, extra", [("ddp", []),
                                         ("fsdp", ["--lora_rank", "4", "--lora_targets", "q_proj,v_proj"])])
def test_torchrun_two_ranks_equal_one_process(setup, mode, extra):
    common = ["--model", setup["model"], "--data", setup["data"], "--max_steps", "4", "--lr", "3e-3",
              "--eval.processor_min_pixels", str(28 * 28), "--eval.processor_max_pixels", str(56 * 56),
              "--freeze_vision", "no", "--save_every", "0", "--progress", "false", "--threads", "1", "--max_len", "4096"
              ] + extra
    one, two = str(setup["root"] / f"one-{mode}"), str(setup["root"] / f"two-{mode}")
    _run(common + ["--out", one, "--batch_size", "1", "--grad_accum", "4"])
    _run(common + ["--out", two, "--batch_size", "1", "--grad_accum", "2", "--dist", mode], nproc=2)
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (a, b)
    if mode == "ddp":   # one rank under torchrun: a process group all the same (gloo here; on a GPU NCCL, with the
        solo = str(setup["root"] / "solo")   # step's CPU counts summed through gloo), the one process's losses
        out = run_script("sft.py", common + ["--out", solo, "--batch_size", "1", "--grad_accum", "4"], 1)[1]
        assert "distributed: 1 rank(s), ddp, backend gloo" in out
        assert max(abs(x - y) for x, y in zip(a, _losses(solo))) <= 1e-6
    assert a[-1] < a[0]
    # the HF checkpoints agree too (under FSDP gathered from the shards, LoRA merged, before writing)
    ref, got = (M.Qwen25VL.from_pretrained(os.path.join(o, "ckpt-000004")).state_dict() for o in (one, two))
    assert ref.keys() == got.keys()
    assert max((ref[k] - got[k]).abs().max().item() for k in ref) <= 1e-4
    base = M.Qwen25VL.from_pretrained(setup["model"]).state_dict()
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    if mode == "ddp":                              # full fine-tuning: every language-model weight trained
        assert not torch.equal(base[q], got[q]) and not torch.equal(base[k], got[k])
        return
    # LoRA (rank 4, alpha 0 = 2 * rank, so scale 2) on q_proj/v_proj: the saved q_proj is the frozen base weight plus
    # 2 * B @ A from the trained adapter the checkpoint keeps; k_proj, not a target, is the base weight as it was
    from safetensors.torch import load_file
    lora = load_file(os.path.join(two, "ckpt-000004", "trainer", "trainable.safetensors"))
    A, B = lora[q.replace("weight", "lora_A")], lora[q.replace("weight", "lora_B")]
    assert A.shape == (4, base[q].shape[1]) and B.abs().max() > 1e-4       # B starts at 0: the adapter trained
    torch.testing.assert_close(got[q], base[q] + 2.0 * B @ A, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[k], base[k])


def _write_rows(setup, name, rows):
    path = setup["root"] / "data" / name
    path.write_text(json.dumps(rows))
    return str(path)


@pytest.mark.parametrize("case, match", [
    ("missing_image", "row 1, field 'images\\[1\\]': image .* not found"),
    ("count_mismatch", "row 1, field 'images': 1 <image> placeholder"),
    ("unknown_role", "row 1, field 'messages\\[2\\].role': unknown role 'robot'"),
    ("too_long", "row 1: sample is \\d+ tokens .* longer than --max_len 60"),
])
def test_bad_rows_name_file_and_row_and_skip_bad_counts_them(setup, case, match):
    good = setup["rows"][0]
    bad = json.loads(json.dumps(setup["rows"][1]))
    if case == "missing_image":
        bad["images"][1] = "images/nope.png"
    elif case == "count_mismatch":
        bad["images"] = bad["images"][:1] + bad["images"][:1]
        bad["messages"][3]["content"] = "no placeholder here"
    elif case == "unknown_role":
        bad["messages"][2]["role"] = "robot"
    else:
        bad["messages"][4]["content"] += " and much more" * 30
    path = _write_rows(setup, f"bad_{case}.json", [good, bad, good])
    tok = T.Tokenizer.from_pretrained(setup["model"])
    max_len = 60 if case == "too_long" else 4096
    if case == "too_long":   # the good rows fit, the bad one does not
        ids, _, _ = sft.render(good, tok, [sft.image_grid(p, _cfg(setup, "x")) for p in
                                           [os.path.join(setup["root"], "data", q) for q in good["images"]]])
        max_len = len(ids)
        match = match.replace("60", str(max_len))
    cfg = _cfg(setup, "bad", max_len=max_len)
    with pytest.raises((DataError, sft.BadRow), match=re.escape(path) + ", " + match):
        sft.load_rows(path, tok, cfg)
    rows, n_bad = sft.load_rows(path, tok, _cfg(setup, "bad", max_len=max_len, skip_bad=True))
    assert len(rows) == 2 and n_bad == 1
