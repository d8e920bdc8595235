"""model.py KV cache: extend in ragged chunks (with images mid-conversation) == one full forward; generate == transformers."""
import pytest
import torch

import decode
import hub
import model as M
from model_fixtures import hf, left_pad, ours, pixels, seq, tiny_dir

TOL = 1e-4


def _hf_generate(ref, ids, mask=None, pv=None, g=None, n=32, eos=None, pad=0):
    mm = {} if pv is None else {"pixel_values": pv, "image_grid_thw": g,  # 3-D positions need mm_token_type_ids
                                "mm_token_type_ids": (ids == ref.config.image_token_id).int()}
    out = ref.generate(input_ids=ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                       max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=pad, **mm)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("case", ["text", "image", "padded_batch"])
def test_greedy_matches_transformers_generate(case):
    d = tiny_dir()
    m, ref = ours(d), hf(d)
    c = m.cfg
    if case == "text":
        ids, mask, pv, g = torch.tensor([seq(c, [], text=(5, 6, 7, 8, 9))]), None, None, None
    elif case == "image":
        ids, mask = torch.tensor([seq(c, [(1, 10, 6)])]), None
        pv, g = pixels([(1, 10, 6)])
    else:
        grids = [(1, 4, 8), (1, 8, 8)]
        ids, mask = left_pad([seq(c, grids[:1]), seq(c, grids[1:], text=(5, 6, 7, 8, 9, 10, 11))], c.pad_token_id)
        pv, g = pixels(grids)
    never = c.text.vocab_size - 1  # a padded embedding row: run all 32 steps first
    free = decode.generate(m, ids, pv, g, attention_mask=mask, max_new_tokens=32, eos_token_id=never,
                      pad_token_id=c.pad_token_id)
    assert free.shape == (ids.shape[0], 32) and never not in free.tolist()[0]
    assert free.tolist() == _hf_generate(ref, ids, mask, pv, g, eos=never, pad=c.pad_token_id).tolist()
    # then stop on a token row 0 emits mid-way: rows stop at different steps and are padded after their stop token
    eos = int(free[0, 10])
    stopped = decode.generate(m, ids, pv, g, attention_mask=mask, max_new_tokens=32, eos_token_id=eos,
                         pad_token_id=c.pad_token_id)
    assert stopped.tolist() == _hf_generate(ref, ids, mask, pv, g, eos=eos, pad=c.pad_token_id).tolist()
    assert eos in stopped[0].tolist()


def _full_rows(m, rows, images):
    """Per-row full forward over that row's real tokens; images[r] = (grids, pixel_values)."""
    out = []
    for r, ids in enumerate(rows):
        grids, pv = images[r]
        with torch.no_grad():
            out.append(m(torch.tensor([ids]), pv, torch.tensor(grids) if grids else None)[0])
    return out


def test_extend_ragged_chunks_with_new_images_equals_full_forward():
    m = ours(tiny_dir())
    c = m.cfg
    P = c.pad_token_id
    img = lambda t, h, w: [c.vision_start_token_id] + [c.image_token_id] * (t * h * w // 4) + [c.vision_end_token_id]
    g_a, g_b, g_c = (1, 8, 8), (1, 4, 6), (1, 10, 6)
    pv_a, pv_b, pv_c = (pixels([g], seed=s)[0] for g, s in ((g_a, 1), (g_b, 2), (g_c, 3)))
    # three chunks; row 0 gets an image in chunk 0 and a zoom image in chunk 2, row 1 an image only in chunk 1,
    # row 2 has nothing at all to add in chunk 1
    chunks = [
        [[5, 6] + img(*g_a) + [7], [5, 6, 7, 8], [9, 10]],
        [[11, 12, 13], [14] + img(*g_b) + [15], []],
        [[16] + img(*g_c) + [17, 18], [19], [20, 21, 22]],
    ]
    chunk_images = [[(g_a, pv_a)], [(g_b, pv_b)], [(g_c, pv_c)]]
    cache = m.new_cache(3)
    got = [[] for _ in range(3)]
    for chunk, ims in zip(chunks, chunk_images):
        L = max(len(r) for r in chunk)
        ids = torch.tensor([r + [P] * (L - len(r)) for r in chunk])  # right-ragged, padding slots masked
        mask = torch.tensor([[True] * len(r) + [False] * (L - len(r)) for r in chunk])
        with torch.no_grad():
            lg = m.extend(cache, ids, mask, torch.cat([p for _, p in ims]), torch.tensor([gr for gr, _ in ims]))
        for r in range(3):
            got[r].append(lg[r][mask[r]])
    rows = [sum((ch[r] for ch in chunks), []) for r in range(3)]
    full = _full_rows(m, rows, [([g_a, g_c], torch.cat([pv_a, pv_c])), ([g_b], pv_b), ([], None)])
    for r in range(3):
        assert (torch.cat(got[r]) - full[r]).abs().max() <= TOL
    assert cache.length.tolist() == [len(r) for r in rows]


def test_extend_last_only_and_decode_positions():
    m = ours(tiny_dir())
    c = m.cfg
    grids = [(1, 6, 8)]
    prompt = seq(c, grids)
    pv, g = pixels(grids)
    cache = m.new_cache(2)
    ids, mask = left_pad([prompt, prompt[:3]], c.pad_token_id)
    pv2 = pv
    with torch.no_grad():
        last = m.extend(cache, ids, mask.bool(), pv2, g, last_only=True)
        full0 = m(torch.tensor([prompt]), pv, g)[0]
        full1 = m(torch.tensor([prompt[:3]]))[0]
    assert last.shape == (2, 1, c.text.vocab_size)
    assert (last[0, 0] - full0[-1]).abs().max() <= TOL and (last[1, 0] - full1[-1]).abs().max() <= TOL
    # decode two tokens; row 1 adds nothing in the first step -> its last_only logits stay those of its last token
    with torch.no_grad():
        step = m.extend(cache, torch.tensor([[30], [31]]), torch.tensor([[True], [False]]), last_only=True)
        assert (step[1, 0] - full1[-1]).abs().max() <= TOL
        step = m.extend(cache, torch.tensor([[32], [33]]), last_only=True)
        ref0 = m(torch.tensor([prompt + [30, 32]]), pv, g)[0, -1]
        ref1 = m(torch.tensor([prompt[:3] + [33]]))[0, -1]
    assert (step[0, 0] - ref0).abs().max() <= TOL and (step[1, 0] - ref1).abs().max() <= TOL


def test_repeat_interleave_and_select():
    m = ours(tiny_dir())
    c = m.cfg
    grids = [(1, 4, 4)]
    prompts = [seq(c, grids), [5, 6, 7, 8]]
    pv, g = pixels(grids)
    ids, mask = left_pad(prompts, c.pad_token_id)
    cache = m.new_cache(2)
    with torch.no_grad():
        m.extend(cache, ids, mask.bool(), pv, g)
    cache.repeat_interleave(3)                                   # rows: p0,p0,p0,p1,p1,p1
    assert cache.batch_size == 6 and cache.length.tolist() == [len(prompts[0])] * 3 + [4] * 3
    conts = [[40 + r, 50 + r] for r in range(6)]
    with torch.no_grad():
        lg = m.extend(cache, torch.tensor(conts))
    for r in range(6):
        p = prompts[r // 3]
        with torch.no_grad():
            ref = m(torch.tensor([p + conts[r]]), pv if r < 3 else None, g if r < 3 else None)[0, -2:]
        assert (lg[r] - ref).abs().max() <= TOL
    cache.select([4, 0])
    with torch.no_grad():
        lg = m.extend(cache, torch.tensor([[60], [61]]))
        ref4 = m(torch.tensor([prompts[1] + conts[4] + [60]]))[0, -1]
        ref0 = m(torch.tensor([prompts[0] + conts[0] + [61]]), pv, g)[0, -1]
    assert (lg[0, 0] - ref4).abs().max() <= TOL and (lg[1, 0] - ref0).abs().max() <= TOL


def test_sampling_controls():
    m = ours(tiny_dir())
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    greedy = decode.generate(m, ids, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(decode.generate(m, ids, max_new_tokens=8, do_sample=True, top_k=1, eos_token_id=[]), greedy)
    assert torch.equal(decode.generate(m, ids, max_new_tokens=8, do_sample=True, top_p=1e-6, eos_token_id=[]), greedy)
    a = decode.generate(m, ids, max_new_tokens=8, do_sample=True, temperature=5.0, eos_token_id=[],
                        generator=torch.Generator().manual_seed(1))
    b = decode.generate(m, ids, max_new_tokens=8, do_sample=True, temperature=5.0, eos_token_id=[],
                        generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, greedy)
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    draws = torch.stack([decode.sample_next(logits, True, 1.0, 0.7, 0, torch.Generator().manual_seed(s)) for s in range(200)])
    assert set(draws.flatten().tolist()) == {2, 3}             # p(3)=.64 < .7 -> keep {3, 2}, never 0 or 1
    draws = torch.stack([decode.sample_next(logits, True, 1.0, 1.0, 3, torch.Generator().manual_seed(s)) for s in range(200)])
    assert set(draws.flatten().tolist()) == {1, 2, 3}


def test_generation_config_sets_default_stop_tokens(tmp_path):
    import json
    import shutil
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_dir(), d)
    m = M.Qwen25VL.from_pretrained(d)
    ids = torch.tensor([[5, 6, 7, 8]])
    free = decode.generate(m, ids, max_new_tokens=12, eos_token_id=[])
    stop = int(free[0, 5])
    json.dump({"eos_token_id": [m.cfg.eos_token_id, stop], "pad_token_id": 3}, open(d / "generation_config.json", "w"))
    m2 = M.Qwen25VL.from_pretrained(d)
    out = decode.generate(m2, ids, max_new_tokens=12)
    assert out[0].tolist() == free[0, : free[0].tolist().index(stop) + 1].tolist()


def test_unreadable_checkpoint_keeps_the_cause_and_out_of_memory_passes_through(tmp_path, monkeypatch):
    import shutil
    import safetensors
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_dir(), d)
    path = d / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) // 2])                        # a cut download: the header read fails
    with pytest.raises(hub.CheckpointError, match="SafetensorError") as e:
        M.Qwen25VL.from_pretrained(d)
    assert str(path) in str(e.value) and isinstance(e.value.__cause__, safetensors.SafetensorError)
    path.write_bytes(raw)
    M.Qwen25VL.from_pretrained(d).save_pretrained(tmp_path / "sharded", max_shard_bytes=len(raw) // 3)
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:100])                  # a cut shard: the tensor loop fails
    with pytest.raises(hub.CheckpointError, match="SafetensorError") as e:
        M.Qwen25VL.from_pretrained(tmp_path / "sharded")
    assert str(shard) in str(e.value) and isinstance(e.value.__cause__, safetensors.SafetensorError)
    real_open = safetensors.safe_open
    for fail_at in (1, 2):                                       # 1: the header read, 2: the tensor loop
        calls = []

        def out_of_memory(*a, **k):
            calls.append(1)
            if len(calls) == fail_at:
                raise MemoryError("simulated")
            return real_open(*a, **k)

        monkeypatch.setattr(hub, "safe_open", out_of_memory)     # the names hub.py (headers) and model.py
        monkeypatch.setattr(M, "safe_open", out_of_memory)       # (tensors) read the files with
        with pytest.raises(MemoryError, match="simulated"):      # not relabelled as a corrupt file
            M.Qwen25VL.from_pretrained(d)
