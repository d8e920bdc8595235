"""Supervised fine-tuning of Qwen2.5-VL on Chain-of-Focus trajectories, from one CPU process to torchrun.

Reproduces the released CoF SFT stage (LLaMA-Factory, `configs/sft_lora-7b.yaml` in xtong-zhang/Chain-of-Focus):
ShareGPT rows with `<image>` placeholders rendered with the qwen2_vl chat template, loss on assistant tokens only
(their closing <|im_end|> included) with <|image_pad|> tokens masked, AdamW, cosine schedule with warmup, vision tower
frozen, optional LoRA on all linear layers of the language model. What is ours: the loss is normalised by the number
of label tokens in the whole global batch (all ranks, all accumulation steps), so `torchrun --nproc_per_node=N` gives
the update of one process with the same global batch.

    python sft.py                                  # synthetic task + tiny model on the CPU, then CoF evaluation
    python sft.py --model DIR --data rows.json     # real checkpoint; torchrun ... sft.py --dist fsdp for big models

`python sft.py --help` lists every option. This file is SFT itself: its options, rows -> token ids and labels, the
pixels (crop_kernels.processor_resize, patchify), batches, the loss, one step and the loop; what grpo.py shares
(options, LoRA and freezing, optimizer, checkpoints and exact resume, metrics, the CoF-loop evaluation) is trainer.py.

Labels stop at each assistant turn's <|im_end|>. LLaMA-Factory's qwen2_vl template (what the released SFT used) also
labels the "\n" after it; we do not: generation stops at <|im_end|> and the environment writes that "\n", so the
label set is exactly the tokens the model samples in the zoom loop (and grpo.py's generated-token mask).
"""
from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

import checks
import crop_kernels as ck
import report
import tokenizer as T
import trainer
from data import formats, tiny

IGNORE = -100  # label value that the loss skips (PyTorch's cross_entropy default ignore_index)


@dataclass
class TrainConfig(trainer.RunConfig):
    """sft.py's options: trainer.RunConfig plus the SFT data, batch and loss options (defaults = the released recipe)."""
    data: str = checks.option("", "CoF SFT JSON (ShareGPT rows with <image> placeholders); empty = build the synthetic set")
    out: str = checks.option("runs/sft", "output dir: checkpoints ckpt-NNNNNN/, `latest`, metrics.jsonl")
    epochs: float = checks.option(3.0, "passes over the training rows (ignored when --max_steps > 0)")
    max_steps: int = checks.option(0, "optimizer steps to run; 0 = derive from --epochs")
    batch_size: int = checks.option(2, "rows per micro-batch per rank")
    grad_accum: int = checks.option(2, "micro-batches per optimizer step; global batch = batch_size * grad_accum * ranks")
    group_by_length: bool = checks.option(True, "sort each step's rows by length before cutting them into micro-batches: "
                                         "less padding, the same rows and the same loss per step")
    max_len: int = checks.option(16384, "longest allowed sample in tokens (images included); longer rows are bad data")
    answer_weight: float = checks.option(1.0, "loss weight of tokens in final-answer turns (turns with no <tool_call>)")
    workers: int = checks.option(0, "DataLoader worker processes for image decoding")
    eval_no_zoom: bool = checks.option(True, "also evaluate with the zoom tool banned (forced direct answers) at the end")

    LIMITS = dict(trainer.RunConfig.LIMITS, epochs=(0, True), batch_size=(1, True), grad_accum=(1, True),
                  max_len=(1, True), answer_weight=(0, True), workers=(0, True))

    def __post_init__(self):   # the training images are resized to the evaluation loop's processor limits
        super().__post_init__()
        if None in (self.eval.processor_min_pixels, self.eval.processor_max_pixels):
            raise ValueError("SFT needs numbers for --eval.processor_min_pixels and --eval.processor_max_pixels")


# The built-in default run (`python sft.py`, any run without --model: the synthetic task, the tiny model of data/tiny.py
# from scratch) sets these options where the command line does not; every image's view is capped at 112 x 112 px
# (data/agent.py TINY_VIEW_MAX_PIXELS), which is what makes zooming necessary.
TINY_PRESET = {"epochs": 0.0, "max_steps": 3000, "batch_size": 8, "grad_accum": 4, "lr": 2e-3, "warmup_ratio": 0.05,
               "min_lr_ratio": 0.05, "weight_decay": 0.0, "clip_grad": 1.0, "max_len": 1024, "answer_weight": 4.0,
               "eval.processor_min_pixels": tiny.TINY_MIN_PIXELS, "eval.processor_max_pixels": tiny.TINY_MAX_PIXELS,
               "eval.system": False, "eval.max_new_tokens": 96, "eval.question_format": "train", "eval_every": 1500,
               "eval_n": 0, "eval_batch": 100, "save_every": 500, "threads": 2, "out": "runs/sft-tiny", "overwrite": True}


def tiny_preset(given):
    """TINY_PRESET for a run without --model; under torchrun the accumulation steps and threads are divided among
    the ranks, so `torchrun --nproc_per_node=N sft.py` makes the same global batch (the same run) as `python sft.py`.
    Another --seed writes to its own --out (tiny.seeded)."""
    if given.get("model"):
        return {}
    world = int(os.environ.get("WORLD_SIZE", 1))
    preset = dict(TINY_PRESET, out=tiny.seeded(TINY_PRESET["out"], given.get("seed", 0)))
    if TINY_PRESET["grad_accum"] % world == 0:
        preset["grad_accum"] = TINY_PRESET["grad_accum"] // world
    preset["threads"] = max(1, TINY_PRESET["threads"] // world)
    return preset


def parse_args(argv=None) -> TrainConfig:
    """TrainConfig from the command line; without --model the tiny preset fills the options not given (the tiny
    model is trained from scratch)."""
    return checks.parse_config(TrainConfig, argv, tiny_preset, __doc__.split("\n\n")[0])


# ------------------------------------------------------------------------------------------------ data

class BadRow(ValueError):
    """A training row that cannot be used; the message names the file and the row."""


def image_grid(path, cfg) -> tuple:
    """(t, h, w) patch grid of one image as preprocess_image will make it, from the file header only."""
    with Image.open(path) as im:
        w, h = im.size   # EXIF rotation would swap h and w; the token count h*w/4 does not change
    rh, rw = ck.smart_resize(h, w, ck.FACTOR, cfg.eval.processor_min_pixels, cfg.eval.processor_max_pixels)
    return (1, rh // ck.PATCH_SIZE, rw // ck.PATCH_SIZE)


def render(row, tokenizer, grids, answer_weight=1.0, system=True):
    """One row -> (input_ids, labels, weights) as lists. Labels are the token itself on assistant tokens (the closing
    <|im_end|> included) and IGNORE elsewhere; <|image_pad|> is never a label. `weights` is the loss weight of each
    label: `answer_weight` in assistant turns without a <tool_call> (final answers), 1 in the others."""
    messages = row["messages"][1:] if not system and row["messages"][0]["role"] == "system" else row["messages"]
    ids, amask = T.tokenize_chat(tokenizer, formats.to_chat(messages), image_grid_thw=torch.tensor(grids).view(-1, 3)
                               if grids else None)
    turn_w = [answer_weight if "<tool_call>" not in _text(m["content"]) else 1.0
              for m in row["messages"] if m["role"] == "assistant"]
    labels, weights, turn, prev = [], [], -1, False
    for tok, is_asst in zip(ids, amask):
        if is_asst and not prev:
            turn += 1   # each run of assistant tokens is the next assistant turn
        prev = is_asst
        keep = is_asst and tok != tokenizer.image_pad_id
        labels.append(tok if keep else IGNORE)
        weights.append(turn_w[min(turn, len(turn_w) - 1)] if keep else 0.0)
    return ids, labels, weights


def _text(content):
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


def load_rows(path, tokenizer, cfg):
    """Read and validate every row before training starts. data.formats.read_sft checks the format (missing image,
    placeholder/image count mismatch, unknown role, paths outside the dataset, special-token text); here every image
    is decoded (a file that is not an image, or is cut short, is found now, not mid-training) and each row is
    rendered to find over-long samples. Returns (rows, n_bad); a bad row raises BadRow/DataError unless --skip_bad."""
    rows, n_bad = formats.read_sft(path, skip_bad=cfg.skip_bad)
    kept = []
    for i, row in enumerate(rows):
        where = f"{path}, row {row.get('row', i)}"
        try:
            for k, p in enumerate(row["images"]):
                try:
                    ck.load_image(p)
                except (ck.ImageError, ck.ImageTooLargeError) as e:
                    raise BadRow(f"{where}, images[{k}]: {e}; replace the file or pass --skip_bad") from None
            grids = [image_grid(p, cfg) for p in row["images"]]
            ids, labels, weights = render(row, tokenizer, grids, cfg.answer_weight, cfg.eval.system)
            if len(ids) > cfg.max_len:
                raise BadRow(f"{where}: sample is {len(ids)} tokens (images included), longer than --max_len "
                             f"{cfg.max_len}; raise --max_len, lower --eval.processor_max_pixels or drop it: --skip_bad")
            if not any(l != IGNORE for l in labels):
                raise BadRow(f"{where}: no assistant tokens to learn from; add an assistant turn or --skip_bad")
            row["tokens"] = dict(input_ids=torch.tensor(ids, dtype=torch.int32), grids=grids,   # rendered once, here
                                 labels=torch.tensor(labels, dtype=torch.int32), weights=torch.tensor(weights))
        except BadRow:
            if not cfg.skip_bad:
                raise
            n_bad += 1
            continue
        kept.append(row)
    if not kept:
        raise BadRow(f"{path}: no usable rows ({n_bad} bad)")
    return kept, n_bad


class SFTData(torch.utils.data.Dataset):
    """Rows -> encoded samples: token ids, labels, loss weights, and every image (main + crops) as patches.
    With cache=True the token ids of each row and the processor-sized uint8 image of each file are kept after the
    first read (rows that share images, such as a search's option rotations, share them; patchify runs on every
    read: it is cheap, and uint8 images take 8x less memory than float32 patches)."""

    def __init__(self, rows, tokenizer, cfg, cache=False):
        self.rows, self.tok, self.cfg = rows, tokenizer, cfg
        self.cache = {} if cache else None           # row index -> (encoded sample, its images)
        self.images = {} if cache else None          # image path -> processor-sized uint8 image

    def __len__(self):
        return len(self.rows)

    def _image(self, path):
        if self.images is not None and path in self.images:
            return self.images[path]
        im = ck.processor_resize(ck.load_image(path), self.cfg.eval.processor_min_pixels, self.cfg.eval.processor_max_pixels)
        if self.images is not None:
            self.images[path] = im
        return im

    def __getitem__(self, i):
        if self.cache is not None and i in self.cache:
            s, images = self.cache[i]
            return dict(s, pixel_values=torch.cat([ck.patchify(im)[0] for im in images]) if images else None)
        row = self.rows[i]
        images = [self._image(p) for p in row["images"]]
        patches = [ck.patchify(im) for im in images]                       # each ([h*w/196, 1176], grid [1, 3])
        grid = torch.cat([g for _, g in patches]) if patches else torch.zeros(0, 3, dtype=torch.long)
        done = row.get("tokens")
        if done is not None and [tuple(g) for g in grid.tolist()] == [tuple(g) for g in done["grids"]]:
            s = dict(input_ids=done["input_ids"].long(), labels=done["labels"].long(), weights=done["weights"])
        else:   # rows that did not go through load_rows (or an image that changed on disk since)
            ids, labels, weights = render(row, self.tok, grid.tolist(), self.cfg.answer_weight, self.cfg.eval.system)
            s = dict(input_ids=torch.tensor(ids), labels=torch.tensor(labels), weights=torch.tensor(weights))
        s["image_grid_thw"] = grid
        if self.cache is not None:
            self.cache[i] = s, images
        return dict(s, pixel_values=torch.cat([pv for pv, _ in patches]) if patches else None)


def collate(samples, pad_id):
    """Right-pad a micro-batch. Returns input_ids/labels/weights/attention_mask [B, T] and the images of all rows in
    row order (the order of their <|image_pad|> runs)."""
    B, T = len(samples), max(len(s["input_ids"]) for s in samples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    weights, mask = torch.zeros(B, T), torch.zeros(B, T, dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[b, :n], labels[b, :n], weights[b, :n], mask[b, :n] = s["input_ids"], s["labels"], s["weights"], 1
    pix = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
    return dict(input_ids=ids, labels=labels, weights=weights, attention_mask=mask,
                pixel_values=torch.cat(pix) if pix else None,
                image_grid_thw=torch.cat([s["image_grid_thw"] for s in samples]))


def steps_per_epoch(n_rows, global_batch):
    checks.number(global_batch, "global_batch", lo=1, whole=True)
    if n_rows < global_batch:
        raise ValueError(f"{n_rows} training rows are fewer than one global batch ({global_batch} = batch_size * "
                         f"grad_accum * ranks); lower --batch_size or --grad_accum")
    return n_rows // global_batch


class StepSampler(torch.utils.data.Sampler):
    """Yields this rank's micro-batches (lists of row indices) for steps start..end-1, in order.

    Step s of epoch e takes rows perm_e[k*G:(k+1)*G] (G = global batch, k = s mod steps_per_epoch, perm_e a
    permutation seeded by (seed, e); the last partial batch of an epoch is dropped). Those G rows are cut into
    ranks*grad_accum micro-batches, dealt to the ranks in rounds of `ranks`, in order in even rounds and in reverse in
    odd ones (rank 0 of 2 takes micro-batches 0 and 3, rank 1 takes 1 and 2). One process with grad_accum=N and N
    ranks with grad_accum=1 therefore see the same rows in every step, and a resumed run sees exactly the rows it
    would have. With `lengths` (token count per row) the G rows are first sorted by length (stable), so each
    micro-batch holds rows of similar length and pads little; the step's rows, and so its loss, do not change, and
    the reversed rounds give every rank a share of the long micro-batches (dealt in order, the last rank would get
    the longest of every round and the others would wait for it at each all-reduce)."""

    def __init__(self, n_rows, cfg, start, end, rank, world, lengths=None):
        self.n, self.cfg, self.start, self.end, self.rank, self.world = n_rows, cfg, start, end, rank, world
        self.lengths = None if lengths is None else torch.as_tensor(lengths)
        self.G = cfg.batch_size * cfg.grad_accum * world
        self.spe = steps_per_epoch(n_rows, self.G)

    def __len__(self):
        return (self.end - self.start) * self.cfg.grad_accum

    def __iter__(self):
        perm, perm_epoch = None, -1
        for s in range(self.start, self.end):
            epoch, k = divmod(s, self.spe)
            if epoch != perm_epoch:
                g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
                perm, perm_epoch = torch.randperm(self.n, generator=g), epoch
            rows = perm[k * self.G:(k + 1) * self.G]                                      # [G]
            if self.lengths is not None:
                rows = rows[torch.argsort(self.lengths[rows], stable=True)]
            micro = rows.view(self.cfg.grad_accum, self.world, self.cfg.batch_size)      # [accum, ranks, batch]
            for t in range(self.cfg.grad_accum):
                yield micro[t, self.rank if t % 2 == 0 else self.world - 1 - self.rank].tolist()


# ------------------------------------------------------------------------------------------------ loss, schedule

def sft_targets(labels):
    """The targets Qwen25VL.forward scores for SFT: position t on labels[:, t + 1] (IGNORE, negative: not scored)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)                                     # [B, T]


def sft_loss(logp, labels, weights, n_global):
    """Weighted token cross-entropy of next-token prediction, summed, divided by the global label count.

    logp [B, T]: log p(labels[:, t + 1]) at position t, as Qwen25VL.forward(..., targets=sft_targets(labels))
    returns it (float32, only the labelled positions through the head); labels/weights [B, T] (labels IGNORE where
    no loss), n_global = sum of `weights` over every micro-batch of this optimizer step on every rank. Summing the
    returned value over micro-batches and ranks gives the mean loss per label token of the global batch."""
    sel = labels[:, 1:] != IGNORE                                # [B, T-1], position t predicts token t+1
    return -(logp[:, :-1][sel] * weights[:, 1:][sel]).sum() / n_global


# ------------------------------------------------------------------------------------------------ the run

def prepare_defaults(cfg):
    """Paths of (model, train data, eval data). With --model / --data empty: the synthetic dataset and the tiny model
    under runs/, built first when missing or stale."""
    model_path, data_path, eval_path = cfg.model, cfg.data, cfg.eval_data
    if not cfg.data:
        data_path, synth_eval = trainer.synthetic_data(cfg.seed)
        eval_path = eval_path or synth_eval
    if not cfg.model:
        model_path = tiny.seeded(tiny.TINY_MODEL_DIR, cfg.seed)
        if trainer.dist_info()[0] == 0:
            tiny.build_tiny_model(model_path, data_path, cfg.seed, log=trainer.log0)
        trainer.barrier()
    return model_path, data_path, eval_path


def train(cfg: TrainConfig) -> dict:
    """Run SFT as configured. Returns {"losses": [...], "checkpoint": path, "eval": {...}, ...} (rank 0 values)."""
    checks.kind(cfg, "cfg", TrainConfig, "a TrainConfig (sft.parse_args or TrainConfig(...))")
    device = trainer.start_run(cfg, "TrainConfig")
    rank, world, _ = trainer.dist_info()
    model_path, data_path, eval_path = prepare_defaults(cfg)
    trainer.barrier()
    trainer.seed_all(cfg.seed)
    tokenizer = T.Tokenizer.from_pretrained(model_path)
    rows, n_bad = load_rows(data_path, tokenizer, cfg)
    trainer.log0(f"data: {len(rows)} rows from {data_path}" + (f", {n_bad} bad rows skipped" if n_bad else ""))

    global_batch = cfg.batch_size * cfg.grad_accum * world
    spe = steps_per_epoch(len(rows), global_batch)
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * spe))
    ckpt, start = trainer.resume_point(cfg, dict(global_batch=global_batch, n_rows=len(rows)))
    raw = trainer.build_policy(cfg, model_path, device, pretrained=bool(cfg.model), ckpt=ckpt)
    # rows without images leave the vision tower out of the graph: DDP must then look for unused params
    model = trainer.distribute(raw, cfg, device, find_unused=any(not r["images"] for r in rows))
    optimizer = trainer.make_optimizer(raw, cfg)
    if ckpt is not None:
        trainer.load_optimizer(raw, optimizer, ckpt)
        trainer.load_rng(ckpt)

    ds = SFTData(rows, tokenizer, cfg, cache=cfg.workers == 0 and not cfg.model)
    sampler = StepSampler(len(rows), cfg, start, total, rank, world,
                          [len(r["tokens"]["input_ids"]) for r in rows] if cfg.group_by_length else None)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=cfg.workers,
                                         collate_fn=functools.partial(collate, pad_id=tokenizer.pad_id),
                                         generator=torch.Generator().manual_seed(cfg.seed))  # not the global RNG
    batches = iter(loader)
    os.makedirs(cfg.out, exist_ok=True)
    metrics = trainer.Metrics(os.path.join(cfg.out, "metrics.jsonl"), start)
    bar = report.Progress(total, "sft", start=start, enabled=cfg.progress and rank == 0)
    params = [p for p in raw.parameters() if p.requires_grad]
    losses, evals, last_ckpt = [], [], None
    extra = dict(global_batch=global_batch, n_rows=len(rows), total=total, model=model_path, data=data_path)
    t_run = time.time()
    for step in range(start, total):
        t0 = time.time()
        loss_val, m = sft_step(model, optimizer, params, [next(batches) for _ in range(cfg.grad_accum)], cfg,
                               step, total, device)
        losses.append(loss_val)
        m.update(tokens_per_s=m.pop("tokens") / (time.time() - t0), elapsed_s=time.time() - t_run)
        if (step + 1) % cfg.log_every == 0 or step + 1 == total:
            metrics.log(**m)
        bar.update(1, loss=loss_val, lr=m["lr"], **{"tok/s": round(m["tokens_per_s"])})
        done = step + 1 == total
        if eval_path and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or done):
            bar.close()
            for no_zoom in ((False, True) if done and cfg.eval_no_zoom else (False,)):
                ev = trainer.run_eval(raw, tokenizer, eval_path, cfg, step + 1, metrics, no_zoom)
                evals.append(dict(step=step + 1, mode="eval_no_zoom" if no_zoom else "eval", **ev))
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or done:
            last_ckpt = trainer.save_checkpoint(raw, optimizer, step + 1, cfg, extra)
    bar.close()
    if last_ckpt is not None:
        trainer.log0(f"checkpoint: {last_ckpt} (HF format: loads with model.Qwen25VL.from_pretrained and transformers)")
    return dict(losses=losses, checkpoint=str(last_ckpt) if last_ckpt else None, eval=evals,
                start=start, total=total, n_bad=n_bad, seconds=time.time() - t_run)


def sft_step(model, optimizer, params, micro, cfg, step, total, device):
    """One optimizer step over this rank's micro-batches. The loss of every micro-batch is divided by the label
    weight of the whole global step (all micro-batches, all ranks). Returns (loss, metrics dict)."""
    counts = torch.tensor([sum(float(b["weights"][:, 1:].sum()) for b in micro),
                           sum(float(b["attention_mask"].sum()) for b in micro)], dtype=torch.float64)
    n_global, n_tokens = trainer.all_reduce_sum(counts).tolist()
    lr = trainer.set_lr(optimizer, step, total, cfg)
    world = trainer.dist_info()[1]
    loss_sum = torch.zeros((), dtype=torch.float64)
    for j, b in enumerate(micro):
        with trainer.grad_sync(model, j == len(micro) - 1), trainer.autocast(device):
            labels = b["labels"].to(device)
            pv = None if b["pixel_values"] is None else b["pixel_values"].to(device)
            logp, _ = model(b["input_ids"].to(device), pixel_values=pv,
                            image_grid_thw=b["image_grid_thw"], attention_mask=b["attention_mask"].to(device),
                            targets=sft_targets(labels))                          # [B, T]
            loss = sft_loss(logp, labels, b["weights"].to(device), n_global)
        (loss * world).backward()   # DDP / FSDP average gradients over ranks; the loss is already a global mean
        loss_sum += loss.detach().double().cpu()
    loss_val = float(trainer.all_reduce_sum(loss_sum))
    gnorm = trainer.optimizer_step(params, optimizer, cfg, step, loss_val)
    return loss_val, dict(step=step + 1, loss=loss_val, lr=lr, grad_norm=gnorm, tokens=n_tokens, label_tokens=n_global)


def main(argv=None):
    trainer.run_cli(train, parse_args(argv), "sft.py", errors=(BadRow,))


if __name__ == "__main__":
    main()
