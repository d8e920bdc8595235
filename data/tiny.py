"""The tiny Qwen2.5-VL and the built-in default run's data: what `python sft.py` / `python grpo.py` set up before
they train when no --model / --data is given, and the random models every test builds.

- `make_tiny` writes a random Qwen2.5-VL in the hub's HF format (config.json, model.safetensors, a byte-level BPE
  tokenizer.json trained on a small corpus, chat template, preprocessor_config.json) that both model.py and
  transformers load, so parity tests compare the two on the same files.
- `qwen25vl_7b_config` / `random_model`: the real 7B's shapes with random weights drawn on the device, for the GPU
  memory check and the 7B benchmark.
- `build_synthetic` / `build_tiny_model` make the default run's toy-V* dataset (data/build.py) and its tiny model
  (sizes TINY_MODEL, view capped at 112 x 112 px), rebuilding either when its recipe changed.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, pre_tokenizers, trainers

import cof
import crop_kernels as ck
import evaluate as E
import model as M
import tokenizer as T
from data import agent, build, formats

# The default run's model: 0.45 M parameters. rope_theta 1000 suits head_dim 16 (README "Teaching a tiny model from
# scratch" has the probe that chose it).
TINY_MODEL = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=192,
                  vision_hidden_size=64, vision_depth=2, vision_heads=2, vision_intermediate_size=128,
                  fullatt_block_indexes=(1,), bpe_vocab_size=1000, rope_theta=1000.0)
# The default run's view of every image: the processor's limits in the tiny model's preprocessor_config.json. The cap
# (data/agent.py) shows a 448 px scene as 112 x 112, which is what makes zooming necessary.
TINY_MIN_PIXELS, TINY_MAX_PIXELS = ck.PROCESSOR_MIN_PIXELS, agent.TINY_VIEW_MAX_PIXELS
TINY_MODEL_DIR = "runs/tiny-model"
SYNTH_DIR = "runs/synth"
SYNTH_ROWS = 2000


def seeded(directory, seed):
    """Where the default runs of --seed `seed` keep a directory: `directory` itself for seed 0, `directory-seedS`
    otherwise (each seed has its own dataset, tiny model and checkpoints)."""
    return directory if int(seed) == 0 else f"{directory}-seed{int(seed)}"


# --------------------------------------------------------------------------------------------------------------------
# Tiny random models in HF format (tests, benchmarks, the default run)

def default_tiny_corpus() -> list[str]:
    """Text the tiny BPE is trained on by default: CoF's released prompts, chat scaffolding and some plain English."""
    plain = ("What is the color of the cup? What is the material of the glove? Is the dog on the left or right side "
             "of the car? The answer is red. The object is small, so I need to zoom in to see it clearly. "
             "<think>The image shows a street scene. I should zoom in on the sign.</think> "
             "<answer>A</answer> <answer>B</answer> (A) blue (B) green (C) yellow (D) white "
             "{\"name\": \"image_zoom_in_tool\", \"arguments\": {\"bbox_2d\": [12, 40, 96, 128], \"label\": \"cup\"}} "
             "0 1 2 3 4 5 6 7 8 9 10 100 1000 system user assistant Describe this image.")
    return [cof.SYSTEM_PROMPT, cof.USER_PROMPT, plain] * 4


def _train_tiny_bpe(corpus, vocab_size: int):
    tok = T.qwen_bpe()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(list(corpus), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in T.QWEN_SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in T.QWEN_ADDED_TOKENS])
    return tok


def _mrope_section(head_dim: int) -> list[int]:
    if head_dim % 16:
        raise ValueError(f"text head_dim {head_dim} must be a multiple of 16 (M-RoPE sections t:h:w = 2:3:3)")
    return [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]


def make_tiny(directory, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
              vision_hidden_size=32, vision_depth=2, vision_heads=2, vision_intermediate_size=64,
              fullatt_block_indexes=(1,), window_size=112, bpe_vocab_size=800, corpus=None, tie_word_embeddings=False,
              layout="flat", seed=0, init_scale=1.0, rope_theta=1_000_000.0, min_pixels=ck.PROCESSOR_MIN_PIXELS,
              max_pixels=ck.PROCESSOR_MAX_PIXELS, init="random") -> str:
    """Write a random Qwen2.5-VL in HF format that both this file and transformers load.

    Files: config.json (`layout` "flat" = hub layout, "nested" = transformers-5 text_config layout), model.safetensors,
    tokenizer.json (byte-level BPE trained on `corpus`, default `default_tiny_corpus()`, plus Qwen's added tokens),
    tokenizer_config.json + chat_template.json (Qwen2.5-VL chat template), preprocessor_config.json (with the image
    processor's `min_pixels` / `max_pixels`: a tiny model may cap its view, e.g. 112*112 for the synthetic task).
    Weights are drawn with unit-variance activations (not transformers' 0.02 init) so parity tests see O(1) logits.
    `init`: "random" also draws every norm weight (1 + 0.2 N(0,1)) and bias (0.2 N(0,1)), so parity tests exercise
    every tensor; "train" sets norms to 1 and biases to 0 (transformers' convention), the start for training from
    scratch: random biases give every merged image token one shared component and slow learning to find things.
    """
    if init not in ("random", "train"):
        raise ValueError(f"init must be 'random' or 'train', got {init!r}")
    if layout not in ("flat", "nested"):
        raise ValueError(f"layout must be 'flat' or 'nested', got {layout!r}")
    os.makedirs(directory, exist_ok=True)
    tok = _train_tiny_bpe(corpus if corpus is not None else default_tiny_corpus(), bpe_vocab_size)
    n_tok = tok.get_vocab_size(with_added_tokens=True)
    vocab = (n_tok + 63) // 64 * 64  # embedding rows padded like the real checkpoints
    ids = {t: tok.token_to_id(t) for t in T.QWEN_SPECIAL_TOKENS}
    text = M.TextConfig(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=intermediate_size,
                        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                        rms_norm_eps=1e-6, rope_theta=rope_theta, mrope_section=_mrope_section(hidden_size // num_heads),
                        max_position_embeddings=32768)
    vision = M.VisionConfig(hidden_size=vision_hidden_size, out_hidden_size=hidden_size,
                            intermediate_size=vision_intermediate_size, depth=vision_depth, num_heads=vision_heads,
                            window_size=window_size, fullatt_block_indexes=tuple(fullatt_block_indexes), tokens_per_second=2)
    cfg = M.ModelConfig(text=text, vision=vision, tie_word_embeddings=tie_word_embeddings,
                        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                        torch_dtype="float32")
    _write_json(os.path.join(directory, "config.json"), _hf_config(cfg, layout))
    save_file(_random_weights(cfg, seed, init, init_scale), os.path.join(directory, "model.safetensors"),
              metadata={"format": "pt"})
    _write_processor_files(directory, tok, vision, min_pixels, max_pixels)
    return os.fspath(directory)


def qwen25vl_7b_config(tok) -> M.ModelConfig:
    """Qwen2.5-VL-7B-Instruct's shapes (the hub config.json: 28 layers of hidden 3584, GQA 28/4, vocabulary 152064; a
    32-block vision tower of hidden 1280) with the special-token ids of `tok`, a tiny tokenizer: its ids are valid
    rows of the 7B embedding, so prompts tokenize as usual. For memory and speed checks with random weights."""
    text = M.TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                        num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1e6,
                        mrope_section=(16, 24, 24), max_position_embeddings=128000)
    vision = M.VisionConfig(hidden_size=1280, out_hidden_size=3584, intermediate_size=3420, depth=32, num_heads=16,
                            window_size=112, fullatt_block_indexes=(7, 15, 23, 31), tokens_per_second=2)
    return M.ModelConfig(text=text, vision=vision, image_token_id=tok.image_pad_id, video_token_id=tok.video_pad_id,
                         vision_start_token_id=tok.vision_start_id, vision_end_token_id=tok.vision_end_id,
                         bos_token_id=tok.endoftext_id, eos_token_id=tok.im_end_id, pad_token_id=tok.pad_id,
                         torch_dtype="bfloat16")


def random_model(cfg: M.ModelConfig, device, dtype=torch.bfloat16, seed=0) -> M.Qwen25VL:
    """A model of `cfg` built in place on `device` (as from_pretrained builds one, no CPU copy), weights drawn there:
    matrices N(0, 0.02) (transformers' init), norms 1, biases 0. Seconds for 7B shapes on a GPU, where writing and
    reading a random checkpoint takes minutes."""
    with torch.device("meta"):
        net = M.Qwen25VL(cfg)
    net = net.to(dtype).to_empty(device=torch.device(device))
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.fill_(1.0 if "norm" in name or "ln_q" in name else 0.0)
    return net.eval()


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def _hf_config(cfg, layout):
    """config.json: the hub's flat layout, or transformers 5's nested one (text_config, rope_parameters)."""
    hf = cfg.to_hf()
    if layout == "flat":
        return hf
    vis = hf.pop("vision_config")
    vis["model_type"] = "qwen2_5_vl_vision"
    rope = hf.pop("rope_scaling")
    top = {k: hf.pop(k) for k in ("architectures", "model_type", "tie_word_embeddings", "image_token_id",
                                  "video_token_id", "vision_start_token_id", "vision_end_token_id", "torch_dtype")}
    hf["rope_parameters"] = {"rope_type": "default", "mrope_section": rope["mrope_section"],
                             "rope_theta": hf.pop("rope_theta")}
    hf["model_type"] = "qwen2_5_vl_text"
    top["dtype"] = top.pop("torch_dtype")
    return {**top, "text_config": hf, "vision_config": vis}


def _random_weights(cfg, seed, init, init_scale):
    """{hub tensor name: tensor} drawn in weight_shapes order from one seeded generator (see make_tiny)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in M.weight_shapes(cfg).items():
        if len(shape) == 1 and ("norm" in name or "ln_q" in name):
            t = 1.0 + 0.2 * torch.randn(shape, generator=g) * (init == "random")
        elif len(shape) == 1:  # bias
            t = 0.2 * torch.randn(shape, generator=g) * (init == "random")
        elif name == "model.embed_tokens.weight":
            t = 0.5 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=g) * (init_scale / math.sqrt(fan_in))
        tensors[name] = t.contiguous()
    return tensors


def _write_processor_files(directory, tok, vision, min_pixels, max_pixels):
    """tokenizer.json, tokenizer_config.json, chat_template.json and preprocessor_config.json as the hub has them."""
    tok.save(os.path.join(directory, "tokenizer.json"))
    added = {}
    for t in T.QWEN_SPECIAL_TOKENS + T.QWEN_ADDED_TOKENS:
        added[str(tok.token_to_id(t))] = {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": t in T.QWEN_SPECIAL_TOKENS}
    _write_json(os.path.join(directory, "tokenizer_config.json"), {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
        "additional_special_tokens": T.QWEN_SPECIAL_TOKENS[1:], "bos_token": None, "chat_template": T.CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 131072, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None, "processor_class": "Qwen2_5_VLProcessor"})
    _write_json(os.path.join(directory, "chat_template.json"), {"chat_template": T.CHAT_TEMPLATE})
    _write_json(os.path.join(directory, "preprocessor_config.json"), {
        "min_pixels": min_pixels, "max_pixels": max_pixels, "patch_size": vision.patch_size,
        "temporal_patch_size": vision.temporal_patch_size, "merge_size": vision.spatial_merge_size,
        "image_mean": list(ck.OPENAI_CLIP_MEAN), "image_std": list(ck.OPENAI_CLIP_STD),
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor", "resample": 3,
        "rescale_factor": 0.00392156862745098, "do_resize": True, "do_rescale": True, "do_normalize": True,
        "do_convert_rgb": True})


# --------------------------------------------------------------------------------------------------------------------
# The built-in default run's dataset and model (rebuilt when their recipe changes)

def synthetic_paths(directory):
    """(SFT train file, held-out records the default runs evaluate on) of the synthetic dataset under `directory`:
    test_by_kind.jsonl (build.BuildConfig.per_kind items of each question kind), so that every kind's rates are
    read off that many questions."""
    return os.path.join(directory, "sft_train.json"), os.path.join(directory, "test_by_kind.jsonl")


def build_synthetic(directory, seed=0, log=print):
    """The toy-V* dataset (data/build.py) of `seed` under `directory`, rebuilt when it is missing or was built by
    another recipe (other build options or data.build.VERSION). Returns synthetic_paths(directory)."""
    cfg = build.BuildConfig(out=os.path.abspath(directory), n=SYNTH_ROWS, seed=seed, table_items=0)
    train, held_out = synthetic_paths(directory)
    want = {"config": dataclasses.asdict(cfg), "version": build.VERSION}
    card = os.path.join(directory, "card.json")
    if not (E.matches_record(card, want) and os.path.exists(train) and os.path.exists(held_out)):
        if os.path.exists(card):
            log(f"{directory} was built by another recipe: rebuilding it")
            shutil.rmtree(directory)
        t0 = time.time()
        build.build(cfg)
        log(f"built the synthetic dataset in {directory} ({time.time() - t0:.0f} s)")
    return train, held_out


def build_tiny_model(directory, data_path, seed=0, log=print):
    """The tiny model (make_tiny, sizes TINY_MODEL, init "train" drawn from `seed`, view TINY_MIN/MAX_PIXELS) under
    `directory`, rebuilt when it is missing or was made from other sizes, data or seed; its BPE vocabulary is trained
    on the text of the training rows so that CoF's long prompts cost few tokens."""
    recipe = os.path.join(directory, "tiny_recipe.json")
    want = {"sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_MODEL.items()},
            "data": os.path.abspath(data_path), "data_bytes": os.path.getsize(data_path),
            "min_pixels": TINY_MIN_PIXELS, "max_pixels": TINY_MAX_PIXELS, "seed": int(seed)}
    if not (os.path.exists(os.path.join(directory, "model.safetensors")) and E.matches_record(recipe, want)):
        rows, _ = formats.read_sft(data_path)
        corpus = [m["content"].replace("<image>", "") for r in rows[:1000] for m in r["messages"]]
        make_tiny(directory, corpus=corpus, seed=int(seed), min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS,
                  init="train", **TINY_MODEL)
        formats.write_atomic(recipe, json.dumps(want, indent=1))
        log(f"built the tiny model in {directory}")
    return directory
