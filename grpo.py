"""GRPO for Chain-of-Focus: the RL stage that teaches the SFT model WHEN to zoom (the "Adaptive" in Adaptive-CoF).

Reproduces the released RL stage (verl, `slurm_jobs/rl/run.sh` + `verl/recipe/zoomin/*` + the patched
`verl/trainer/ppo/core_algos.py` of xtong-zhang/Chain-of-Focus):

* prompts: CoF-RL rows (`[system, "<image> Question: ...<hint><USER_PROMPT>"]`), G = 6 samples each at temperature 1.0,
  at most 4 assistant turns, failed tool calls answered by an error text turn (the RL tool);
* reward: 0.9 x accuracy + 0.1 x format on the LAST <answer> (zoomin_reward3.py; its LLM judge is replaced by the
  rule-based evaluate.match_answer), reshaped inside each group by AGAR (adaptive group-aware reward): a correct direct
  answer 1.0 and a correct zoom 0.8 when some direct answer of the group is right, otherwise a correct zoom 1.0; a
  failed zoom 0.5; a failed direct answer 0.1 with good format, else 0.0;
* advantage: (r - group mean) / (group std + 1e-6), unbiased std, the same for every token of the trajectory;
* loss: PPO clipped ratio to the sampling-time log-probs (eps 0.2 / 0.2, dual clip 3 for negative advantages),
  k3 ("low_var_kl") KL to the frozen SFT model with beta 0.001, token mean over the global batch; lr 1e-6 constant.

What is ours: rollouts run through cof.rollouts (one KV cache per conversation, the shared prompt prefilled once per
group), and the loss sees exactly the sampled token ids (no decode/re-encode round trip); the crop images and every
environment token are in the training forward but masked out of the loss.

    python grpo.py                                    # tiny model, synthetic task, from `python sft.py`'s checkpoint
    torchrun --nproc_per_node 8 grpo.py --model SFT_CKPT --data rl.jsonl --eval_data val.jsonl

The shared training machinery (model setup, LoRA, optimizer, distributed, checkpoints, evaluation) is trainer.py's.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import checks
import cof
import crop_kernels as ck
import evaluate as E
import logprobs
import model as M
import report
import sft
import tokenizer as T
import trainer
from data import formats, tiny
from checks import option
from trainer import dist_info, log0


# ------------------------------------------------------------------------------------------------ config

# The rollouts' loop (the released RL recipe): G samples at temperature 1, at most 4 assistant turns, a failed tool
# call answered by an error text turn; decoded through decode.py's compiled step (the same tokens as eager, ~2x faster
# on the CPU default; eager where torch.compile is unavailable or the model is FSDP); the evaluation's image limits.
ROLLOUT_LOOP = replace(trainer.EVAL_LOOP, do_sample=True, max_turns=4, invalid="text", compile=True)


@dataclass
class GRPOConfig(trainer.RunConfig):
    """grpo.py's options: RunConfig plus rollouts, rewards and the loss (defaults = the released RL recipe)."""
    model: str = option("", "the SFT checkpoint to start from (HF format); empty = the built-in default, the checkpoint "
                          "`python sft.py` writes (trained first if it is missing)")
    data: str = option("", "CoF-RL rows (.jsonl / .json / .parquet, CoF-RL-Data's layout); empty = the synthetic set's "
                         "rl_train.jsonl")
    out: str = option("runs/grpo", "output dir: checkpoints ckpt-NNNNNN/, `latest`, metrics.jsonl, eval/")
    epochs: float = option(15.0, "passes over the prompts (released: 15); ignored when --max_steps > 0")
    max_steps: int = option(0, "optimizer steps (one rollout batch each); 0 = derive from --epochs")
    prompts_per_step: int = option(64, "prompts per step over all ranks (released train_batch_size 64)")
    group_size: int = option(6, "samples per prompt, G (released: 6)")
    rollout_batch: int = option(0, "prompts decoded together per rollout call on a rank; 0 = all of the rank's")
    micro_batch: int = option(1, "trajectories per training forward (gradient accumulation over the rest)")
    ppo_epochs: int = option(1, "updates per rollout batch (> 1 reuses it; the ratio stays to the sampling policy)")
    old_logprobs: str = option("auto", "what the PPO ratio divides by: sampler (the log-probs recorded while sampling) | "
                                     "trainer (the update's first forward, before any change: verl's recomputed "
                                     "old_log_prob) | auto: trainer on CUDA, whose training forward runs in bf16 "
                                     "autocast and its rollouts do not; sampler on the CPU (both fp32, equal to 1e-5)")
    lr: float = option(1e-6, "learning rate (released: 1e-6)")
    warmup_ratio: float = option(0.0, "fraction of the steps with linear warmup (released: none)")
    min_lr_ratio: float = option(1.0, "final lr as a fraction of --lr (1.0 = constant, as released)")
    beta: float = option(0.001, "k3 KL coefficient to the frozen start model (released 0.001); 0 = no reference model")
    clip_low: float = option(0.2, "PPO clip epsilon below 1")
    clip_high: float = option(0.2, "PPO clip epsilon above 1 (0.28 = DAPO's clip-higher)")
    clip_dual: float = option(3.0, "dual clip for negative advantages: the loss never exceeds -A x this (verl's "
                                 "clip_ratio_c); 0 = off")
    loss: str = option("token_mean", "token_mean: sum over all generated tokens / their global count (released) | "
                                   "seq_mean: mean per trajectory, then over trajectories (original GRPO)")
    scale_rewards: str = option("group", "group: divide by the group std (GRPO) | none: only subtract the mean (Dr. GRPO)")
    reward: str = option("agar", "agar: the released adaptive group-aware shaping | plain: 0.9 acc + 0.1 format")
    rollout: cof.CofConfig = option(ROLLOUT_LOOP, "the rollouts' zoom loop (cof.CofConfig: --rollout.temperature, "
                                    "--rollout.max_turns, --rollout.max_new_tokens, --rollout.max_model_len, ...); "
                                    "--rollout.system false drops the rows' system turn, as in SFT")
    eval_start: bool = option(True, "evaluate the start model before the first step (the 'before' of the final table)")

    LIMITS = dict(trainer.RunConfig.LIMITS, epochs=(0, True), prompts_per_step=(1, True), group_size=(1, True),
                  rollout_batch=(0, True), micro_batch=(1, True), ppo_epochs=(1, True), beta=(0, True),
                  clip_low=(0, True), clip_high=(0, True), clip_dual=(0, True))
    CHOICES = dict(trainer.RunConfig.CHOICES, loss=("token_mean", "seq_mean"), scale_rewards=("group", "none"),
                   reward=("agar", "plain"), old_logprobs=("auto", "sampler", "trainer"))

    def __post_init__(self):
        super().__post_init__()
        if self.clip_low >= 1:
            raise ValueError(f"--clip_low must be < 1, got {self.clip_low}")
        if 0 < self.clip_dual <= 1:
            raise ValueError(f"--clip_dual must be > 1 (or 0 = off), got {self.clip_dual}")
        checks.number(self.rollout.temperature, "--rollout.temperature", lo=0, lo_open=True)
        if not (self.rollout.do_sample and self.rollout.ban_vision_tokens):
            raise ValueError("--rollout.do_sample and --rollout.ban_vision_tokens must stay true: the update scores "
                             "the sampled tokens under the sampling policy, which bans the vision tokens")
        for name in ("processor_min_pixels", "processor_max_pixels", "system"):
            if getattr(self.rollout, name) != getattr(self.eval, name):
                raise ValueError(f"--rollout.{name} {getattr(self.rollout, name)} and --eval.{name} "
                                 f"{getattr(self.eval, name)} differ: the evaluation must show the model its images "
                                 f"and prompt as the rollouts do; set both")


# The built-in default (`python grpo.py`: the tiny model after `python sft.py`, the synthetic task, a 2-core CPU).
# The learning rate is the tiny model's: it was trained from scratch at 2e-3 (the 7B recipe fine-tunes at 1e-6). The
# vision tower and merger are frozen and beta is 0.01, so the perception the SFT run learnt stays and only the policy
# moves. 150 steps at lr 5e-5 move the edge kind to zooming (+40 points of zoom rate) while every other kind stays
# within about a point in both seeds; at lr 1e-4 or 200 steps the kinds nobody should move drift by 2-3.5 points
# (docs/notes.md has the probes).
TINY_GRPO_PRESET = {"max_steps": 150, "prompts_per_step": 16, "group_size": 6, "micro_batch": 24, "lr": 5e-5,
                    "beta": 0.01, "freeze_vision": "yes", "freeze_merger": True, "rollout.max_new_tokens": 96,
                    "rollout.max_model_len": 1024, "rollout.processor_min_pixels": tiny.TINY_MIN_PIXELS,
                    "rollout.processor_max_pixels": tiny.TINY_MAX_PIXELS, "rollout.system": False,
                    "eval.processor_min_pixels": tiny.TINY_MIN_PIXELS, "eval.processor_max_pixels": tiny.TINY_MAX_PIXELS,
                    "eval.system": False, "eval.max_new_tokens": 96, "eval.question_format": "train", "eval_every": 100,
                    "eval_n": 0, "eval_batch": 100, "save_every": 50, "threads": 2, "out": "runs/grpo-tiny",
                    "overwrite": True}
SFT_DEFAULT_OUT = sft.TINY_PRESET["out"]


def tiny_preset(given):
    """TINY_GRPO_PRESET for a run without --model; under torchrun the threads are divided among the ranks."""
    if given.get("model"):
        return {}
    world = int(os.environ.get("WORLD_SIZE", 1))
    return dict(TINY_GRPO_PRESET, threads=max(1, TINY_GRPO_PRESET["threads"] // world),
                out=tiny.seeded(TINY_GRPO_PRESET["out"], given.get("seed", 0)))


def parse_args(argv=None) -> GRPOConfig:
    return checks.parse_config(GRPOConfig, argv, tiny_preset, __doc__.split("\n\n")[0])


# ------------------------------------------------------------------------------------------------ prompts

def load_prompts(path, cfg):
    """CoF-RL rows -> prompt dicts: image (path), question, label, options, kind, messages (the row's prompt turns,
    the system turn dropped with --rollout.system false, as in SFT). Rows are validated by data.formats.read_rl (a bad row
    raises DataError naming the file and row unless --skip_bad); a row needs exactly one image."""
    rows, n_bad = formats.read_rl(path, skip_bad=cfg.skip_bad)
    prompts = []
    for i, r in enumerate(rows):
        try:
            if len(r["images"]) != 1:
                raise formats.DataError(path, i, "images", f"a CoF-RL prompt has one image, this row has "
                                                           f"{len(r['images'])}")
            try:
                ck.load_image(r["images"][0])
            except (ck.ImageError, ck.ImageTooLargeError) as e:
                raise formats.DataError(path, i, "images[0]", f"{e}; replace the file or pass --skip_bad") from None
        except formats.DataError:
            if not cfg.skip_bad:
                raise
            n_bad += 1
            continue
        messages = formats.to_chat(r["prompt"])
        if not cfg.rollout.system and messages[0]["role"] == "system":
            messages = messages[1:]
        question = r["question"] or messages[-1]["content"][-1].get("text", "")
        prompts.append(dict(image=r["images"][0], question=question, label=r["ground_truth"],
                            options=E.parse_options(question), kind=r["kind"] or "all", messages=messages))
    if not prompts:
        raise formats.DataError(path, None, None, f"no usable rows ({n_bad} bad)")
    return prompts, n_bad


def step_prompts(n_rows, cfg, step, rank, world):
    """Indices of this rank's prompts at `step`: the step takes the next prompts_per_step rows of a permutation
    drawn per (seed, epoch) (the last partial batch of an epoch is dropped), and each rank a contiguous share, so
    every group stays on one rank and a resumed run takes the same prompts."""
    per_epoch = n_rows // cfg.prompts_per_step
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
    rows = perm[k * cfg.prompts_per_step:(k + 1) * cfg.prompts_per_step]                  # [prompts_per_step]
    share = cfg.prompts_per_step // world
    return rows[rank * share:(rank + 1) * share].tolist()


# ------------------------------------------------------------------------------------------------ rewards

RESPONSE_PROMPT = cof.USER_PROMPT.strip()    # the reward strips this (it holds <think>/<answer> tags) from a response


def format_ok(text):
    """The released format rule (zoomin_reward3.format_score) on one response (every turn after the prompt, as
    decoded text): with the user-prompt suffix removed, <think> and </think> occur equally often and at least once,
    <answer> and </answer> likewise, and the last answer is at most 1000 words."""
    text = checks.string(text, "text", empty=True).replace(RESPONSE_PROMPT, "")
    think, answer = (text.count("<think>"), text.count("</think>")), (text.count("<answer>"), text.count("</answer>"))
    return (think[0] == think[1] > 0 and answer[0] == answer[1] > 0
            and len(cof.extract_answer(text).split()) <= 1000)


def accuracy(text, prompt):
    """1.0 when the LAST <answer> of the response (the RL reward's rule, user-prompt suffix removed) is the ground
    truth by evaluate.is_correct (option letter, "(B)", option text; free-form: normalised equality), else 0.0."""
    answer = cof.extract_answer(checks.string(text, "text", empty=True).replace(RESPONSE_PROMPT, ""))
    return float(E.is_correct(prompt, answer))


def agar(correct, zoomed, format_ok):
    """Adaptive group-aware reward (the released compute_grpo_outcome_advantage) for one group: three equal-length
    bool lists (answer right, the response called the tool, format rule passed) -> the shaped scores.

        group has a correct direct answer:  direct right 1.0 > zoom right 0.8 > zoom wrong 0.5 > direct wrong 0.1|0.0
        only zooms are right:               zoom right 1.0 > zoom wrong 0.5 > direct wrong 0.1|0.0
        nobody is right:                    zoom wrong 0.5 > direct wrong 0.1|0.0
    (direct wrong: 0.1 with good format, 0.0 without, i.e. the base score 0.9 acc + 0.1 format it had)."""
    if not len(correct) == len(zoomed) == len(format_ok):
        raise ValueError(f"agar: correct, zoomed and format_ok must have one entry per sample, got lengths "
                         f"{len(correct)}, {len(zoomed)}, {len(format_ok)}")
    direct_right = any(c and not z for c, z in zip(correct, zoomed))
    out = []
    for c, z, f in zip(correct, zoomed, format_ok):
        if c:
            out.append(0.8 if z and direct_right else 1.0)
        else:
            out.append(0.5 if z else 0.1 if f else 0.0)
    return out


def group_advantages(rewards, group_size, eps=1e-6, scale=True):
    """rewards [num_groups * G] (a group's samples adjacent) -> (r - group mean) / (group std + eps) with the unbiased
    std (r - mean when scale=False), same shape. A group of one, or whose rewards are all equal, gets 0 (verl gives
    a group of one its raw score; with nothing to compare it to we give it no signal)."""
    checks.number(group_size, "group_size", lo=1, whole=True)
    if rewards.numel() % group_size or not bool(torch.isfinite(rewards).all()):
        raise ValueError(f"rewards must be finite, whole groups of group_size {group_size}, got {rewards.tolist()!r:.200}")
    r = rewards.float().view(-1, group_size)                                               # [groups, G]
    if group_size == 1:
        return torch.zeros_like(rewards, dtype=torch.float32)
    centred = r - r.mean(1, keepdim=True)
    adv = centred / (r.std(1, keepdim=True) + eps) if scale else centred
    same = (r.max(1, keepdim=True).values == r.min(1, keepdim=True).values)                # [groups, 1]
    return torch.where(same, torch.zeros_like(adv), adv).view(-1)


def score_rollouts(trajs, prompts, tokenizer, cfg, reward_fn=None):
    """Per trajectory: the response text, accuracy, format, whether it zoomed, the base score 0.9 acc + 0.1 format
    and the reward (shaped per group by AGAR, --reward plain keeps the base score, or `reward_fn(records)` for a
    group's records -> rewards). trajs: G per prompt, question-major. Returns a list of record dicts."""
    G = cfg.group_size
    recs = []
    for t in trajs:
        p = prompts[t.group]
        text = tokenizer.decode(t.ids[t.prompt_len:], skip_special_tokens=True)
        acc, fmt = accuracy(text, p), format_ok(text)
        recs.append(dict(kind=p["kind"], correct=acc == 1.0, format_ok=fmt, zoomed="<tool_call>" in text,
                         n_zooms=t.n_zooms, n_generated=t.n_generated, score=0.9 * acc + 0.1 * fmt, response=text))
    for g in range(0, len(recs), G):
        grp = recs[g:g + G]
        if reward_fn is not None:
            rewards = check_rewards(reward_fn(grp), len(grp))
        elif cfg.reward == "agar" and G > 1:
            rewards = agar([r["correct"] for r in grp], [r["zoomed"] for r in grp], [r["format_ok"] for r in grp])
        else:
            rewards = [r["score"] for r in grp]
        for r, x in zip(grp, rewards):
            r["reward"] = float(x)
    return recs


def check_rewards(rewards, n):
    """The rewards a reward_fn returned for a group of n records, as floats: one finite number per record, in order
    (a short list would leave records unrewarded, a long one be cut silently, NaN would end in a loss error)."""
    if isinstance(rewards, torch.Tensor):
        rewards = rewards.tolist()
    try:
        rewards = checks.sequence(rewards, "reward_fn's result", empty=True)
    except TypeError as e:
        raise TypeError(f"{e}; reward_fn(records) must return one number per record") from None
    if len(rewards) != n:
        raise ValueError(f"reward_fn returned {len(rewards)} rewards for a group of {n} records; it must return one "
                         f"number per record, in order")
    return [float(checks.number(r, f"reward_fn's reward {i}")) for i, r in enumerate(rewards)]


# ------------------------------------------------------------------------------------------------ the loss

def token_logprobs(model, trajs, tokenizer, cfg, device, with_entropy=False):
    """One teacher-forced forward over a micro-batch of trajectories (right-padded, every image of every turn) ->
    log p of each token under the policy the sampler used (logprobs.policy_log_softmax: banned vision tokens,
    temperature), as [B, T] with 0 where there is no generated token; the generated-token mask [B, T]; and the
    policy's entropy at the generated tokens [N] (no gradient) when asked. Position t holds the log-prob of token t
    (predicted at t-1). Only the generated tokens go through the head, in chunks (logprobs.token_logprobs)."""
    B, T = len(trajs), max(len(t.ids) for t in trajs)
    ids = torch.full((B, T), tokenizer.pad_id, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.long)
    gen = torch.zeros(B, T, dtype=torch.bool)
    for b, t in enumerate(trajs):
        ids[b, :len(t.ids)], attn[b, :len(t.ids)] = torch.tensor(t.ids), 1
        gen[b, :len(t.ids)] = torch.tensor(t.gen_mask)
    ids, attn, gen = ids.to(device), attn.to(device), gen.to(device)
    targets = F.pad(torch.where(gen[:, 1:], ids[:, 1:], -1), (0, 1), value=-1)   # [B, T] position t scores token t+1
    with trainer.autocast(device):
        lp, ent = model(ids, pixel_values=torch.cat([t.pixel_values for t in trajs]).to(device),
                        image_grid_thw=torch.cat([t.image_grid_thw for t in trajs]), attention_mask=attn,
                        targets=targets, banned=cof.vision_token_ids(tokenizer), temperature=cfg.rollout.temperature,
                        entropy=with_entropy)                                    # [B, T] at the predicting position
    logp = F.pad(lp[:, :-1], (1, 0))                                             # [B, T] at the token
    return logp, gen, None if ent is None else ent[:, :-1][gen[:, 1:]]           # [N]


def grpo_loss(logp, old_logp, ref_logp, adv, weight, cfg):
    """The GRPO objective of one micro-batch, as its share of the global loss.

    logp [B, T]: log pi_theta(o_t) now; old_logp [B, T]: at sampling time; ref_logp [B, T] or None: under the frozen
    reference; adv [B]: the trajectory's advantage; weight [B, T]: 1 / (global token count) on generated tokens for
    token_mean, 1 / (global trajectory count x this trajectory's token count) for seq_mean, 0 elsewhere.

        ratio_t = exp(logp - old_logp)                                       (log-ratio clamped to +-20, as verl)
        pg_t    = max(-A ratio_t, -A clip(ratio_t, 1 - eps_low, 1 + eps_high)),  and min(pg_t, -A c) where A < 0
        kl_t    = exp(ref - logp) - (ref - logp) - 1                         (k3 / low_var_kl, clamped as verl)
        loss    = sum_t weight_t (pg_t + beta kl_t)
    Returns (loss, stats): stats are sums over the weighted tokens (clip fractions, kl) for logging.
    """
    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)                         # [B, T]
    ratio = log_ratio.exp()                                                  # [B, T]
    a = adv[:, None]                                                         # [B, 1]
    pg = torch.maximum(-a * ratio, -a * ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high))    # [B, T]
    if cfg.clip_dual > 0:
        pg = torch.where(a < 0, torch.minimum(pg, -a * cfg.clip_dual), pg)   # [B, T]
    per_token = pg
    kl = torch.zeros_like(logp)
    if ref_logp is not None and cfg.beta > 0:
        d = (ref_logp - logp).clamp(-20.0, 20.0)                             # [B, T]
        kl = (d.exp() - d - 1).clamp(-10.0, 10.0)                            # [B, T]
        per_token = per_token + cfg.beta * kl
    loss = (per_token * weight).sum()
    with torch.no_grad():
        on = weight > 0
        stats = dict(clip_low=float(((ratio < 1 - cfg.clip_low) & (a < 0) & on).sum()),
                     clip_high=float(((ratio > 1 + cfg.clip_high) & (a > 0) & on).sum()),
                     kl=float((kl * on).sum()), tokens=float(on.sum()))
    return loss, stats


def token_weights(gen, cfg, n_tokens, n_seqs):
    """weight [B, T] of grpo_loss: the loss aggregation as a per-token weight (see there). gen [B, T]: generated."""
    w = gen.float()                                                          # [B, T] (token 0 is never generated)
    if cfg.loss == "token_mean":
        return w / n_tokens
    return w / (w.sum(1, keepdim=True).clamp_min(1) * n_seqs)


# ------------------------------------------------------------------------------------------------ one step

def rollout(raw, tokenizer, prompts, idx, cfg, step, device):
    """G sampled trajectories for each of this rank's prompts `idx` (question-major), through the CoF loop, in calls
    of --rollout_batch prompts. Each call samples from its own generator seeded by (seed, step, its first prompt's
    row), so a resumed run samples the same tokens, and with --rollout_batch 1 so does any number of ranks."""
    was_training, unshard = raw.training, trainer.is_fsdp(raw)
    ccfg = replace(cfg.rollout, compile=cfg.rollout.compile and not unshard,
                   cuda_graphs=cfg.rollout.cuda_graphs and not unshard)
    chunk = cfg.rollout_batch or len(idx)
    raw.eval()
    if unshard:
        raw.unshard()
    trajs = []
    try:
        for i in range(0, len(idx), chunk):
            part = [prompts[j] for j in idx[i:i + chunk]]
            gen = torch.Generator(device=device).manual_seed((cfg.seed * 1_000_003 + step) * 1_000_003 + idx[i])
            out = cof.rollouts(raw, tokenizer, [p["image"] for p in part], [p["question"] for p in part],
                               cfg.group_size, ccfg, generator=gen, messages=[p["messages"] for p in part])
            for t in out:
                t.group += i
            trajs += out
    finally:
        if unshard:
            raw.reshard()
        raw.train(was_training)
    return trajs


def reference_logprobs(ref, raw, trajs, tokenizer, cfg, device):
    """log p of every trajectory's tokens under the frozen reference ([B, T] per micro-batch): a separate model, or
    for LoRA the policy with its adapters switched off. None when beta is 0."""
    if cfg.beta == 0:
        return None
    out = []
    with torch.no_grad(), (trainer.lora_off(raw) if ref is None else contextlib.nullcontext()):
        net = raw if ref is None else ref
        for i in range(0, len(trajs), cfg.micro_batch):
            out.append(token_logprobs(net, trajs[i:i + cfg.micro_batch], tokenizer, cfg, device)[0])
    return out


def update(model, optimizer, params, trajs, recs, ref_lp, tokenizer, cfg, step, total, device):
    """--ppo_epochs optimizer steps over this rank's trajectories (micro-batches of --micro_batch), each normalised
    by the global token (or trajectory) count. Returns the step's loss statistics."""
    world = dist_info()[1]
    adv = torch.tensor([r["adv"] for r in recs], dtype=torch.float32)
    counts = trainer.all_reduce_sum(torch.tensor([sum(t.n_generated for t in trajs), len(trajs)], dtype=torch.float64))
    n_tokens, n_seqs = counts.tolist()
    lr = trainer.set_lr(optimizer, step, total, cfg)
    stats = dict(loss=0.0, clip_low=0.0, clip_high=0.0, kl=0.0, tokens=0.0, entropy=0.0, mismatch=0.0, grad_norm=0.0)
    trainer_old = cfg.old_logprobs == "trainer" or (cfg.old_logprobs == "auto" and device.type == "cuda")
    first = []                                   # epoch 0's log-probs per micro-batch: the policy before this update
    for epoch in range(cfg.ppo_epochs):
        chunks = range(0, len(trajs), cfg.micro_batch)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for j, i in enumerate(chunks):
            mb = trajs[i:i + cfg.micro_batch]
            with trainer.grad_sync(model, j == len(chunks) - 1):
                logp, gen, ent = token_logprobs(model, mb, tokenizer, cfg, device, with_entropy=epoch == 0)
                sampled = _padded([t.logprobs for t in mb], logp.shape, device)                  # [B, T]
                if epoch == 0:
                    first.append(logp.detach())                                                  # [B, T]
                old = first[j] if trainer_old else sampled                                       # [B, T]
                ref = ref_lp[j] if ref_lp is not None else None
                w = token_weights(gen, cfg, n_tokens, n_seqs)
                loss, st = grpo_loss(logp, old, ref, adv[i:i + len(mb)].to(device), w, cfg)
                (loss * world).backward()        # DDP / FSDP average over ranks; the loss is already a global share
            loss_sum += loss.detach().double().cpu()
            if epoch == 0:                   # before any update: KL, entropy, sampler vs trainer log-probs
                on = w > 0
                stats["mismatch"] = max(stats["mismatch"], float((logp.detach() - sampled).abs()[on].max())
                                        if on.any() else 0.0)
                stats["entropy"] += float(ent.sum())
                stats["kl"] += st["kl"]
                stats["tokens"] += st["tokens"]
            if epoch == cfg.ppo_epochs - 1:      # clipping only bites after an update (ppo_epochs > 1)
                stats["clip_low"] += st["clip_low"]
                stats["clip_high"] += st["clip_high"]
        loss_val = float(trainer.all_reduce_sum(loss_sum))
        stats["grad_norm"] = trainer.optimizer_step(params, optimizer, cfg, step, loss_val)
        stats["loss"] = loss_val if epoch == 0 else stats["loss"]
    stats["lr"] = lr
    return stats


def _padded(rows, shape, device):
    out = torch.zeros(shape)
    for b, r in enumerate(rows):
        out[b, :len(r)] = torch.tensor(r)
    return out.to(device)


def step_metrics(recs, stats, kinds, times):
    """The step's numbers over all ranks: reward, accuracy, format, zoom rate and mean zooms overall and per question
    kind, response length, share of groups with zero reward variance, and the loss statistics."""
    sums = dict(n=0.0, reward=0.0, score=0.0, correct=0.0, format_ok=0.0, n_generated=0.0, zoomed=0.0, n_zooms=0.0)
    for k in kinds:
        sums.update({f"{k}/n": 0.0, f"{k}/correct": 0.0, f"{k}/zoomed": 0.0, f"{k}/n_zooms": 0.0})
    for r in recs:
        for key in ("reward", "score", "correct", "format_ok", "n_generated", "zoomed", "n_zooms"):
            sums[key] += float(r[key])
        sums["n"] += 1
        for key in ("n", "correct", "zoomed", "n_zooms"):
            sums[f"{r['kind']}/{key}"] += 1.0 if key == "n" else float(r[key])
    for key in ("zero_var", "groups", "clip_low", "clip_high", "kl", "entropy", "tokens"):
        sums[key] = stats[key]
    keys = list(sums)                       # the same keys in the same order on every rank
    sums = dict(zip(keys, trainer.all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64)).tolist()))
    mismatch = torch.tensor([stats["mismatch"]])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(mismatch, op=dist.ReduceOp.MAX)
    n, tok = sums["n"], max(1.0, sums["tokens"])
    m = dict(reward=sums["reward"] / n, score=sums["score"] / n, accuracy=100 * sums["correct"] / n,
             format_rate=100 * sums["format_ok"] / n, zoom_rate=100 * sums["zoomed"] / n, mean_zooms=sums["n_zooms"] / n,
             response_tokens=sums["n_generated"] / n)
    for k in kinds:
        if sums[f"{k}/n"]:
            c = sums[f"{k}/n"]
            m.update({f"{k}/accuracy": 100 * sums[f"{k}/correct"] / c, f"{k}/zoom_rate": 100 * sums[f"{k}/zoomed"] / c,
                      f"{k}/mean_zooms": sums[f"{k}/n_zooms"] / c, f"{k}/n": int(c)})
    m.update(zero_var_groups=100 * sums["zero_var"] / max(1.0, sums["groups"]), clip_low=100 * sums["clip_low"] / tok,
             clip_high=100 * sums["clip_high"] / tok, kl=sums["kl"] / tok, entropy=sums["entropy"] / tok,
             logp_mismatch_max=mismatch.item(), loss=stats["loss"], grad_norm=stats["grad_norm"], lr=stats["lr"],
             **{f"s_{k}": v for k, v in times.items()})
    return m


# ------------------------------------------------------------------------------------------------ the run

def train(cfg: GRPOConfig, reward_fn=None) -> dict:
    """Run GRPO as configured. reward_fn: optional fn(group records) -> rewards replacing AGAR / the plain score (a
    record has kind, correct, format_ok, zoomed, n_zooms, n_generated, score, response; see check_rewards). Returns a
    summary dict."""
    checks.kind(cfg, "cfg", GRPOConfig, "a GRPOConfig")
    if reward_fn is not None and not callable(reward_fn):
        raise TypeError(f"reward_fn must be a function of a group's records, got {type(reward_fn).__name__}")
    device = trainer.start_run(cfg, "GRPOConfig")
    rank, world, _ = dist_info()
    model_path, data_path, eval_path = prepare_defaults(cfg)
    trainer.seed_all(cfg.seed)
    tokenizer = T.Tokenizer.from_pretrained(model_path)
    prompts, n_bad = load_prompts(data_path, cfg)
    per_kind = Counter(p["kind"] for p in prompts)
    kinds = sorted(per_kind)
    log0(f"data: {len(prompts)} prompts from {data_path}" + (f", {n_bad} bad rows skipped" if n_bad else "")
         + " (" + ", ".join(f"{k} {per_kind[k]}" for k in kinds) + ")")
    if cfg.prompts_per_step % world or cfg.prompts_per_step > len(prompts):
        raise trainer.RunError(f"--prompts_per_step {cfg.prompts_per_step} must be a multiple of the {world} rank(s) and at "
                         f"most the {len(prompts)} prompts")
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * (len(prompts) // cfg.prompts_per_step)))
    ckpt, start = trainer.resume_point(cfg, dict(prompts_per_step=cfg.prompts_per_step, group_size=cfg.group_size,
                                                     n_rows=len(prompts)))
    raw = trainer.build_policy(cfg, model_path, device, pretrained=bool(cfg.model), ckpt=ckpt)
    ref = None
    if cfg.beta > 0 and cfg.lora_rank == 0:     # the frozen start model (with LoRA: the policy without adapters)
        ref = M.Qwen25VL.from_pretrained(model_path, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                                         device=device).eval()
        ref.requires_grad_(False)
    model = trainer.distribute(raw, cfg, device)
    optimizer = trainer.make_optimizer(raw, cfg)
    if ckpt is not None:
        trainer.load_optimizer(raw, optimizer, ckpt)
        trainer.load_rng(ckpt)
    os.makedirs(cfg.out, exist_ok=True)
    metrics = trainer.Metrics(os.path.join(cfg.out, "metrics.jsonl"), start)
    params = [p for p in raw.parameters() if p.requires_grad]
    extra = dict(prompts_per_step=cfg.prompts_per_step, group_size=cfg.group_size, n_rows=len(prompts), total=total,
                 model=model_path, data=data_path)
    evals, last_ckpt, history = {}, None, []
    if eval_path and cfg.eval_start and start == 0:
        evals[0] = trainer.run_eval(raw, tokenizer, eval_path, cfg, 0, metrics)
    bar = report.Progress(total, "grpo", start=start, enabled=cfg.progress and rank == 0)
    t_run = time.time()
    for step in range(start, total):
        m = grpo_step(model, raw, ref, optimizer, params, tokenizer, prompts, kinds, cfg, step, total, device,
                      reward_fn)
        m.update(step=step + 1, elapsed_s=time.time() - t_run)
        history.append(m)
        if (step + 1) % cfg.log_every == 0 or step + 1 == total:
            metrics.log(**m)
        bar.update(1, reward=round(m["reward"], 3), acc=f"{m['accuracy']:.0f}%", zoom=f"{m['zoom_rate']:.0f}%",
                   kl=m["kl"])
        done = step + 1 == total
        if eval_path and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or done):
            bar.close()
            evals[step + 1] = trainer.run_eval(raw, tokenizer, eval_path, cfg, step + 1, metrics)
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or done:
            last_ckpt = trainer.save_checkpoint(raw, optimizer, step + 1, cfg, extra)
    bar.close()
    if 0 in evals and total in evals and rank == 0:
        table = before_after(evals[0], evals[total], model_path, last_ckpt)
        print(table, flush=True)
        Path(cfg.out, "before_after.md").write_text(table + "\n")
    if rank == 0 and history:
        report.plot_metrics(os.path.join(cfg.out, "metrics.jsonl"), os.path.join(cfg.out, "curves.png"))
    if last_ckpt is not None:
        log0(f"checkpoint: {last_ckpt} (HF format: loads with model.Qwen25VL.from_pretrained and transformers)")
    return dict(checkpoint=str(last_ckpt) if last_ckpt else None, eval=evals, history=history, start=start,
                total=total, n_bad=n_bad, seconds=time.time() - t_run)


def grpo_step(model, raw, ref, optimizer, params, tokenizer, prompts, kinds, cfg, step, total, device, reward_fn):
    """Rollouts for this rank's prompts -> rewards -> group advantages -> reference log-probs -> update."""
    rank, world, _ = dist_info()
    t0 = time.time()
    idx = step_prompts(len(prompts), cfg, step, rank, world)
    local = [prompts[i] for i in idx]
    trajs = rollout(raw, tokenizer, prompts, idx, cfg, step, device)
    recs = score_rollouts(trajs, local, tokenizer, cfg, reward_fn)
    rewards = torch.tensor([r["reward"] for r in recs])                                    # [n_prompts * G]
    adv = group_advantages(rewards, cfg.group_size, scale=cfg.scale_rewards == "group")
    for r, a in zip(recs, adv.tolist()):
        r["adv"] = a
    grouped = rewards.view(-1, cfg.group_size)
    zero_var = float((grouped.max(1).values == grouped.min(1).values).sum())
    t1 = time.time()
    order = sorted(range(len(trajs)), key=lambda i: len(trajs[i].ids))      # micro-batches of similar length
    trajs, recs = [trajs[i] for i in order], [recs[i] for i in order]
    ref_lp = reference_logprobs(ref, raw, trajs, tokenizer, cfg, device)
    t2 = time.time()
    stats = update(model, optimizer, params, trajs, recs, ref_lp, tokenizer, cfg, step, total, device)
    stats.update(zero_var=zero_var, groups=float(len(idx)))
    return step_metrics(recs, stats, kinds, dict(rollout=t1 - t0, reference=t2 - t1, update=time.time() - t2))


def before_after(before, after, start_path, end_path):
    """Markdown table: the start model and the trained one on the same held-out questions, per question kind."""
    cols = [("accuracy", "accuracy %", "{:.1f}"), ("zoom_rate", "zoom rate %", "{:.1f}"),
            ("mean_zooms", "mean zooms", "{:.2f}"), ("direct_share", "answered directly %", "{:.1f}"),
            ("direct_accuracy", "direct answers right %", "{:.1f}"), ("gen_tokens", "tokens / question", "{:.1f}")]
    lines = [f"before: {start_path}  after: {end_path}  ({before['n']} held-out questions, greedy CoF loop)", "",
             "| kind | n | " + " | ".join(f"{c[1]} before -> after" for c in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for b, a in zip(before["kinds"], after["kinds"]):
        cells = [f"{c[2].format(b[c[0]])} -> {c[2].format(a[c[0]])}" for c in cols]
        lines.append(f"| {b['kind']} | {b['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ built-in default

def prepare_defaults(cfg):
    """Paths of (start model, RL rows, held-out records). Without --model: the checkpoint `python sft.py` writes;
    if it is missing or unfinished it is trained (or its run continued) first with sft.py's defaults. Without
    --data: the synthetic set's rl_train.jsonl (built if missing), with its val split for evaluation."""
    model_path, data_path, eval_path = cfg.model, cfg.data, cfg.eval_data
    if not cfg.data:
        _, held_out = trainer.synthetic_data(cfg.seed)
        data_path = os.path.join(tiny.seeded(tiny.SYNTH_DIR, cfg.seed), "rl_train.jsonl")
        eval_path = eval_path or held_out
    if not cfg.model:
        model_path = default_sft_checkpoint(cfg.seed)
    return model_path, data_path, eval_path


def default_sft_checkpoint(seed=0):
    """The finished checkpoint of the default SFT run of `seed` (runs/sft-tiny/latest for seed 0), trained first when
    there is none."""
    out = tiny.seeded(SFT_DEFAULT_OUT, seed)
    found = _finished(out)
    if found is None:
        log0(f"no finished SFT checkpoint in {out}: training it first with sft.py's defaults "
             f"(`python sft.py --seed {seed}`, ~16 minutes on 2 CPU cores under torchrun)")
        sft.train(sft.parse_args(["--resume", "auto", "--seed", str(seed)]))
        found = _finished(out)
        if found is None:
            raise RuntimeError(f"sft.py finished but {out}/latest names no finished checkpoint")
    log0(f"start model: {found} (the default SFT run)")
    return str(found)


def _finished(out):
    latest = Path(out) / "latest"
    if not latest.is_file():
        return None
    ckpt = Path(out) / latest.read_text(encoding="utf-8", errors="replace").strip()
    try:
        state = trainer.read_state(ckpt)
    except (trainer.RunError, OSError):
        return None
    return ckpt if state.get("step") == state.get("total") and (ckpt / "model.safetensors").is_file() else None


def main(argv=None):
    trainer.run_cli(train, parse_args(argv), "grpo.py", errors=(sft.BadRow,))


if __name__ == "__main__":
    main()
