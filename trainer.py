"""What sft.py and grpo.py share: the run's options (the evaluation's loop nested as `eval`), distributed setup, the
policy (what trains, LoRA, activation checkpointing), the optimizer and its schedule, checkpoints and exact resume,
metrics, and the CoF-loop evaluation during training.

Reproduces the parts of the released recipes that are not the loss: LLaMA-Factory's LoRA (all linear layers of the
language model, alpha = 2 * rank by default) and freezing of the vision tower, AdamW with a cosine schedule and
linear warmup (SFT) or a constant lr (the released GRPO), gradient clipping to norm 1. What is ours: checkpoints are
HF-format directories (`model.Qwen25VL.from_pretrained` and transformers load them) written atomically, with the
trainable weights, optimizer, RNG and data position of every rank next to them, so `--resume` continues a run
exactly; `torchrun` runs DDP, or FSDP2 (`--dist fsdp`) with one shard group per decoder layer and vision block.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pickle
import random
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

import checks
import cof
import evaluate as E
import hub
import model as M
from checks import option
from data import formats, tiny

# ------------------------------------------------------------------------------------------------ config

# The evaluation's loop: the released evaluation's, with the image processor's pixel limits set to the main image's
# (112 * 112 to 3840 * 3840 pixels) instead of the checkpoint's own.
EVAL_LOOP = cof.CofConfig(processor_min_pixels=cof.MAIN_MIN_PIXELS, processor_max_pixels=cof.MAIN_MAX_PIXELS)


@dataclass
class RunConfig:
    """Options every trainer here has (sft.py's TrainConfig and grpo.py's GRPOConfig add their own): the model and
    how it trains, the optimizer, distribution, evaluation through the CoF loop, checkpoints. Unknown keys and
    values that cannot be right (NaN, negative sizes, unknown choices) are rejected when the config is built."""
    # what to train
    model: str = option("", "HF-format Qwen2.5-VL dir or hub id; empty = the built-in default")
    eval_data: str = option("", "held-out records (RL/test format) for the CoF-loop evaluation; empty = none, or the "
                              "synthetic val split for the built-in default")
    out: str = option("runs/out", "output dir: checkpoints ckpt-NNNNNN/, `latest`, metrics.jsonl")
    max_steps: int = option(0, "optimizer steps to run")
    skip_bad: bool = option(False, "skip and count bad rows instead of stopping at the first one")
    # optimizer and schedule
    lr: float = option(1e-5, "peak learning rate")
    vision_lr_scale: float = option(1.0, "learning rate multiplier for the vision tower (merger included)")
    min_lr_ratio: float = option(0.0, "final lr of the cosine schedule, as a fraction of --lr")
    warmup_ratio: float = option(0.1, "fraction of the steps with linear warmup")
    weight_decay: float = option(0.0, "AdamW weight decay (not applied to norms, biases and LoRA)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.999, "AdamW beta2")
    adam_eps: float = option(1e-8, "AdamW epsilon")
    clip_grad: float = option(1.0, "clip the global gradient norm to this; 0 = off")
    # model
    freeze_vision: str = option("auto", "freeze the vision tower (merger excluded): yes | no | auto (= yes for a "
                                      "pretrained --model, no for the tiny model trained from scratch)")
    freeze_merger: bool = option(False, "also freeze the vision-language merger")
    freeze_llm: bool = option(False, "freeze the language model (embeddings, decoder, lm_head); LoRA still trains")
    lora_rank: int = option(0, "LoRA rank; 0 = full fine-tuning (released: 32)")
    lora_alpha: float = option(0.0, "LoRA alpha; 0 = 2 * rank (LLaMA-Factory's default)")
    lora_dropout: float = option(0.0, "dropout on the LoRA input")
    lora_targets: str = option("all", "comma-separated linear-layer names of the language model "
                                    "(q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj) or `all`")
    act_ckpt: bool = option(False, "activation checkpointing of every decoder layer and vision block")
    dtype: str = option("auto", "weights of frozen params: float32 | bfloat16 | auto (bf16 on CUDA, fp32 on CPU); "
                              "trainable params are always float32, compute is bf16 autocast on CUDA")
    dist: str = option("ddp", "with torchrun: ddp (replicated) | fsdp (FSDP2 fully_shard per block)")
    # run
    seed: int = option(0, "seed of init, data order, sampling and dropout")
    threads: int = option(0, "torch CPU threads; 0 = leave torch's default")
    log_every: int = option(1, "steps between metric lines")
    eval_every: int = option(0, "steps between CoF evaluations; 0 = only at the end")
    eval_n: int = option(200, "held-out records per evaluation; 0 = all")
    eval_batch: int = option(16, "questions decoded together in the CoF evaluation")
    eval: cof.CofConfig = option(EVAL_LOOP, "the CoF evaluation's zoom loop (cof.CofConfig: --eval.max_turns, "
                                 "--eval.max_new_tokens, ...); SFT also renders and resizes its training rows as it "
                                 "shows them (--eval.system, --eval.processor_min_pixels/max_pixels)")
    save_every: int = option(0, "steps between checkpoints; 0 = only at the end")
    keep_last: int = option(2, "checkpoints kept on disk (older ones are deleted after a successful save)")
    resume: str = option("", "checkpoint dir to continue from, or `auto` = the one named in OUT/latest")
    overwrite: bool = option(False, "start a fresh run in an OUT that holds checkpoints of an earlier run, deleting "
                                  "them (without it such a run stops with an error)")
    progress: bool = option(True, "show the progress bar (rank 0)")

    # option -> (lowest allowed value, whether it may equal it[, highest, whether it may equal it]), checked by
    # checks.options with each field's type (every float must also be finite)
    LIMITS = dict(max_steps=(0, True), lr=(0, False), vision_lr_scale=(0, True), min_lr_ratio=(0, True, 1, True),
                  warmup_ratio=(0, True, 1, True), weight_decay=(0, True), beta1=(0, True, 1, False),
                  beta2=(0, True, 1, False), adam_eps=(0, False), clip_grad=(0, True), lora_rank=(0, True),
                  lora_alpha=(0, True), lora_dropout=(0, True, 1, True), seed=(0, True, checks.SEED_MAX, True),
                  threads=(0, True, checks.THREADS_MAX, True), log_every=(1, True), eval_every=(0, True),
                  eval_n=(0, True), eval_batch=(1, True), save_every=(0, True), keep_last=(0, True))
    CHOICES = dict(freeze_vision=("auto", "yes", "no"), dist=("ddp", "fsdp"), dtype=("auto", "float32", "bfloat16"))

    def __post_init__(self):
        checks.options(self)

    @classmethod
    def from_dict(cls, d: dict):
        return checks.from_dict(cls, d)


# ------------------------------------------------------------------------------------------------ distributed

def dist_info():
    """(rank, world, local_rank); a plain `python sft.py` is rank 0 of 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


def init_distributed() -> torch.device:
    """A process group for every run torchrun started (one process too: `torchrun --nproc_per_node=1` checks the
    backend on one GPU; models are wrapped for data parallelism only from two ranks up); the device."""
    if {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"} <= set(os.environ) and not dist.is_initialized():
        if torch.cuda.is_available():
            local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(local)
            # NCCL for the gradients (connected now, on this rank's GPU, and used by barrier()); gloo for the step's
            # counts and metrics, which are CPU tensors that NCCL cannot reduce
            dist.init_process_group("cpu:gloo,cuda:nccl", device_id=local)
        else:
            dist.init_process_group("gloo")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def log0(*a):
    if dist_info()[0] == 0:
        print(*a, flush=True)


class RunError(ValueError):
    """A run that cannot go on as configured (e.g. resuming with other data or batch sizes); says what to change."""


# ------------------------------------------------------------------------------------------------ model: LoRA, freezing

LORA_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """y = x W^T + b + (alpha / r) * dropout(x) A^T B^T (Hu et al. 2021; PEFT's init: A Kaiming-uniform, B = 0, so
    step 0 is the base model). W and b keep the names `weight` and `bias` of the nn.Linear it replaces."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True            # False: the base layer alone (see lora_off)

    def forward(self, x):
        if not self.enabled:
            return F.linear(x, self.weight, self.bias)
        lora = F.linear(F.linear(self.drop(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))  # [..., out]
        return F.linear(x, self.weight, self.bias) + lora * self.scale

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + scale * B A (the weight the HF checkpoint stores)."""
        lin = nn.Linear(self.weight.shape[1], self.weight.shape[0], bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale                  # [out, in]
            lin.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin


@contextlib.contextmanager
def lora_off(model):
    """Inside: every LoRALinear computes its base layer alone, i.e. the model before fine-tuning (GRPO's frozen
    reference when training LoRA: no second copy of the weights)."""
    mods = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.enabled = True


def is_vision(name):
    return name.startswith("visual.") or ".visual." in name


def is_merger(name):
    return is_vision(name) and ".merger." in f".{name}"


def add_lora(model, cfg):
    """Replace the target nn.Linear layers of the language model (never the vision tower or lm_head) by LoRALinear."""
    targets = LORA_ALL if cfg.lora_targets == "all" else tuple(t.strip() for t in cfg.lora_targets.split(","))
    bad = sorted(set(targets) - set(LORA_ALL))
    if bad:
        raise ValueError(f"--lora_targets: unknown layer names {bad}; choose from {list(LORA_ALL)} or `all`")
    alpha = cfg.lora_alpha or 2.0 * cfg.lora_rank
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and not is_vision(n) and n.split(".")[-1] in targets]
    if not names:
        raise ValueError(f"--lora_targets {cfg.lora_targets}: no such linear layers in the language model")
    for n in names:
        parent, _, attr = n.rpartition(".")
        parent = model.get_submodule(parent)
        setattr(parent, attr, LoRALinear(getattr(parent, attr), cfg.lora_rank, alpha, cfg.lora_dropout))
    return names


@contextlib.contextmanager
def lora_merged(model):
    """Inside: every LoRALinear is swapped for its merged nn.Linear (to save an HF checkpoint); restored on exit
    without any arithmetic on the training weights, so training continues bit for bit."""
    swapped = []
    for n, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            parent, _, attr = n.rpartition(".")
            parent = model.get_submodule(parent)
            setattr(parent, attr, m.merged())
            swapped.append((parent, attr, m))
    try:
        yield model
    finally:
        for parent, attr, m in swapped:
            setattr(parent, attr, m)


def set_trainable(model, cfg, pretrained):
    """Freeze per the options; LoRA params always train. Returns {"trainable": n, "total": n} parameter counts."""
    freeze_vision = cfg.freeze_vision == "yes" or (cfg.freeze_vision == "auto" and pretrained)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)
        elif is_vision(n):
            p.requires_grad_(not (cfg.freeze_merger if is_merger(n) else freeze_vision))
        else:
            p.requires_grad_(not (cfg.freeze_llm or cfg.lora_rank > 0))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": n_train, "total": sum(p.numel() for p in model.parameters())}


def blocks(model):
    """The repeated blocks (decoder layers, vision blocks): units of activation checkpointing and FSDP sharding."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and name.split(".")[-1] in ("layers", "blocks"):
            out.extend(m)
    return out


def add_activation_checkpointing(model):
    for blk in blocks(model):
        fwd = blk.forward
        blk.forward = lambda *a, _f=fwd, **k: checkpoint(_f, *a, use_reentrant=False, **k)


def lr_at(step, total, cfg):
    """Linear warmup over ceil(warmup_ratio * total) steps (step 0 already gets lr/warmup, not 0), then cosine from
    --lr down to --min_lr_ratio * lr at the last step."""
    warm = math.ceil(cfg.warmup_ratio * total)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm - 1)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model, cfg):
    """AdamW over the trainable params: no weight decay on 1-D params (norms, biases) and LoRA; the vision tower's
    groups get lr * --vision_lr_scale. Each group carries `lr_scale`, applied to the scheduled lr every step."""
    groups = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and "lora_" not in n and cfg.weight_decay > 0
        scale = cfg.vision_lr_scale if is_vision(n) else 1.0
        groups.setdefault((decay, scale), []).append(p)
    param_groups = [dict(params=ps, weight_decay=cfg.weight_decay if decay else 0.0, lr_scale=scale, lr=cfg.lr * scale)
                    for (decay, scale), ps in sorted(groups.items())]
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay)


# ------------------------------------------------------------------------------------------------ checkpoints

def _fsync_tree(root):
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def is_fsdp(model):
    return type(model).__name__.startswith("FSDP")


def trainable_state(raw):
    """{name: full float32 CPU tensor} of the trainable params (gathered from every rank under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    names = {n for n, p in raw.named_parameters() if p.requires_grad}
    if is_fsdp(raw):
        sd = get_model_state_dict(raw, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = raw.state_dict()
    return {n: t.detach().to("cpu", torch.float32).clone() for n, t in sd.items() if n in names}


def optimizer_state(raw, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(raw, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                              cpu_offload=is_fsdp(raw)))


def rng_state():
    """Every RNG's state as tensors and plain Python values only, so that it loads with torch.load(weights_only=True)
    (a file that needs unpickling of anything else is refused: see load_trainer_file)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    s = dict(torch=torch.get_rng_state(), numpy=[name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             python=random.getstate())
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    name, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in s["python"]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


# what to do when a checkpoint's trainer files do not load
RESUME_HELP = ("resume from an earlier checkpoint (--resume OUT/ckpt-NNNNNN) or start fresh (--overwrite, or another "
               "--out)")


def load_trainer_file(path):
    """torch.load with weights_only=True: tensors, numbers, strings, lists, tuples and dicts only. A checkpoint file
    that would unpickle anything else (which can run code) is refused, and a truncated or damaged one named, with
    RunError saying what to do."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; the checkpoint is incomplete: {RESUME_HELP}") from None
    except pickle.UnpicklingError as e:
        raise RunError(f"{path}: refusing to load it: it is not a plain tensor file written by this trainer "
                       f"(only tensors, numbers, strings, lists and dicts are read back; a file from an older "
                       f"version or another program cannot be resumed): {str(e).splitlines()[0]}; "
                       f"{RESUME_HELP}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise RunError(f"{path}: cannot load it, the file is truncated or damaged ({type(e).__name__}: "
                       f"{(str(e).splitlines() or [''])[0]}); {RESUME_HELP}") from None


def read_state(ckpt):
    """A checkpoint's trainer/state.json: a JSON object with the whole-number `step` it was saved at (and the run's
    sizes); RunError naming the file and saying what to do otherwise."""
    path = Path(ckpt) / "trainer" / "state.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise RunError(f"{path}: cannot read it ({type(e).__name__}: {e}); {RESUME_HELP}") from None
    step = state.get("step") if isinstance(state, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise RunError(f"{path}: not a trainer state (a JSON object with the step it was saved at, got "
                       f"{str(state)[:80]}); {RESUME_HELP}")
    return state


def export_hf(raw, directory):
    """HF-format checkpoint (config.json, model.safetensors, and the tokenizer/processor files of the source model,
    copied by save_pretrained) with LoRA merged into the weights. Collective under FSDP; only rank 0 writes."""
    if is_fsdp(raw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(raw, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist_info()[0] == 0:
            save_state_dict_hf(raw, sd, directory)
    elif dist_info()[0] == 0:
        with lora_merged(raw):
            raw.save_pretrained(directory)


def save_state_dict_hf(raw, sd, directory):
    """Write a full (gathered) state dict of `raw` in HF format: LoRA pairs merged into their weights, then
    Qwen25VL.save_pretrained on a twin built on the meta device that takes the gathered tensors as they are."""
    sd = dict(sd)
    for k in [k for k in sd if k.endswith(".lora_A")]:
        base = k[: -len(".lora_A")]
        B, A = sd.pop(base + ".lora_B").float(), sd.pop(k).float()
        w = sd[base + ".weight"]
        sd[base + ".weight"] = (w.float() + (B @ A) * raw.get_submodule(base).scale).to(w.dtype)   # [out, in]
    with torch.device("meta"):
        twin = M.Qwen25VL(raw.cfg)
    twin.load_state_dict(sd, assign=True, strict=False)
    twin.source_dir = raw.source_dir
    twin.save_pretrained(directory)


def save_checkpoint(raw, optimizer, step, cfg, extra):
    """Write OUT/ckpt-{step:06d} atomically: everything goes to a temp dir first, is fsynced, and is renamed into
    place; then OUT/latest is replaced (also atomically). A crash at any point leaves the previous checkpoint and
    `latest` whole. Collective: every rank calls it."""
    rank, world, _ = dist_info()
    out = Path(cfg.out)
    final, tmp = out / f"ckpt-{step:06d}", out / f".tmp-ckpt-{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "trainer").mkdir(parents=True)
    barrier()
    export_hf(raw, str(tmp))
    train_sd = trainable_state(raw)
    opt_sd = optimizer_state(raw, optimizer)
    torch.save(rng_state(), tmp / "trainer" / f"rng-rank{rank}.pt")
    if rank == 0:
        save_file(train_sd, str(tmp / "trainer" / "trainable.safetensors"))
        torch.save(opt_sd, tmp / "trainer" / "optimizer.pt")
        state = dict(step=step, world=world, config=dataclasses.asdict(cfg), **extra)
        (tmp / "trainer" / "state.json").write_text(json.dumps(state, indent=1))
    barrier()
    if rank == 0:
        _fsync_tree(tmp)
        if final.exists():
            # Re-saving a step (after resuming from an older checkpoint). `latest` must name a whole checkpoint at
            # every instant: point it at a hard-linked copy of the old one, replace the old one, point it back.
            old = out / f".old-ckpt-{step:06d}"
            shutil.rmtree(old, ignore_errors=True)
            shutil.copytree(final, old, copy_function=_link_or_copy)
            _fsync_tree(old)
            formats.write_atomic(str(out / "latest"), old.name + "\n")
            shutil.rmtree(final)
            os.replace(tmp, final)
            formats.write_atomic(str(out / "latest"), final.name + "\n")
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
            formats.write_atomic(str(out / "latest"), final.name + "\n")
        for p in list(out.glob(".old-ckpt-*")) + list(out.glob(".tmp-ckpt-*")):   # left by a save that was killed
            shutil.rmtree(p, ignore_errors=True)
        ckpts = sorted(p for p in out.glob("ckpt-*") if p.is_dir())
        for p in ckpts[:-cfg.keep_last] if cfg.keep_last > 0 else []:
            shutil.rmtree(p, ignore_errors=True)
    barrier()
    return final


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:              # a file system without hard links
        shutil.copy2(src, dst)


def clear_earlier_run(cfg):
    """A fresh run (no --resume) in an OUT with checkpoints of an earlier run: delete them with --overwrite (the
    built-in default sets it), else stop before anything is lost or mixed up."""
    out = Path(cfg.out)
    old = sorted(p for p in out.glob("ckpt-*") if p.is_dir()) if not cfg.resume else []
    if not old:
        return
    if not cfg.overwrite:
        raise SystemExit(f"{out} holds checkpoints of an earlier run ({', '.join(p.name for p in old)}). Continue it "
                         f"with --resume auto, start over with --overwrite (deletes them), or pick another --out.")
    log0(f"--overwrite: deleting {len(old)} checkpoint(s) of an earlier run in {out}")
    for p in old + [out / "eval"]:
        shutil.rmtree(p, ignore_errors=True)
    for p in (out / "latest", out / "metrics.jsonl"):
        p.unlink(missing_ok=True)


def resolve_resume(cfg):
    """The checkpoint directory --resume names (None for `auto` in an OUT without checkpoints: start fresh)."""
    if cfg.resume != "auto":
        ckpt = Path(cfg.resume)
    else:
        latest = Path(cfg.out) / "latest"
        if not latest.exists():
            return None
        ckpt = Path(cfg.out) / latest.read_text(encoding="utf-8", errors="replace").strip()
    if not (ckpt / "trainer" / "state.json").is_file():
        raise FileNotFoundError(f"--resume {cfg.resume}: {ckpt} is not a checkpoint of this trainer (no "
                                f"trainer/state.json); name a ckpt-NNNNNN directory, or `auto` for OUT/latest")
    return ckpt


def resume_point(cfg, want: dict):
    """(checkpoint to resume from or None, first step). `want`: what the checkpoint's run must have had for the data
    order to continue exactly (e.g. the global batch and the number of rows); a checkpoint of another run raises
    RunError naming both."""
    ckpt = resolve_resume(cfg) if cfg.resume else None
    if ckpt is None:
        return None, 0
    state = read_state(ckpt)
    have = {k: state.get(k) for k in want}
    if have != want:
        raise RunError(f"{ckpt}: written by a run with {have}; this run has {want}. Resume with the same data and "
                       f"batch options, or start a new --out")
    log0(f"resuming from {ckpt} at step {state['step']}")
    return ckpt, state["step"]


def load_trainable(raw, ckpt):
    """Copy trainable.safetensors into the (unwrapped, not yet sharded) model; every trainable param must be there."""
    path = Path(ckpt) / "trainer" / "trainable.safetensors"
    try:
        sd = load_file(str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; the checkpoint is incomplete: {RESUME_HELP}") from None
    except (SafetensorError, OSError) as e:
        raise RunError(f"{path}: cannot load it, the file is truncated or damaged ({type(e).__name__}: {e}); "
                       f"{RESUME_HELP}") from None
    params = dict(raw.named_parameters())
    want = {n for n, p in params.items() if p.requires_grad}
    if set(sd) != want:
        raise ValueError(f"{ckpt}: trainable params differ from this run's (missing {sorted(want - set(sd))[:5]}, "
                         f"unexpected {sorted(set(sd) - want)[:5]}); resume with the same --lora_* and --freeze_* "
                         f"options as the run that wrote it")
    with torch.no_grad():
        for n, t in sd.items():
            if params[n].shape != t.shape:
                raise ValueError(f"{ckpt}: {n} has shape {tuple(t.shape)}, this model has {tuple(params[n].shape)}")
            params[n].copy_(t)


def load_optimizer(raw, optimizer, ckpt):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    path = Path(ckpt) / "trainer" / "optimizer.pt"
    sd = load_trainer_file(path)
    if not isinstance(sd, dict) or not {"state", "param_groups"} <= set(sd):
        raise RunError(f"{path}: not an optimizer state (a dict with state and param_groups, got {str(sd)[:80]}); "
                       f"{RESUME_HELP}")
    try:
        set_optimizer_state_dict(raw, optimizer, sd, options=StateDictOptions(full_state_dict=True))
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise RunError(f"{path}: not this run's optimizer state ({type(e).__name__}: {e}); {RESUME_HELP}") from None


def load_rng(ckpt):
    path = Path(ckpt) / "trainer" / f"rng-rank{dist_info()[0]}.pt"
    state = load_trainer_file(path)
    try:
        set_rng_state(state)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise RunError(f"{path}: not the RNG state this trainer writes ({type(e).__name__}: {e}); "
                       f"{RESUME_HELP}") from None


# ------------------------------------------------------------------------------------------------ progress, metrics

class Metrics:
    """Appends one JSON object per line to OUT/metrics.jsonl (rank 0). A fresh run (start 0) starts a fresh file; a
    resumed run first drops the lines of steps after its checkpoint, so no step appears twice, and any line that is
    not a JSON object (the torn last line of an interrupted run, bytes that are not UTF-8)."""

    def __init__(self, path, start=0):
        self.path = path if dist_info()[0] == 0 else None
        if self.path and os.path.exists(path):
            if start == 0:
                os.remove(path)
            else:
                with open(path, "rb") as f:
                    keep = [line.decode().rstrip("\n") + "\n" for line in f if _step_of(line) <= start]
                formats.write_atomic(path, "".join(keep))

    def log(self, **m):
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(m) + "\n")


def _step_of(line: bytes):
    try:
        return int(json.loads(line.decode()).get("step", 0))
    except (ValueError, AttributeError, TypeError, RecursionError, OverflowError):   # UnicodeDecodeError is a ValueError
        return float("inf")   # a torn last line of an interrupted run, or junk: dropped


# ------------------------------------------------------------------------------------------------ setup shared with grpo.py

def start_run(cfg, name):
    """Distributed init, threads, the config printed, an earlier run in OUT cleared (see clear_earlier_run).
    Returns the device."""
    device = init_distributed()
    rank, world, _ = dist_info()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    log0(f"{name}(\n" + "".join(f"  {k}={v!r},\n" for k, v in dataclasses.asdict(cfg).items()) + ")")
    if dist.is_available() and dist.is_initialized():
        log0(f"distributed: {world} rank(s), {cfg.dist}, backend {dist.get_backend()}")
    if rank == 0:
        clear_earlier_run(cfg)
    barrier()
    return device


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_policy(cfg, model_path, device, pretrained, ckpt=None):
    """The model to train: loaded in the frozen-weight dtype, LoRA added, params frozen per the options, trainable
    params in float32, the trainable params of `ckpt` copied in (resume), activation checkpointing. Not yet wrapped
    for DDP / FSDP (see distribute)."""
    _, world, _ = dist_info()
    on_cuda = device.type == "cuda"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(cfg.dtype,
                                                                      torch.bfloat16 if on_cuda else torch.float32)
    if cfg.dist == "fsdp" and world > 1:
        dtype = torch.float32   # FSDP2 wants one dtype per shard group; bf16 compute comes from its mp_policy
    raw = M.Qwen25VL.from_pretrained(model_path, dtype=dtype, device=device)
    raw.train()
    if cfg.lora_rank > 0:
        add_lora(raw, cfg)
    counts = set_trainable(raw, cfg, pretrained=pretrained)
    for p in raw.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()   # fp32 master weights for everything that trains
    log0(f"model: {model_path}, {counts['total'] / 1e6:.2f} M params, {counts['trainable'] / 1e6:.3f} M trainable")
    if ckpt is not None:
        load_trainable(raw, ckpt)
    if cfg.act_ckpt:
        add_activation_checkpointing(raw)
    return raw


def distribute(raw, cfg, device, find_unused=False):
    """Wrap for torchrun: FSDP2 fully_shard per block (--dist fsdp) or DDP; the model itself with one process.
    find_unused: DDP must look for params a step does not use (e.g. the vision tower on rows without images)."""
    _, world, _ = dist_info()
    if world > 1 and cfg.dist == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mesh = init_device_mesh(device.type, (world,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if device.type == "cuda" else MixedPrecisionPolicy()
        for blk in blocks(raw):
            fully_shard(blk, mesh=mesh, mp_policy=mp)
        fully_shard(raw, mesh=mesh, mp_policy=mp)
        return raw
    if world > 1:
        return nn.parallel.DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None,
                                                   find_unused_parameters=find_unused)
    return raw


def grad_sync(model, last):
    """Context for one micro-batch's backward: gradients are all-reduced only on the last micro-batch of a step."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not last:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def autocast(device):
    """bf16 autocast on CUDA, nothing on the CPU (fp32)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def optimizer_step(params, optimizer, cfg, step, loss):
    """Clip, check, step, zero the gradients. Returns the gradient norm before clipping. A non-finite loss or
    gradient stops the run here (FloatingPointError naming the step), before any NaN reaches the weights or a
    checkpoint."""
    gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad if cfg.clip_grad > 0 else float("inf")))
    if not (math.isfinite(gnorm) and math.isfinite(loss)):
        raise FloatingPointError(f"step {step + 1}: loss {loss}, gradient norm {gnorm}: not finite. Nothing was "
                                 f"applied or saved; lower --lr (now {cfg.lr:g}) or resume from the last checkpoint")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return gnorm


def set_lr(optimizer, step, total, cfg):
    lr = lr_at(step, total, cfg)
    for g in optimizer.param_groups:
        g["lr"] = lr * g["lr_scale"]
    return lr


def finish_run():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def evaluate(raw, tokenizer, eval_path, cfg, step, no_zoom=False, tag=None, limit=None):
    """CoF-loop evaluation on the first --eval_n (or `limit`; 0 = all) held-out questions; each rank runs its share
    and the results are gathered. no_zoom: the forced no-zoom baseline (CofConfig.direct) in --eval's loop. Every trajectory is
    written to OUT/eval/{tag}-step{N}-rank{r}.jsonl. Returns accuracy (%), mean_zooms, n, errors (questions whose loop raised)
    and kinds (evaluate.kind_table rows: per question kind and overall)."""
    rank, world, _ = dist_info()
    items = E.read_synthetic(eval_path)
    n = cfg.eval_n if limit is None else limit
    items = items[:n] if n > 0 else items
    ccfg = replace(cfg.eval, direct=cfg.eval.direct or no_zoom)
    tag = tag or ("no-zoom" if no_zoom else "cof")
    os.makedirs(os.path.join(cfg.out, "eval"), exist_ok=True)   # every trajectory is kept: report.draw_trace draws them
    path = os.path.join(cfg.out, "eval", f"{tag}-step{step:06d}-rank{rank}.jsonl")
    if os.path.exists(path):
        os.remove(path)
    was_training = raw.training
    raw.eval()
    unshard = is_fsdp(raw)
    if unshard:
        raw.unshard()
    try:
        E.evaluate(raw, tokenizer, items[rank::world], path, ccfg, batch_size=cfg.eval_batch,
                     bench="eval-no-zoom" if no_zoom else "eval", progress=False)
        recs = list(E.load_results(path).values())
    finally:
        if unshard:
            raw.reshard()
        raw.train(was_training)
    recs = gather_records(recs)
    kinds = E.kind_table(recs)
    return dict(accuracy=kinds[-1]["accuracy"] if kinds else 0.0, mean_zooms=kinds[-1]["mean_zooms"] if kinds else 0.0,
                n=len(recs), errors=sum(1 for r in recs if r.get("error")), kinds=kinds)


def run_eval(raw, tokenizer, eval_path, cfg, step, metrics, no_zoom=False):
    """evaluate, then its numbers into metrics.jsonl (as eval/... or eval_no_zoom/...) and the log."""
    tag = "eval_no_zoom" if no_zoom else "eval"
    ev = evaluate(raw, tokenizer, eval_path, cfg, step, no_zoom=no_zoom)
    metrics.log(step=step, **eval_metrics(tag, ev))
    log_eval(tag, step, ev)
    return ev


def gather_records(recs):
    """Every rank's list of small JSON-able dicts, concatenated in rank order (all ranks get the result)."""
    if not (dist.is_available() and dist.is_initialized()):
        return recs
    out = [None] * dist_info()[1]
    dist.all_gather_object(out, [{k: r.get(k) for k in ("correct", "n_zooms", "n_generated", "kind", "category",
                                                         "error", "id")} for r in recs])
    return [r for part in out for r in part]


def eval_metrics(tag, ev):
    """An evaluation as flat metrics.jsonl keys: {tag}/accuracy ..., and {tag}/{kind}/accuracy ... per kind."""
    m = {f"{tag}/{k}": v for k, v in ev.items() if k != "kinds"}
    for row in ev["kinds"][:-1] if len(ev["kinds"]) > 1 else []:
        m.update({f"{tag}/{row['kind']}/{k}": v for k, v in row.items() if k not in ("kind", "errors")})
    return m


def log_eval(tag, step, ev):
    """One line per evaluation, then one per question kind when there are several."""
    log0(f"{tag} @ step {step}: accuracy {ev['accuracy']:.1f}% over {ev['n']} questions, mean zooms "
         f"{ev['mean_zooms']:.2f}" + (f", {ev['errors']} question(s) failed with an error (see OUT/eval)"
                                      if ev["errors"] else ""))
    if len(ev["kinds"]) > 1:
        for k in ev["kinds"][:-1]:
            log0(f"    {k['kind']:>9}: accuracy {k['accuracy']:5.1f}% (n={k['n']}), zoom rate {k['zoom_rate']:5.1f}%, "
                 f"mean zooms {k['mean_zooms']:.2f}, direct {k['direct_share']:.0f}% "
                 f"(accuracy {k['direct_accuracy']:.1f}%), {k['gen_tokens']:.0f} tokens")


def synthetic_data(seed=0):
    """(SFT train file, held-out records) of the built-in synthetic dataset of `seed`, built first when missing or
    stale (data/tiny.py; rank 0 builds, the other ranks wait)."""
    directory = tiny.seeded(tiny.SYNTH_DIR, seed)
    if dist_info()[0] == 0:
        tiny.build_synthetic(directory, seed, log=log0)
    barrier()
    return tiny.synthetic_paths(directory)


def run_cli(train_fn, cfg, prog, errors=()):
    """Run a trainer from its command line: a problem with the inputs (a bad row, a missing or broken checkpoint, a
    resume that does not fit; `errors`: the trainer's own kinds of bad input) ends with one line naming it and exit
    status 1, not a traceback."""
    try:
        with checks.one_line_errors(prog, formats.DataError, *errors, RunError, hub.CheckpointError, FileNotFoundError,
                                    E.BenchError, NotADirectoryError, FileExistsError):
            return train_fn(cfg)
    finally:
        finish_run()
