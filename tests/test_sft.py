"""sft.py: labels, loss normalisation, schedule, config, data order, LoRA, bad data (fast unit tests).

The training-run tests (loss goes down, torchrun == one process, exact resume, transformers loading) are in
tests/test_sft_train.py.
"""
import math
import os

import pytest
import torch

import sft
import trainer
from data import tiny
import tokenizer as T


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory):
    """A tokenizer whose BPE learned no merges: every ASCII character is one token, special tokens are one each,
    so expected positions can be counted by hand."""
    d = tmp_path_factory.mktemp("bytetok")
    tiny.make_tiny(str(d), hidden_size=32, num_heads=2, num_kv_heads=1, bpe_vocab_size=256)
    tok = T.Tokenizer.from_pretrained(str(d))
    assert tok.encode("assistant") == tok.encode("a") + tok.encode("ssistant")   # really one token per character
    return tok


def test_label_mask_exact_positions(byte_tok):
    tok = byte_tok
    row = {"messages": [{"role": "system", "content": "S"},
                        {"role": "user", "content": "<image>Q"},
                        {"role": "assistant", "content": "A1"},
                        {"role": "user", "content": "<image>"},
                        {"role": "assistant", "content": "B"}]}
    ids, labels, weights = sft.render(row, tok, [(1, 4, 4), (1, 2, 2)])
    # <|im_start|>system\nS<|im_end|>\n                              tokens 0..10
    # <|im_start|>user\n<|vision_start|>PPPP<|vision_end|>Q<|im_end|>\n   11..25 (4 pads = 1*4*4/4)
    # <|im_start|>assistant\nA1<|im_end|>\n                         26..40 ("assistant" = 27..35)
    # <|im_start|>user\n<|vision_start|>P<|vision_end|><|im_end|>\n       41..51
    # <|im_start|>assistant\nB<|im_end|>\n                          52..65
    assert len(ids) == 66
    assert ids[18:22] == [tok.image_pad_id] * 4 and ids[48] == tok.image_pad_id
    assert [i for i, l in enumerate(labels) if l != sft.IGNORE] == [37, 38, 39, 63, 64]
    assert [ids[i] for i in (39, 64)] == [tok.im_end_id] * 2
    assert all(labels[i] == ids[i] for i in (37, 38, 39, 63, 64))
    assert tok.decode([ids[37], ids[38]]) == "A1" and tok.decode([ids[63]]) == "B"
    assert [w for w in weights if w] == [1.0] * 5


def test_image_pads_never_labels_and_answer_weight(byte_tok):
    tok = byte_tok
    row = {"messages": [{"role": "user", "content": "<image>Q"},
                        {"role": "assistant", "content": "x<image>y<tool_call>"},
                        {"role": "user", "content": "<image>"},
                        {"role": "assistant", "content": "<answer>B</answer>"}]}
    ids, labels, weights = sft.render(row, tok, [(1, 2, 2), (1, 2, 4), (1, 2, 2)], answer_weight=3.0)
    pads = [i for i, t in enumerate(ids) if t == tok.image_pad_id]
    assert len(pads) == 1 + 2 + 1
    assert all(labels[i] == sft.IGNORE for i in pads)
    # the assistant image's <|vision_start|>/<|vision_end|> stay labels (only <|image_pad|> is masked, as upstream)
    asst_vs = [i for i, t in enumerate(ids) if t == tok.vision_start_id][1]
    assert labels[asst_vs] == tok.vision_start_id
    lab_pos = [i for i, l in enumerate(labels) if l != sft.IGNORE]
    first_end = next(i for i in lab_pos if ids[i] == tok.im_end_id)
    assert {weights[i] for i in lab_pos if i <= first_end} == {1.0}      # tool-call turn
    assert {weights[i] for i in lab_pos if i > first_end} == {3.0}       # final-answer turn
    assert all(weights[i] == 0 for i in range(len(ids)) if labels[i] == sft.IGNORE)


def test_sft_loss_is_global_token_mean():
    torch.manual_seed(0)
    V = 7
    logits = torch.randn(2, 5, V)
    labels = torch.tensor([[-100, 3, 4, -100, -100], [-100, -100, 1, 2, 6]])
    weights = (labels != -100).float()
    # a second micro-batch with 2 more label tokens: the normaliser is the count over both
    logits2, labels2 = torch.randn(1, 3, V), torch.tensor([[-100, 5, 0]])
    n = 5 + 2

    def logp(lg, lb):   # what Qwen25VL.forward(targets=sft_targets(labels)) returns: 0 where nothing is scored
        t = sft.sft_targets(lb)
        return torch.log_softmax(lg, -1).gather(-1, t.clamp_min(0)[..., None])[..., 0] * (t >= 0)

    got = (sft.sft_loss(logp(logits, labels), labels, weights, n)
           + sft.sft_loss(logp(logits2, labels2), labels2, (labels2 != -100).float(), n))
    terms = []
    for lg, lb in ((logits, labels), (logits2, labels2)):
        for b in range(lb.shape[0]):
            for t in range(1, lb.shape[1]):
                if lb[b, t] != -100:
                    terms.append(-torch.log_softmax(lg[b, t - 1], -1)[lb[b, t]])
    assert len(terms) == n
    torch.testing.assert_close(got, torch.stack(terms).mean(), rtol=1e-6, atol=1e-6)


def test_lr_schedule_warmup_then_cosine():
    cfg = sft.TrainConfig(lr=1.0, warmup_ratio=0.1, min_lr_ratio=0.1)
    lrs = [trainer.lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])       # ceil(0.1 * 100) = 10 warmup steps
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert trainer.lr_at(50, 100, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 40 / 89)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_config_rejects_unknown_keys_and_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        sft.parse_args(["--no_such_option", "1"])
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        sft.TrainConfig.from_dict({"lr": 1e-3, "lerning_rate": 1})
    with pytest.raises(ValueError, match="--dist"):
        sft.TrainConfig(dist="zero3")
    with pytest.raises(SystemExit):
        sft.parse_args(["--help"])
    out = capsys.readouterr().out
    import dataclasses
    for f in dataclasses.fields(sft.TrainConfig):
        assert f"--{f.name}" in out if f.name != "eval" else "--eval.max_turns" in out
    # no --model/--data: the tiny preset fills what the command line leaves out; explicit options win
    cfg = sft.parse_args(["--lr", "0.5"])
    assert cfg.lr == 0.5 and cfg.max_steps == sft.TINY_PRESET["max_steps"]
    cfg = sft.parse_args(["--model", "m", "--progress", "false"])
    assert cfg.lr == 1e-5 and cfg.progress is False and cfg.max_steps == 0


def test_step_sampler_same_rows_for_any_split_and_resume():
    def rows(world, accum, bs, start=0, end=6):
        cfg = sft.TrainConfig(batch_size=bs, grad_accum=accum, seed=3)
        per_rank = [list(sft.StepSampler(50, cfg, start, end, r, world)) for r in range(world)]
        steps = []
        for s in range(end - start):
            steps.append(sorted(i for r in range(world) for mb in per_rank[r][s * accum:(s + 1) * accum] for i in mb))
        return steps
    one = rows(1, 1, 8)
    assert rows(2, 1, 4) == one and rows(1, 2, 4) == one and rows(2, 2, 2) == one
    assert rows(1, 1, 8, start=3) == one[3:]
    assert len({i for s in one[:6] for i in s}) == 48                 # 6 steps = one epoch of 6*8 rows, no repeats
    # grouped by length: the same rows per step, each micro-batch holds rows of similar length
    lengths = [(i * 37) % 50 for i in range(50)]
    cfg = sft.TrainConfig(batch_size=2, grad_accum=4, seed=3)
    grouped = list(sft.StepSampler(50, cfg, 0, 6, 0, 1, lengths))
    assert [sorted(i for mb in grouped[s * 4:(s + 1) * 4] for i in mb) for s in range(6)] == one
    for s in range(6):
        flat = [lengths[i] for mb in grouped[s * 4:(s + 1) * 4] for i in mb]
        assert flat == sorted(flat)
    # two ranks: the step's micro-batches are dealt 0 1 | 1 0, so rank 0 gets the shortest and the longest
    cfg = sft.TrainConfig(batch_size=2, grad_accum=2, seed=3)
    ranks = [list(sft.StepSampler(50, cfg, 0, 6, r, 2, lengths)) for r in range(2)]
    for s in range(6):
        flat = [lengths[i] for mb in grouped[s * 4:(s + 1) * 4] for i in mb]        # the step's rows, sorted
        (a0, a1), (b0, b1) = ranks[0][2 * s:2 * s + 2], ranks[1][2 * s:2 * s + 2]
        assert [lengths[i] for mb in (a0, b0, b1, a1) for i in mb] == flat
    with pytest.raises(ValueError, match="fewer than one global batch"):
        sft.StepSampler(5, sft.TrainConfig(batch_size=4, grad_accum=2), 0, 1, 0, 1)


def test_lora_merge_equals_lora_forward():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    lora = trainer.LoRALinear(base, rank=2, alpha=4.0, dropout=0.0)
    torch.nn.init.normal_(lora.lora_B)
    x = torch.randn(3, 6)
    torch.testing.assert_close(lora.merged()(x), lora(x), rtol=1e-5, atol=1e-5)
    assert not lora.weight.requires_grad and lora.lora_A.requires_grad


def test_fresh_run_in_a_used_out_dir(tmp_path):
    """Checkpoints of an earlier run are never mixed into a fresh one: an error, or deleted with --overwrite."""
    out = tmp_path / "run"
    (out / "ckpt-000500").mkdir(parents=True)
    (out / "eval").mkdir()
    (out / "latest").write_text("ckpt-000500\n")
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit, match="ckpt-000500.*--resume auto.*--overwrite"):
        trainer.clear_earlier_run(sft.TrainConfig(out=str(out)))
    assert (out / "ckpt-000500").is_dir()
    trainer.clear_earlier_run(sft.TrainConfig(out=str(out), resume="auto"))   # resuming: left alone
    assert (out / "ckpt-000500").is_dir()
    trainer.clear_earlier_run(sft.TrainConfig(out=str(out), overwrite=True))
    assert sorted(os.listdir(out)) == []
    trainer.clear_earlier_run(sft.TrainConfig(out=str(tmp_path / "new")))   # nothing there: nothing to do
    assert sft.parse_args([]).overwrite and not sft.parse_args(["--model", "m", "--data", "d"]).overwrite
