"""grpo.py: advantages and AGAR against hand-computed cases and a line-by-line port of the released code, the format
rule, the clipped loss's gradients, KL, masks, log-probs of the training forward against the sampler's, torchrun
with 2 ranks against one process, exact resume, and one-line errors (tiny models, CPU)."""
import itertools
import json
import os
import re
import shutil

import pytest
import torch

import bench
import cof
import grpo
import model as M
import report
import sft
import trainer
from data import build, formats
from procs import run_script
from data import tiny
import tokenizer as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIEW = dict(min_pixels=56 * 56, max_pixels=112 * 112)
# the trainers' options for the tiny model's view: both loops see images through its processor limits, without the
# rows' system turn
LOOPS = {f"{loop}.{key}": value for loop in ("rollout", "eval") for key, value in
         dict(processor_min_pixels=VIEW["min_pixels"], processor_max_pixels=VIEW["max_pixels"], system=False).items()}


def call(b):
    return f'<tool_call>\n{{"name": "image_zoom_in_tool", "arguments": {{"bbox_2d": {b}}}}}\n</tool_call>'


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small synthetic set (data.build) and a random tiny model whose BPE knows its text."""
    root = tmp_path_factory.mktemp("grpo")
    build.build(build.BuildConfig(out=str(root / "synth"), n=24, rl=24, val=6, test=2, per_kind=0, table_items=0))
    rows, _ = formats.read_sft(str(root / "synth" / "sft_train.json"))
    corpus = [m["content"].replace("<image>", "") for r in rows for m in r["messages"]]
    model_dir = tiny.make_tiny(str(root / "model"), corpus=corpus, bpe_vocab_size=500, init="train", **VIEW)
    return dict(root=root, data=str(root / "synth" / "rl_train.jsonl"), val=str(root / "synth" / "val.jsonl"),
                model=model_dir)


# The tests that compare two updates' weights use Adam's eps 1e-6: with the default 1e-8, a gradient entry at float-noise
# level (1e-10, from another summation order) is divided by its own size and becomes a step of up to lr, so two correct
# updates differ by a few 1e-5 on a handful of weights. At 1e-6 that noise moves a weight by at most lr * 1e-4.
ADAM_EPS = 1e-6


def _cfg(setup, out, **kw):
    base = dict(model=setup["model"], data=setup["data"], eval_data="", out=str(setup["root"] / out), max_steps=4,
                prompts_per_step=4, group_size=3, micro_batch=4, lr=1e-3, beta=0.01, freeze_vision="no", save_every=2,
                progress=False, threads=1, eval_start=False, **LOOPS, **{"rollout.max_new_tokens": 12,
                                                                         "rollout.max_turns": 3,
                                                                         "rollout.max_model_len": 1024})
    base.update(kw)
    return grpo.GRPOConfig.from_dict(base)


# ---- advantages and rewards ----------------------------------------------------------------------------------------

def test_group_advantages_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.1, 0.8, 1.0])
    adv = grpo.group_advantages(r, 3)
    s = (1 / 3) ** 0.5                                   # unbiased std of [1, 0, 0] (and of [0.1, 0.8, 1.0]: see below)
    assert torch.allclose(adv[:3], torch.tensor([2 / 3, -1 / 3, -1 / 3]) / (s + 1e-6))
    assert adv[3:6].tolist() == [0.0, 0.0, 0.0]          # all equal: exactly 0, never NaN
    m, sd = (0.1 + 0.8 + 1.0) / 3, torch.tensor([0.1, 0.8, 1.0]).std().item()
    assert torch.allclose(adv[6:], (torch.tensor([0.1, 0.8, 1.0]) - m) / (sd + 1e-6))
    assert abs(sd - ((0.1 - m) ** 2 + (0.8 - m) ** 2 + (1.0 - m) ** 2) ** 0.5 / 2 ** 0.5) < 1e-6   # Bessel
    assert torch.allclose(grpo.group_advantages(r, 3, scale=False)[:3], torch.tensor([2 / 3, -1 / 3, -1 / 3]))
    assert grpo.group_advantages(torch.tensor([0.3, 0.9]), 1).tolist() == [0.0, 0.0]      # groups of one
    same = grpo.group_advantages(torch.full((6,), 0.1), 6)                               # 0.1 is not exact in float
    assert same.tolist() == [0.0] * 6 and not torch.isnan(same).any()


def released_adaptive_scores(formats_, corrects, scores):
    """verl/verl/trainer/ppo/core_algos.py score_batch_responses_adaptive of xtong-zhang/Chain-of-Focus, line by
    line (the reference AGAR is tested against)."""
    batch_scores = []
    has_direct_correct = any(f == "direct" and c for f, c in zip(formats_, corrects))
    has_any_correct = any(corrects)
    for fmt, correct, score_i in zip(formats_, corrects, scores):
        if has_direct_correct and has_any_correct:
            if fmt == "direct" and correct:
                score = 1.0
            elif fmt == "zoomin" and correct:
                score = 0.8
            elif fmt == "zoomin" and not correct:
                score = 0.5
            elif score_i == 0.1:
                score = 0.1
            else:
                score = 0.0
        elif has_any_correct:
            if fmt == "zoomin" and correct:
                score = 1.0
            elif fmt == "zoomin" and not correct:
                score = 0.5
            elif score_i == 0.1:
                score = 0.1
            else:
                score = 0.0
        else:
            if fmt == "zoomin":
                score = 0.5
            elif score_i == 0.1:
                score = 0.1
            else:
                score = 0.0
        batch_scores.append(score)
    return batch_scores


def test_agar_table_rows():
    # some direct answer right: direct right 1.0, zoom right 0.8, zoom wrong 0.5, direct wrong 0.1 / 0.0 (format)
    assert grpo.agar([True, True, False, False, False], [False, True, True, False, False],
                     [True, True, True, True, False]) == [1.0, 0.8, 0.5, 0.1, 0.0]
    # only zooms right: zoom right 1.0
    assert grpo.agar([True, False, False, False], [True, True, False, False],
                     [True, False, True, False]) == [1.0, 0.5, 0.1, 0.0]
    # nobody right: a failed zoom beats a failed direct answer
    assert grpo.agar([False, False, False], [True, False, False], [False, True, False]) == [0.5, 0.1, 0.0]
    # right but badly formatted still counts as right (0.9 > 0.5)
    assert grpo.agar([True, True], [False, True], [False, False]) == [1.0, 0.8]


def test_agar_equals_the_released_code_on_every_group_of_three():
    kinds = list(itertools.product([False, True], repeat=3))          # (correct, zoomed, format_ok) per sample
    for group in itertools.product(kinds, repeat=3):
        c, z, f = zip(*group)
        scores = [0.9 * ci + 0.1 * fi for ci, fi in zip(c, f)]
        want = released_adaptive_scores(["zoomin" if zi else "direct" for zi in z], [s > 0.5 for s in scores], scores)
        assert grpo.agar(list(c), list(z), list(f)) == want, group


def test_format_rule():
    zoom_turn = "<think>small</think> " + call("[0, 0, 10, 10]")
    env = "\nuser\n" + cof.USER_PROMPT + "\nassistant\n"       # what a decoded crop turn looks like
    assert grpo.format_ok(zoom_turn + env + "<think>it is B</think> <answer>B</answer>")
    assert grpo.format_ok("<think>a</think><think>b</think><answer>A</answer>")
    assert not grpo.format_ok(zoom_turn + env)                       # no answer (the suffix's tags do not count)
    assert not grpo.format_ok("<answer>A</answer>")                  # no think
    assert not grpo.format_ok("<think>a</think><think>b<answer>A</answer>")
    assert not grpo.format_ok("<think>a</think><answer>A</answer><answer>B")
    assert grpo.format_ok("<think>a</think><answer>" + "w " * 1000 + "</answer>")
    assert not grpo.format_ok("<think>a</think><answer>" + "w " * 1001 + "</answer>")


def test_accuracy_reads_the_last_answer_of_the_response():
    p = dict(label="B", options={"A": "vertical", "B": "horizontal"})
    assert grpo.accuracy("<answer>A</answer> ... <answer>B</answer>", p) == 1.0
    assert grpo.accuracy("<answer>B</answer> ... <answer>A</answer>", p) == 0.0
    assert grpo.accuracy("<answer>horizontal</answer>", p) == 1.0
    assert grpo.accuracy("<think>B</think>" + cof.USER_PROMPT, p) == 0.0      # the suffix's <answer>...</answer>


# ---- the loss ----------------------------------------------------------------------------------------------------

def _loss_cfg(**kw):
    return grpo.GRPOConfig(**{**dict(clip_low=0.2, clip_high=0.2, clip_dual=3.0, beta=0.0), **kw})


@pytest.mark.parametrize("adv, log_ratio, want", [
    (1.0, 0.0, "down"), (1.0, 0.1, "down"), (1.0, 0.3, "zero"),          # A > 0: push up until ratio > 1.2
    (-1.0, 0.0, "up"), (-1.0, -0.1, "up"), (-1.0, -0.3, "zero"),         # A < 0: push down until ratio < 0.8
    (-1.0, 1.5, "zero"),                                                 # dual clip: ratio > 3 with A < 0
    (-1.0, 0.5, "up"),                                                   # 1.2 < ratio < 3, A < 0: unclipped side
])
def test_clipped_loss_gradient(adv, log_ratio, want):
    old = torch.tensor([[0.0, -1.0, -2.0]])
    logp = (old + log_ratio).clone().requires_grad_(True)
    w = torch.tensor([[0.0, 0.5, 0.5]])
    loss, _ = grpo.grpo_loss(logp, old, None, torch.tensor([adv]), w, _loss_cfg())
    loss.backward()
    g = logp.grad[0, 1:]
    assert logp.grad[0, 0] == 0                                    # a token with weight 0 gets no gradient
    if want == "zero":
        assert torch.all(g == 0), g
    elif want == "down":                                           # gradient descent raises logp
        assert torch.all(g < 0), g
    else:
        assert torch.all(g > 0), g


def test_k3_kl():
    logp = torch.tensor([[0.0, -1.0, -0.5]], requires_grad=True)
    w = torch.tensor([[0.0, 1.0, 1.0]])
    cfg = _loss_cfg(beta=0.1)
    loss, st = grpo.grpo_loss(logp, logp.detach(), logp.detach().clone(), torch.tensor([0.0]), w, cfg)
    assert loss.item() == 0 and st["kl"] == 0                     # identical reference: KL 0
    loss.backward()
    assert torch.all(logp.grad == 0)
    ref = torch.tensor([[0.0, -1.5, -0.2]])
    _, st = grpo.grpo_loss(logp.detach(), logp.detach(), ref, torch.tensor([0.0]), w, cfg)
    d = ref[0, 1:] - logp.detach()[0, 1:]
    assert abs(st["kl"] - float((d.exp() - d - 1).sum())) < 1e-6 and st["kl"] > 0


def test_token_mean_and_seq_mean_weights():
    gen = torch.tensor([[False, True, True, True, False], [False, False, True, False, False]])
    w = grpo.token_weights(gen, _loss_cfg(loss="token_mean"), n_tokens=8, n_seqs=4)
    assert torch.allclose(w, gen.float() / 8)
    w = grpo.token_weights(gen, _loss_cfg(loss="seq_mean"), n_tokens=8, n_seqs=4)
    assert torch.allclose(w.sum(1), torch.tensor([0.25, 0.25])) and torch.all(w[~gen] == 0)


# ---- on real trajectories ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trajectories(setup):
    """Sampled multi-turn trajectories of the random tiny model, two zooms forced at the start of turns 1 and 2."""
    net = M.Qwen25VL.from_pretrained(setup["model"]).eval()
    tok = T.Tokenizer.from_pretrained(setup["model"])
    cfg = _cfg(setup, "unused")
    prompts, _ = grpo.load_prompts(setup["data"], cfg)
    prompts = prompts[:2]
    pre = [["<think>a</think> " + call("[10, 10, 60, 50]"), "<think>b</think>" + call("[20, 20, 50, 50]"),
            "<think>c</think> <answer>"]] * 2
    ccfg = cof.CofConfig(do_sample=True, max_new_tokens=60, max_turns=3, invalid="text", **{
        "processor_min_pixels": VIEW["min_pixels"], "processor_max_pixels": VIEW["max_pixels"]})
    trajs = cof.run(net, tok, [p["image"] for p in prompts], [p["question"] for p in prompts], ccfg, group_size=3,
                    generator=torch.Generator().manual_seed(0), messages=[p["messages"] for p in prompts],
                    logits_processor=bench.force_prefixes(tok, pre, group_size=3))
    assert all(t.image_grid_thw.shape[0] == 3 for t in trajs)     # main image + two crops
    return net, tok, cfg, prompts, trajs


def test_training_logprobs_equal_sampling_logprobs(trajectories):
    net, tok, cfg, _, trajs = trajectories
    with torch.no_grad():
        for mb in (trajs[:4], trajs[4:]):                          # right-padded micro-batches of unequal lengths
            logp, gen, _ = grpo.token_logprobs(net, mb, tok, cfg, torch.device("cpu"))
            old = grpo._padded([t.logprobs for t in mb], logp.shape, "cpu")
            assert gen.sum() == sum(t.n_generated for t in mb) > 60
            assert (logp - old)[gen].abs().max() <= 1e-5
            assert torch.all(logp[~gen] == 0)


def test_old_logprobs_from_the_trainer_leave_the_samplers_numbers_to_the_metric(trajectories):
    """--old_logprobs trainer (auto on CUDA, where the training forward runs in bf16 autocast and the rollouts do not):
    the ratio divides by the update's first forward, so sampler log-probs off by any amount change nothing but
    logp_mismatch_max; sampler (auto on the CPU) divides by them, and off ones change the update."""
    import copy

    net, tok, cfg, _, trajs = trajectories
    recs = [dict(adv=a) for a in (1.0, -0.5, 0.3, -1.0, 0.7, -0.2)]
    off = [dataclasses_replace(t, logprobs=[x + 0.5 for x in t.logprobs]) for t in trajs]

    def update(ts, mode):
        m = copy.deepcopy(net).train()
        c = dataclasses_replace(cfg, old_logprobs=mode, ppo_epochs=2, beta=0.0, adam_eps=ADAM_EPS)
        params = [p for p in m.parameters() if p.requires_grad]
        stats = grpo.update(m, trainer.make_optimizer(m, c), params, ts, recs, None, tok, c, 0, 10, torch.device("cpu"))
        return stats, m.state_dict()

    (st_a, a), (st_b, b), (_, c), (_, d), (_, e) = (update(trajs, "trainer"), update(off, "trainer"),
                                                    update(trajs, "sampler"), update(off, "sampler"), update(off, "auto"))
    assert all(torch.equal(a[k], b[k]) for k in a) and st_a["loss"] == st_b["loss"]
    assert st_a["mismatch"] <= 1e-5 and abs(st_b["mismatch"] - 0.5) <= 1e-5
    assert max((a[k] - c[k]).abs().max().item() for k in a) <= 1e-5           # sampler = trainer to 1e-5 here
    assert max((a[k] - d[k]).abs().max().item() for k in a) > 1e-4            # off sampler log-probs: another update
    assert all(torch.equal(d[k], e[k]) for k in d)                            # auto on the CPU: the sampler's


def test_environment_tokens_get_no_gradient(trajectories):
    net, tok, cfg, _, trajs = trajectories
    trajs = sorted(trajs, key=lambda t: len(t.ids))
    trajs = [trajs[0], trajs[len(trajs) // 2], trajs[-1]]              # a right-padded batch: unequal lengths
    assert len(trajs[0].ids) < len(trajs[-1].ids), [len(t.ids) for t in trajs]
    seen = {}

    def keep(module, args, out):      # returns None: the output is not replaced
        out.retain_grad()
        seen["hidden"] = out

    hook = net.model.norm.register_forward_hook(keep)   # the final hidden states, the head's input
    try:
        logp, gen, _ = grpo.token_logprobs(net, trajs[:3], tok, cfg, torch.device("cpu"))
        w = grpo.token_weights(gen, cfg, n_tokens=float(gen.sum()), n_seqs=3)
        loss, _ = grpo.grpo_loss(logp, logp.detach(), None, torch.tensor([1.0, -0.5, 0.3]), w, cfg)
        loss.backward()
    finally:
        hook.remove()
        net.zero_grad(set_to_none=True)
    lens = torch.tensor([len(t.ids) for t in trajs[:3]])
    real = torch.arange(gen.shape[1]) < lens[:, None]               # [B, T]: the right-padded batch's real tokens
    packed = seen["hidden"].grad.abs().sum(-1)                      # [1, real tokens]: the batch runs as one packed row
    assert packed.shape == (1, int(real.sum()))
    g = torch.zeros(real.shape).masked_scatter(real, packed[0])     # [B, T]: position t predicts token t + 1
    predicts_generated = gen[:, 1:]
    assert torch.all(g[:, :-1][~predicts_generated] == 0)          # prompt, crop tokens, USER_PROMPT, error turns
    assert torch.all(g[:, :-1][predicts_generated] > 0)
    n_env = sum(len(t.ids) - t.prompt_len - t.n_generated for t in trajs[:3])
    assert n_env > 3 * 2 * 16                                      # two crop images each (16 tokens a crop at least)


def test_kl_zero_against_an_identical_reference(trajectories, setup):
    net, tok, cfg, _, trajs = trajectories
    ref = M.Qwen25VL.from_pretrained(setup["model"]).eval()
    with torch.no_grad():
        a, gen, _ = grpo.token_logprobs(net, trajs, tok, cfg, torch.device("cpu"))
        b = grpo.reference_logprobs(ref, net, trajs, tok, dataclasses_replace(cfg, micro_batch=len(trajs)),
                                    torch.device("cpu"))[0]
    _, st = grpo.grpo_loss(a, a, b, torch.zeros(len(trajs)), gen.float(), cfg)
    assert st["kl"] == 0.0


def dataclasses_replace(cfg, **kw):
    import dataclasses
    return dataclasses.replace(cfg, **kw)


def test_rewards_of_scored_rollouts(trajectories):
    _, tok, cfg, prompts, trajs = trajectories
    recs = grpo.score_rollouts(trajs, prompts, tok, cfg)
    assert len(recs) == 6 and all(r["zoomed"] and r["n_zooms"] >= 2 for r in recs)
    for r, t in zip(recs, trajs):
        text = tok.decode(t.ids[t.prompt_len:], skip_special_tokens=True)
        assert r["format_ok"] == grpo.format_ok(text) and r["score"] == 0.9 * r["correct"] + 0.1 * r["format_ok"]
        assert r["reward"] == (1.0 if r["correct"] else 0.5)      # every sample zoomed: AGAR's zoom rows


# ---- runs --------------------------------------------------------------------------------------------------------

def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f if '"reward"' in l]


@pytest.mark.parametrize("compiled", [False, True])
def test_resume_is_exact(setup, compiled):
    """Eager rollouts: a resumed run is bit for bit the uninterrupted one. Compiled rollouts: the same samples, and
    losses and weights equal to float rounding: inductor picks its kernels' blocking from the sizes it first compiled
    for, which a resumed process meets at another step, so log-probs can differ in the last bits."""
    from grpo_runner import length_reward
    tag = "compiled" if compiled else "eager"
    full = grpo.train(_cfg(setup, f"full-{tag}", **{"rollout.compile": compiled}), reward_fn=length_reward)
    assert len(full["history"]) == 4 and any(abs(h["loss"]) > 0 for h in full["history"])
    out = setup["root"] / f"resumed-{tag}"
    os.makedirs(out)
    shutil.copytree(setup["root"] / f"full-{tag}" / "ckpt-000002", out / "ckpt-000002")
    res = grpo.train(_cfg(setup, f"resumed-{tag}", resume=str(out / "ckpt-000002"), **{"rollout.compile": compiled}),
                     reward_fn=length_reward)
    assert res["start"] == 2
    same = ("reward", "response_tokens")                            # the same samples either way
    assert [[h[k] for k in same] for h in res["history"]] == [[h[k] for k in same] for h in full["history"][2:]]
    keys = ("loss", "kl", "grad_norm")
    a_hist, b_hist = ([[h[k] for k in keys] for h in r] for r in (full["history"][2:], res["history"]))
    from safetensors.torch import load_file
    a = load_file(str(setup["root"] / f"full-{tag}" / "ckpt-000004" / "trainer" / "trainable.safetensors"))
    b = load_file(str(out / "ckpt-000004" / "trainer" / "trainable.safetensors"))
    if not compiled:
        assert a_hist == b_hist and all(torch.equal(a[k], b[k]) for k in a)
    else:
        assert all(abs(x - y) <= 1e-6 * max(1.0, abs(x)) for ra, rb in zip(a_hist, b_hist) for x, y in zip(ra, rb))
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5      # Adam magnifies tiny gradient gaps
    ref = load_file(str(setup["root"] / f"full-{tag}" / "ckpt-000002" / "trainer" / "trainable.safetensors"))
    assert any(not torch.equal(a[k], ref[k]) for k in a)          # the policy did move


def _run(args, nproc=None, script="tests/grpo_runner.py", check=True):
    return run_script(script, args, nproc, check)


def test_torchrun_two_ranks_equal_one_process(setup):
    """With --rollout_batch 1 every prompt samples from its own generator, so both runs roll out the same tokens; the
    loss is normalised by the global token count, so the updates agree."""
    conf = lambda out: json.dumps(dict(model=setup["model"], data=setup["data"], out=str(setup["root"] / out),  # noqa
                                       max_steps=3, prompts_per_step=4, group_size=3, micro_batch=2, rollout_batch=1,
                                       lr=1e-3, beta=0.01, freeze_vision="no", save_every=0, progress=False, threads=1,
                                       eval_start=False, adam_eps=ADAM_EPS, **LOOPS,
                                       **{"rollout.max_new_tokens": 12, "rollout.max_turns": 3,
                                          "rollout.max_model_len": 1024}))
    _run([conf("one")])
    _run([conf("two")], nproc=2)
    a, b = _losses(str(setup["root"] / "one")), _losses(str(setup["root"] / "two"))
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert x["response_tokens"] == y["response_tokens"] and abs(x["reward"] - y["reward"]) < 1e-9   # same samples
        assert x["zero_var_groups"] < 100                          # the advantages are not all 0
        assert abs(x["loss"] - y["loss"]) <= 1e-5 and abs(x["grad_norm"] - y["grad_norm"]) <= 1e-5 * max(1, x["grad_norm"])
    ref, got = (M.Qwen25VL.from_pretrained(str(setup["root"] / o / "ckpt-000003")).state_dict() for o in ("one", "two"))
    assert max((ref[k] - got[k]).abs().max().item() for k in ref) <= 1e-5


def test_cli_default_reward_logs_per_kind(setup):
    args = ["--model", setup["model"], "--data", setup["data"], "--eval_data", setup["val"], "--out",
            str(setup["root"] / "cli"), "--max_steps", "2", "--prompts_per_step", "4", "--group_size", "2",
            "--micro_batch", "8", "--rollout.max_new_tokens", "8", "--rollout.max_turns", "2", "--eval_n", "4",
            "--eval.max_new_tokens", "8", "--eval.max_turns", "2", "--threads", "1", "--progress", "false"]
    args += [a for k, v in LOOPS.items() for a in (f"--{k}", str(v).lower())]
    _, out, _ = _run(args, script="grpo.py")
    rows = [json.loads(l) for l in open(setup["root"] / "cli" / "metrics.jsonl")]
    train_rows = [r for r in rows if "reward" in r]
    assert len(train_rows) == 2 and all("zero_var_groups" in r and "logp_mismatch_max" in r for r in train_rows)
    assert any(k.endswith("/zoom_rate") and not k.startswith("eval") for k in train_rows[0])
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 2]
    assert "| kind | n | accuracy % before -> after" in out
    assert os.path.getsize(setup["root"] / "cli" / "curves.png") > 1000


@pytest.mark.parametrize("case", ["missing_image", "missing_checkpoint", "not_json"])
def test_one_line_errors(setup, case):
    data, model_dir = setup["data"], setup["model"]
    if case == "missing_image":
        rows = [json.loads(l) for l in open(data)][:3]
        rows[1]["images"] = [{"image": "file://images/train/nope.webp"}]
        data = str(setup["root"] / "synth" / "bad.jsonl")
        open(data, "w").write("".join(json.dumps(r) + "\n" for r in rows))
        want = re.escape(data) + r", row 1, field 'images\[0\]': image .* not found"
    elif case == "missing_checkpoint":
        model_dir = str(setup["root"] / "no" / "such" / "ckpt")
        want = re.escape(repr(model_dir)) + " is not a directory"
    else:
        data = str(setup["root"] / "synth" / "broken.jsonl")
        open(data, "w").write('{"prompt": [\n')
        want = re.escape(data) + ".*line 1 is not valid JSON"
    rc, out, err = _run(["--model", model_dir, "--data", data, "--out", str(setup["root"] / f"err-{case}"),
                         "--max_steps", "1", "--progress", "false"], script="grpo.py", check=False)
    assert rc == 1 and re.search("grpo.py: error: " + want, err), err[-2000:]
    assert "Traceback" not in err


def test_train_question_format_is_the_rl_and_sft_prompt(setup):
    """question_format="train" evaluates with exactly the user text of the SFT and RL rows (a space before
    "Question:"); "released" is the released evaluation's text."""
    rows = [json.loads(l) for l in open(setup["data"])]
    for r in rows[:5]:
        q, label = r["extra_info"]["question"], r["reward_model"]["ground_truth"]
        with_hint = q + cof.LETTER_HINT
        assert "<image>" + cof.question_text(with_hint, "train") == r["prompt"][1]["content"] == cof.rl_prompt(q, label)
        assert cof.question_text(with_hint) == "Question: " + with_hint + cof.USER_PROMPT
    with pytest.raises(ValueError, match="question_format must be one of"):
        cof.CofConfig(question_format="other")


def test_the_built_in_preset_is_a_valid_config(monkeypatch):
    cfg = grpo.parse_args([])
    assert (cfg.max_steps, cfg.group_size, cfg.reward, cfg.freeze_vision) == (150, 6, "agar", "yes")
    assert cfg.threads == grpo.TINY_GRPO_PRESET["threads"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert grpo.parse_args([]).threads == grpo.TINY_GRPO_PRESET["threads"] // 2
    assert grpo.parse_args(["--model", "some/ckpt"]).lr == 1e-6        # a real model gets the released recipe
    # each --seed of the built-in run has its own output (and its own data, tiny model and SFT run: tiny.seeded)
    assert (cfg.out, grpo.parse_args(["--seed", "1"]).out) == ("runs/grpo-tiny", "runs/grpo-tiny-seed1")
    assert sft.parse_args(["--seed", "2"]).out == "runs/sft-tiny-seed2" and sft.parse_args([]).out == "runs/sft-tiny"
    assert grpo.parse_args(["--seed", "1", "--out", "x"]).out == "x"


def test_curves_png_draws_every_panel(tmp_path):
    """plot_metrics draws the trailing-mean curves where their values put them: reward 0.5 at mid-height of its
    panel, the easy zoom rate at 100% on top of its panel."""
    from PIL import Image
    path = tmp_path / "metrics.jsonl"
    rows = [dict(step=s, reward=0.5, **{"easy/zoom_rate": 100.0, "easy/accuracy": 0.0}) for s in range(1, 21)]
    rows += [{"step": 20, "eval/accuracy": 50.0, "eval/easy/accuracy": 50.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    img = Image.open(report.plot_metrics(str(path), str(tmp_path / "c.png"))).convert("RGB")
    assert img.size == (1120, 600)
    mid_reward = (45 + 270) // 2                      # reward panel box: y 45..270, 0.5 -> the middle
    assert any(img.getpixel((x, y)) == (0, 0, 0) for x in range(200, 400) for y in (mid_reward - 1, mid_reward,
                                                                                      mid_reward + 1))
    assert any(img.getpixel((x, 45 + dy)) == (230, 25, 75) for x in range(800, 1000) for dy in (0, 1))  # easy 100%
