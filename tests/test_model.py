"""model.py against transformers' Qwen2_5_VLForConditionalGeneration (fp32, CPU, tiny random checkpoints)."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import model as M
from model_fixtures import hf, hf_logits, hf_processor, left_pad, ours, pixels, seq, tiny_dir
from data import tiny
import tokenizer as T
import crop_kernels as ck
import hub
import logprobs

TOL = 1e-4


def test_config_layouts_agree():
    flat = json.load(open(os.path.join(tiny_dir("flat"), "config.json")))
    nested = json.load(open(os.path.join(tiny_dir("nested", tie=True), "config.json")))
    assert "text_config" in nested and "text_config" not in flat and "rope_scaling" in flat
    a, b = M.ModelConfig.from_hf(flat), M.ModelConfig.from_hf(nested)
    assert a.text == b.text and a.vision == b.vision
    assert (a.tie_word_embeddings, b.tie_word_embeddings) == (False, True)
    assert a.text.mrope_section == (2, 3, 3) and a.vision.fullatt_block_indexes == (1,)


def test_config_hub_legacy_keys():
    d = json.load(open(os.path.join(tiny_dir("flat"), "config.json")))
    v = d["vision_config"]
    v["spatial_patch_size"] = v.pop("patch_size")  # legacy key name
    d["num_key_value_heads"] = None                # null -> num_attention_heads, like transformers
    with pytest.warns(UserWarning, match="some_new_key"):
        c = M.ModelConfig.from_hf({**d, "some_new_key": 1})
    assert c.vision.patch_size == 14 and c.text.num_key_value_heads == 4


@pytest.mark.parametrize("key,msg", [("model_type", "model_type is 'qwen2_vl'"), ("hidden_size", "hidden_size"),
                                     ("rope_scaling", "mrope_section")])
def test_config_errors(key, msg):
    d = json.load(open(os.path.join(tiny_dir("flat"), "config.json")))
    if key == "model_type":
        d[key] = "qwen2_vl"
    else:
        del d[key]
    with pytest.raises(ValueError, match=msg):
        M.ModelConfig.from_hf(d)


CASES = {
    "text_only": [],
    "one_image_one_window": [(1, 8, 8)],
    "two_images_different_sizes": [(1, 10, 6), (1, 4, 12)],   # partial windows, unequal full-attention segments
    "grid_not_divisible_by_window": [(1, 20, 14)],            # merged 10x7: windows 4,4,2 x 4,3
}


@pytest.mark.parametrize("layout,tie", [("flat", False), ("nested", True)])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(layout, tie, case):
    d = tiny_dir(layout, tie=tie)
    m, ref = ours(d), hf(d)
    grids = CASES[case]
    ids = torch.tensor([seq(m.cfg, grids)])
    pv, g = pixels(grids)
    with torch.no_grad():
        a = m(ids, pv, g)
    b = hf_logits(ref, ids, pv, g)
    assert a.shape == b.shape == (1, ids.shape[1], m.cfg.text.vocab_size)
    assert a.std() > 0.5  # O(1) logits, so a 1e-4 match means something
    assert (a - b).abs().max() <= TOL


def test_train_init_is_plain_qwen(tmp_path):
    """make_tiny(init="train"): unit norms, zero biases, otherwise the same draw; transformers gives the same logits."""
    d = tiny.make_tiny(str(tmp_path / "t"), init="train", seed=3)
    m, ref = M.Qwen25VL.from_pretrained(d), hf(d)
    sd = m.state_dict()
    norms = [k for k in sd if k.endswith(".weight") and sd[k].dim() == 1]
    biases = [k for k in sd if k.endswith(".bias")]
    assert len(norms) > 5 and len(biases) > 5
    assert all(torch.equal(sd[k], torch.ones_like(sd[k])) for k in norms)
    assert all(torch.equal(sd[k], torch.zeros_like(sd[k])) for k in biases)
    grids = CASES[list(CASES)[1]]
    ids = torch.tensor([seq(m.cfg, grids)])
    pv, g = pixels(grids)
    with torch.no_grad():
        assert (m(ids, pv, g) - hf_logits(ref, ids, pv, g)).abs().max() <= TOL
    with pytest.raises(ValueError, match="init must be"):
        tiny.make_tiny(str(tmp_path / "u"), init="zeros")


def test_images_change_logits():
    m = ours(tiny_dir())
    grids = [(1, 8, 8)]
    ids = torch.tensor([seq(m.cfg, grids)])
    pv, g = pixels(grids)
    with torch.no_grad():
        a, b = m(ids, pv, g), m(ids, pv.flip(0), g)
    assert (a - b)[0, 3:].abs().max() > 0.1


def test_padded_batch_matches_transformers():
    d = tiny_dir()
    m, ref = ours(d), hf(d)
    g1, g2 = [(1, 8, 12)], [(1, 4, 4), (1, 6, 10)]
    rows = [seq(m.cfg, g1, text=(5, 6)), seq(m.cfg, g2, text=(5, 6, 7, 8, 9, 10, 11, 12, 13))]
    ids, mask = left_pad(rows, pad_id=m.cfg.pad_token_id)
    assert mask[0, 0] == 0
    pv, g = pixels(g1 + g2)
    with torch.no_grad():
        a = m(ids, pv, g, attention_mask=mask)
    b = hf_logits(ref, ids, pv, g, mask)
    real = mask.bool()
    assert (a[real] - b[real]).abs().max() <= TOL
    for r, row in enumerate(rows):  # each row equals its own unpadded forward
        gr = g1 if r == 0 else g2
        pr, gg = pixels(gr, seed=0) if r == 0 else (pv[pixels(g1)[0].shape[0]:], torch.tensor(g2))
        with torch.no_grad():
            single = m(torch.tensor([row]), pr, gg)
        assert (a[r][real[r]] - single[0]).abs().max() <= TOL
    # right padding (sft.py's batches): the real rows still match transformers
    L = max(len(r) for r in rows)
    ids = torch.tensor([r + [m.cfg.pad_token_id] * (L - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows])
    with torch.no_grad():
        a = m(ids, pv, g, attention_mask=mask)
    b = hf_logits(ref, ids, pv, g, mask)
    real = mask.bool()
    assert mask[0, -1] == 0 and (a[real] - b[real]).abs().max() <= TOL


def test_image_token_count_mismatch():
    m = ours(tiny_dir())
    ids = torch.tensor([seq(m.cfg, [(1, 8, 8)])])
    pv, g = pixels([(1, 8, 12)])
    with pytest.raises(ValueError, match="image"):
        m(ids, pv, g)
    with pytest.raises(ValueError, match="no pixel_values"):
        m(ids)


# ---- weights -----------------------------------------------------------------------------------------------------

def _copy(tmp_path, src):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_bad_checkpoints(tmp_path):
    from safetensors.torch import load_file, save_file
    src = tiny_dir()
    d = _copy(tmp_path, src)
    w = load_file(d / "model.safetensors")
    missing = dict(w)
    del missing["model.layers.1.self_attn.k_proj.bias"]
    save_file(missing, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensor.*model\.layers\.1\.self_attn\.k_proj\.bias"):
        M.Qwen25VL.from_pretrained(d)
    wrong = dict(w)
    wrong["visual.blocks.0.attn.qkv.weight"] = torch.zeros(96, 31)
    save_file(wrong, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"visual\.blocks\.0\.attn\.qkv\.weight.*\[96, 31\].*\[96, 32\]"):
        M.Qwen25VL.from_pretrained(d)
    extra = dict(w)
    extra["model.layers.7.mlp.up_proj.weight"] = torch.zeros(2, 2)
    save_file(extra, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.7\.mlp\.up_proj\.weight'"):
        M.Qwen25VL.from_pretrained(d)
    save_file(w, d / "model.safetensors")
    raw = (d / "model.safetensors").read_bytes()
    for cut in (len(raw) // 2, len(raw) - 100, 20):  # data cut short; header cut short
        (d / "model.safetensors").write_bytes(raw[:cut])
        with pytest.raises(ValueError, match=r"model\.safetensors.*truncated or corrupt"):
            M.Qwen25VL.from_pretrained(d)
    cfg = json.load(open(d / "config.json"))
    cfg["model_type"] = "llava"
    json.dump(cfg, open(d / "config.json", "w"))
    with pytest.raises(ValueError, match="model_type is 'llava'"):
        M.Qwen25VL.from_pretrained(d)


def test_sharded_and_bf16_loading(tmp_path):
    src = tiny_dir()
    m = ours(src)
    m.save_pretrained(tmp_path / "sharded", max_shard_bytes=200_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    m2 = M.Qwen25VL.from_pretrained(tmp_path / "sharded")
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    m3 = M.Qwen25VL.from_pretrained(src, dtype=torch.bfloat16)
    assert m3.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert torch.equal(m3.visual.blocks[0].attn.qkv.weight, m.visual.blocks[0].attn.qkv.weight.bfloat16())


def test_save_pretrained_loads_in_transformers(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration
    for tie in (False, True):
        m = ours(tiny_dir("nested", tie=tie))
        out = tmp_path / f"saved_{tie}"
        m.save_pretrained(out)
        assert (out / "tokenizer.json").exists()
        ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
        grids = [(1, 6, 8)]
        ids = torch.tensor([seq(m.cfg, grids)])
        pv, g = pixels(grids)
        with torch.no_grad():
            a = m(ids, pv, g)
        assert (a - hf_logits(ref, ids, pv, g)).abs().max() <= TOL
        assert torch.equal(M.Qwen25VL.from_pretrained(out)(ids, pv, g), a)


def test_hub_id_offline_message(monkeypatch, tmp_path):
    import huggingface_hub

    def offline(*a, **k):
        raise huggingface_hub.errors.LocalEntryNotFoundError("no connection")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError, match="huggingface-cli download Qwen/Qwen2.5-VL-7B-Instruct --local-dir"):
        M.Qwen25VL.from_pretrained("Qwen/Qwen2.5-VL-7B-Instruct")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        M.Qwen25VL.from_pretrained(str(tmp_path / "nope"))


# ---- tokenizer and chat layout -----------------------------------------------------------------------------------

def _messages():
    sys_prompt, user_suffix = tiny.default_tiny_corpus()[:2]
    return [
        {"role": "system", "content": sys_prompt},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is  the color?\n\n" + user_suffix}]},
        {"role": "assistant", "content": "<think>zoom</think> <tool_call>\n{\"name\": 1}\n</tool_call>"},
        {"role": "user", "content": [{"type": "text", "text": "\nhere"}, {"type": "image"}]},
        {"role": "assistant", "content": "  <answer>B</answer>\n"},
    ]


def test_chat_ids_match_transformers_processor():
    d = tiny_dir()
    proc, tok = hf_processor(d), T.Tokenizer.from_pretrained(d)
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (100, 130, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 255, (60, 200, 3), dtype=np.uint8))]
    for msgs, gen in [(_messages()[1:2], True), (_messages()[:2], True), (_messages(), False)]:
        n_img = sum(isinstance(x["content"], list) and sum(c["type"] == "image" for c in x["content"]) for x in msgs)
        text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        out = proc(text=[text], images=imgs[:n_img], return_tensors="pt")
        ids, mask = T.tokenize_chat(tok, msgs, out["image_grid_thw"], add_generation_prompt=gen)
        assert ids == out["input_ids"][0].tolist()
        assert len(mask) == len(ids)
    ids, mask = T.tokenize_chat(tok, _messages(), out["image_grid_thw"])  # last `out` is the full conversation's
    got = tok.decode([i for i, k in zip(ids, mask) if k])
    assert got == ("<think>zoom</think> <tool_call>\n{\"name\": 1}\n</tool_call><|im_end|>"
                   "  <answer>B</answer>\n<|im_end|>")
    assert ids.count(tok.image_pad_id) == int(out["image_grid_thw"].prod(-1).sum()) // 4


def test_tokenizer_matches_transformers_and_compresses_prompt():
    from transformers import AutoTokenizer
    d = tiny_dir()
    tok, ref = T.Tokenizer.from_pretrained(d), AutoTokenizer.from_pretrained(d)
    for s in ["hello <|im_start|> world\n\n x", "Ünïcödé  tabs\t\tand 1234567 <tool_call>{\"a\": [1, 2]}</tool_call>",
              "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>what's it?"]:
        assert tok.encode(s) == ref(s, add_special_tokens=False).input_ids
        assert tok.decode(tok.encode(s)) == s
    assert tok.decode(tok.encode("a<|im_end|>b"), skip_special_tokens=True) == "ab"
    assert (tok.eos_id, tok.pad_id) == (tok.im_end_id, tok.tok.token_to_id("<|endoftext|>"))
    cfg = ours(d).cfg
    assert (tok.image_pad_id, tok.vision_start_id, tok.vision_end_id) == \
        (cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id)
    system_prompt = tiny.default_tiny_corpus()[0]
    assert len(system_prompt) > 1000 and len(tok.encode(system_prompt)) < 300  # bytes would be > 1000


def test_tokenize_chat_errors():
    tok = T.Tokenizer.from_pretrained(tiny_dir())
    with pytest.raises(ValueError, match="image 1 has no entry"):
        T.tokenize_chat(tok, [{"role": "user", "content": [{"type": "image"}]}])
    with pytest.raises(ValueError, match="2 entries but the messages contain 1"):
        T.tokenize_chat(tok, [{"role": "user", "content": [{"type": "image"}]}], [[1, 4, 4], [1, 4, 4]])


def test_preprocess_image_matches_transformers_pil_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    ref = Qwen2VLImageProcessorPil.from_pretrained(tiny_dir())
    rng = np.random.default_rng(0)
    for hw, mx in [((97, 143), 12845056), ((300, 200), 28 * 28 * 40), ((56, 84), 12845056)]:
        arr = rng.integers(0, 255, (*hw, 3), dtype=np.uint8)
        pv, g = ck.preprocess_image(torch.from_numpy(arr).permute(2, 0, 1), max_pixels=mx)
        out = ref(images=[Image.fromarray(arr)], size={"shortest_edge": 3136, "longest_edge": mx}, return_tensors="pt")
        assert g.tolist() == out["image_grid_thw"].tolist()
        assert torch.equal(pv, out["pixel_values"])


def test_gradients_match_transformers():
    """SFT/GRPO train through forward(): the same loss gives the same parameter gradients as transformers."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    d = tiny_dir()
    m = M.Qwen25VL.from_pretrained(d)
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(d, dtype=torch.float32)
    grids = [(1, 6, 10)]
    ids, mask = left_pad([seq(m.cfg, grids), [5, 6, 7, 8, 9]], m.cfg.pad_token_id)
    pv, g = pixels(grids)
    labels = torch.where(mask.bool(), ids.roll(-1, 1), -100)[:, :-1]

    def loss(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1))

    loss(m(ids, pv, g, attention_mask=mask)).backward()
    loss(ref(input_ids=ids, pixel_values=pv, image_grid_thw=g, attention_mask=mask,
             mm_token_type_ids=(ids == m.cfg.image_token_id).int()).logits).backward()
    theirs = {hub.disk_name(k): p.grad for k, p in ref.named_parameters()}
    for name in ["visual.patch_embed.proj.weight", "visual.blocks.0.attn.qkv.weight", "visual.merger.mlp.0.weight",
                 "model.layers.0.self_attn.q_proj.bias", "model.layers.1.mlp.down_proj.weight", "lm_head.weight",
                 "model.embed_tokens.weight"]:
        ours_g = m.get_parameter(name).grad
        assert ours_g.abs().max() > 0
        assert (ours_g - theirs[name]).abs().max() <= 1e-4 * max(1.0, theirs[name].abs().max().item()), name


HUB_7B_CONFIG = {  # Qwen/Qwen2.5-VL-7B-Instruct config.json (hub flat layout, legacy vision keys)
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
    "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 3584,
    "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 128000, "max_window_layers": 28,
    "model_type": "qwen2_5_vl", "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True, "use_sliding_window": False,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 152064,
}


def test_real_config_layouts_parse_without_warnings(tmp_path, recwarn):
    from transformers import Qwen2_5_VLConfig
    c = M.ModelConfig.from_hf(HUB_7B_CONFIG)
    assert (c.text.hidden_size, c.text.num_key_value_heads, c.text.rms_norm_eps, c.vision.intermediate_size) == \
        (3584, 4, 1e-6, 3420)
    assert c.text.mrope_section == (16, 24, 24) and c.torch_dtype == "bfloat16" and not c.tie_word_embeddings
    shapes = M.weight_shapes(c)
    assert len(shapes) == 729 and shapes["model.layers.0.self_attn.k_proj.weight"] == (512, 3584)
    assert shapes["visual.merger.mlp.2.weight"] == (3584, 5120)
    # the nested layout transformers itself writes for the same checkpoint
    Qwen2_5_VLConfig(**HUB_7B_CONFIG).save_pretrained(tmp_path)
    nested = json.load(open(tmp_path / "config.json"))
    assert "text_config" in nested
    c2 = M.ModelConfig.from_hf(nested)
    assert c2.text == c.text and c2.vision == c.vision
    assert not [w for w in recwarn if "ignoring keys" in str(w.message)]


def test_bf16_bit_identical_to_transformers_on_cpu():
    """Same kernels in the same order: window attention batched per window size reproduces transformers'
    per-window calls exactly (a padded/masked single call would differ by bf16 ulps)."""
    d = tiny_dir()
    m = M.Qwen25VL.from_pretrained(d, dtype=torch.bfloat16)
    from transformers import Qwen2_5_VLForConditionalGeneration
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(d, dtype=torch.bfloat16).eval()
    for grids in ([], [(1, 10, 6), (1, 4, 12)]):
        ids = torch.tensor([seq(m.cfg, grids)])
        pv, g = pixels(grids)
        with torch.no_grad():
            assert torch.equal(m(ids, pv, g), hf_logits(ref, ids, pv, g))


def test_image_limits_from_preprocessor_config(tmp_path):
    """make_tiny writes the processor's pixel limits; from_pretrained reads both preprocessor_config.json layouts."""
    d = tiny.make_tiny(tmp_path / "m", max_pixels=112 * 112, bpe_vocab_size=300)
    net = M.Qwen25VL.from_pretrained(d)
    assert (net.image_min_pixels, net.image_max_pixels) == (3136, 12544)
    pp_path = tmp_path / "m" / "preprocessor_config.json"
    pp = json.loads(pp_path.read_text())
    del pp["min_pixels"], pp["max_pixels"]
    pp["size"] = {"shortest_edge": 784, "longest_edge": 50176}  # transformers 5 layout
    pp_path.write_text(json.dumps(pp))
    assert ck.read_image_limits(d) == (784, 50176)
    pp["size"] = {"shortest_edge": 50176, "longest_edge": 784}
    pp_path.write_text(json.dumps(pp))
    with pytest.raises(ValueError, match="min_pixels/max_pixels"):
        ck.read_image_limits(d)


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
@pytest.mark.parametrize("case", ["grpo", "sft"])
def test_token_logprobs_equal_the_dense_computation(case, chunk, monkeypatch):
    """forward(targets=...) puts only the scored positions through the head, `chunk` at a time (7 divides neither T
    nor their count): the log-probs (and GRPO's entropies) of policy_log_softmax over the full logits, the same
    gradient of every weight, and no tensor with more than `chunk` rows of V columns, forward or backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    m = M.Qwen25VL.from_pretrained(tiny_dir())
    V = m.cfg.text.vocab_size
    grids = [(1, 8, 12)]
    rows = [seq(m.cfg, grids, text=tuple(range(5, 20))), list(range(5, 30))]
    ids, mask = left_pad(rows, m.cfg.pad_token_id)                                     # left padding: ragged rows
    pv, g = pixels(grids)
    banned = [m.cfg.image_token_id, m.cfg.vision_start_token_id]                        # never a GRPO target
    scored = mask.bool() & (torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.8)
    scored &= ~torch.isin(ids.roll(-1, 1), torch.tensor(banned))
    scored[:, -1] = False
    targets = torch.where(scored, ids.roll(-1, 1), -100)                               # [B, T]
    n = int(scored.sum())
    assert n % 7 and ids.shape[1] % 7 and n > 20
    kw = dict(banned=banned, temperature=0.7) if case == "grpo" else {}
    lp_all = logprobs.policy_log_softmax(m(ids, pv, g, attention_mask=mask), **kw)            # [B, T, V] the dense way
    ref = lp_all[scored].gather(-1, targets[scored][:, None])[:, 0]                    # [n]
    ref_ent = -(lp_all.exp() * lp_all.nan_to_num(0.0)).sum(-1)[scored]
    weight = torch.randn(n, generator=torch.Generator().manual_seed(2))                # a loss of the log-probs
    (ref * weight).sum().backward()
    dense = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)

    class Widest(TorchDispatchMode):   # the most rows of V columns an op makes (views, e.g. of the head, aside)
        rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == V and not func.is_view:
                    Widest.rows = max(Widest.rows, t.numel() // V)
            return out

    monkeypatch.setattr(logprobs, "LOGPROB_CHUNK", chunk)
    with Widest():
        logp, ent = m(ids, pv, g, attention_mask=mask, targets=targets, entropy=case == "grpo", **kw)
        (logp[scored] * weight).sum().backward()
    assert Widest.rows == min(chunk, n)
    assert torch.all(logp[~scored] == 0) and (logp[scored] - ref).abs().max() <= 1e-5
    if case == "grpo":
        assert (ent[scored] - ref_ent).abs().max() <= 1e-5 and not ent.requires_grad
    for k, p in m.named_parameters():
        scale = max(1.0, dense[k].abs().max().item())
        assert (p.grad - dense[k]).abs().max() <= 1e-5 * scale, k


def test_ragged_chunks_build_no_head_group_mask(monkeypatch):
    """A left-padded prefill and a ragged cached append (a crop turn) hand SDPA no mask for rows that start at slot
    0 and at most one row's [n, s] mask otherwise, never [B, 1, G*L, S] or [B, 1, L, S]; logits as a full forward."""
    m = ours(tiny_dir())
    G = m.cfg.text.num_attention_heads // m.cfg.text.num_key_value_heads
    assert G > 1
    masks, real = [], F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, **kw):
        if attn_mask is not None:
            masks.append(attn_mask.numel())
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    grids = [(1, 8, 8)]
    prompts = [seq(m.cfg, grids), [5, 6, 7], seq(m.cfg, [], text=tuple(range(5, 25)))]
    turns = [[40, 41], [30, 31, 32, 33, 34, 35, 36], [50, 51, 52, 53]]
    ids, mask = left_pad(prompts, m.cfg.pad_token_id)
    cache = m.new_cache(3)
    with torch.no_grad():
        m.extend(cache, ids, mask.bool(), *pixels(grids))
        assert masks == []                                     # every row from slot 0: is_causal, no mask
        L = max(len(t) for t in turns)
        chunk = torch.tensor([t + [0] * (L - len(t)) for t in turns])
        got = m.extend(cache, chunk, torch.tensor([[1] * len(t) + [0] * (L - len(t)) for t in turns]).bool())
        for r in range(3):
            full = m(torch.tensor([prompts[r] + turns[r]]), *(pixels(grids) if r == 0 else (None, None)))[0]
            assert (got[r, :len(turns[r])] - full[-len(turns[r]):]).abs().max() <= TOL
    rows = [len(t) * (len(p) + len(t)) for p, t in zip(prompts, turns)]   # one row's [n, s]
    assert max(masks) == max(rows) < L * (max(len(p) for p in prompts) + L)   # < even one [L, S]


def test_vision_windows_split_past_the_call_limit(monkeypatch):
    """More than WINDOWS_PER_CALL windows of one size go through several SDPA calls: the same features, bit for bit."""
    m = ours(tiny_dir())
    pv, g = pixels([(1, 16, 24)])                              # 2 x 3 windows of 8 x 8 patches
    with torch.no_grad():
        one = m.visual(pv, g)
    calls, real = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, *a, **k: calls.append(q.shape[0]) or real(q, *a, **k))
    monkeypatch.setattr(M, "WINDOWS_PER_CALL", 2)
    with torch.no_grad():
        split = m.visual(pv, g)
    assert calls == [2, 2, 2, 1]                               # block 0: 6 windows in three calls; block 1: the image
    assert torch.equal(one, split)
