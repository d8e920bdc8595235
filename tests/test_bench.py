"""bench.py: each benchmark runs on a tiny model and its baselines compute what ours computes (same tokens, same
logits), so its tables compare the cost of one computation. Speed itself is shown by the tables, never asserted."""
import bench


def test_bench_cof_baseline_gives_the_same_tokens(capsys):
    """`python bench.py cof`: the re-encode baseline (the spec loop, cof.reference_run), the one-cache loop and the
    batched loop make the same trajectories (forced zooms on a random model), so the table compares costs of one
    computation."""
    rows = bench.main(["cof", "--n", "2", "--hidden", "64", "--layers", "2", "--new_tokens", "6", "--zooms", "2"])
    assert [r["same_tokens_as_baseline"] for r in rows] == [True, True, True, True]
    assert [r["zooms"] for r in rows] == [2.0, 2.0, 2.0, 2.0]
    assert "re-encode each turn" in capsys.readouterr().out



def test_bench_model_rows_and_agreement(capsys):
    """`python bench.py model` on a tiny config: every row of the table, and ours agrees with transformers."""
    out = bench.main(["model", "--layers", "2", "--hidden", "128", "--image", "56", "--new_tokens", "4", "--reps", "1",
                      "--samples", "3", "--no_crop", "--threads", "1"])
    steps = [r[0] for r in out["rows"]]
    assert steps[:8] == [
        "vision encoder, 16 patches", f"prefill, vision + {steps[1].split()[-2]} tokens", "decode, batch 1",
        "decode, batch 1: ours compiled", "one prompt x 3 samples: prefill", "one prompt x 3 samples: decode",
        "one prompt x 3 samples: decode, ours compiled", f"training forward + backward, {steps[1].split()[-2]} tokens"]
    both = ["decode, batch 1: both compiled (transformers: static cache)",
            "one prompt x 3 samples: decode, both compiled"]
    assert steps[8:] == [s for s in both if s in steps[8:]]   # last (where this transformers compiles on the CPU)
    assert out["max_logit_diff"] < 1e-4 and out["greedy_same"]
    table = capsys.readouterr().out
    assert table.count("\n| ") == 1 + len(steps) and "ours compiled, transformers): True" in table


def test_bench_sampled_rollouts_on_records(tmp_path, capsys):
    """`python bench.py cof --model DIR --data FILE --samples G`: G sampled rollouts per question of a V*-layout file,
    counted right (rows = questions x G, tokens = what the trajectories generated)."""
    import json

    from PIL import Image

    from cof_fixtures import img
    from data.tiny import make_tiny

    model_dir = make_tiny(str(tmp_path / "m"), bpe_vocab_size=300)
    with open(tmp_path / "q.jsonl", "w") as f:
        for i in range(2):
            Image.fromarray(img(84, 112, i).permute(1, 2, 0).numpy()).save(tmp_path / f"{i}.png")
            f.write(json.dumps({"image": f"{i}.png", "text": f"What is {i}?\n(A) x\n(B) y", "label": "A"}) + "\n")
    rows = bench.main(["cof", "--model", model_dir, "--data", str(tmp_path / "q.jsonl"), "--n", "2", "--samples", "3",
                       "--threads", "1", "--cfg", "max_new_tokens=5", "--cfg", "max_turns=1"])
    eager, fast = rows
    for row in rows:
        assert row["gen_tokens"] <= 2 * 3 * 5 and row["gen_tokens"] > 0
        assert abs(row["rollouts_per_s"] - 3 * row["questions_per_s"]) < 1e-9
        assert abs(row["gen_tok_per_s"] * row["seconds"] - row["gen_tokens"]) < 1e-6
    assert fast["same_tokens_as_eager"] and fast["gen_tokens"] == eager["gen_tokens"]
    assert 0 <= fast["max_logprob_diff"] < 1e-4
    assert "2 questions x G=3" in capsys.readouterr().out


def test_bench_model_7b_preset_path_on_a_small_config(monkeypatch):
    """`python bench.py model --preset 7b` builds ours on the device (tiny.random_model), writes it with
    save_pretrained and has transformers load those files: run here with the 7B shapes swapped for small ones, the
    two models must agree as on the small preset's files. The real shapes are checked against the hub config."""
    import argparse
    import dataclasses
    import tempfile

    import torch

    import model as M
    import tokenizer as T
    from data import tiny

    real = tiny.qwen25vl_7b_config

    def small(tok):
        cfg = real(tok)
        text = dataclasses.replace(cfg.text, vocab_size=1024, hidden_size=256, intermediate_size=256,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
        vision = dataclasses.replace(cfg.vision, hidden_size=64, out_hidden_size=256, intermediate_size=128, depth=2,
                                     num_heads=2, fullatt_block_indexes=(1,))
        return dataclasses.replace(cfg, text=text, vision=vision)

    monkeypatch.setattr(tiny, "qwen25vl_7b_config", small)
    args = argparse.Namespace(preset="7b", dtype="float32", image=56)
    ours, ref, ids, pv, grid = bench._model_pair(args, torch.device("cpu"))
    assert ours.cfg.text.hidden_size == 256 and ours.source_dir is None
    with torch.no_grad():
        mm = (ids == ours.cfg.image_token_id).int()
        theirs = ref(input_ids=ids, pixel_values=pv, image_grid_thw=grid, mm_token_type_ids=mm).logits
        assert (ours(ids, pv, grid) - theirs).abs().max().item() < 1e-4
    tok = T.Tokenizer.from_pretrained(tiny.make_tiny(tempfile.mkdtemp()))
    n = sum(torch.Size(s).numel() for s in M.weight_shapes(real(tok)).values())
    assert n == 8_292_166_656            # Qwen2.5-VL-7B-Instruct: its index's total_size, 16,584,333,312 bytes of bf16
    net = tiny.random_model(small(tok), "cpu", torch.float32)
    w = dict(net.named_parameters())
    assert abs(w["model.layers.0.mlp.up_proj.weight"].std().item() - 0.02) < 1e-3
    assert (w["model.norm.weight"] == 1).all() and (w["model.layers.0.self_attn.q_proj.bias"] == 0).all()


def test_gpu_session_script_calls_options_that_exist():
    """tests/gpu_session.sh runs on a rented GPU where a typo costs the lease: its bench.py options must parse here."""
    import os
    import shlex

    script = open(os.path.join(os.path.dirname(__file__), "gpu_session.sh")).read()
    calls = [shlex.split(ln.split("python3 bench.py", 1)[1]) for ln in script.splitlines()
             if ln.strip().startswith("step ") and "bench.py" in ln]
    assert calls and all(bench.parser().parse_args(c).preset == "7b" for c in calls)
    for ln in script.splitlines():
        if ln.strip().startswith("step "):
            assert os.path.exists(os.path.join(os.path.dirname(__file__), "..", shlex.split(ln)[4])), ln
    from gpu_acceptance import CHECKS, _parse
    only = [_parse(shlex.split(ln.split("#")[0])[5:]).only for ln in script.splitlines()
            if ln.strip().startswith("step ") and "gpu_acceptance.py" in ln]
    assert len(only) == 1 and set(only[0].split(",")) == {name for name, _, _ in CHECKS} - {"crop"}


def test_bench_memory_reads_a_known_peak_and_measures_every_case():
    """`python bench.py memory`: the instrument reads a known allocation (256 MiB) as its size, and a small run (its
    own process: it sets glibc's mmap threshold) measures every case of (a) and (b), ours and both baselines."""
    import torch

    from procs import run_script

    gib, _ = bench._Peak(torch.device("cpu"))(lambda: torch.ones(64 * 2**20).sum())
    assert abs(gib - 0.25) < 0.02
    _, out, _ = run_script("bench.py", ["memory", "--lengths", "128", "--turn", "32", "--batches", "1x64",
                                        "--vocab", "1024", "--mlp", "64"], timeout=600)
    rows = [line.strip("| ").split(" | ") for line in out.splitlines() if line.startswith("| (")]
    assert [r[0] for r in rows] == [
        "(a) prefill, 4 prompts of 16/32/64/128 tokens", "(a) then a crop turn of 32/24/16/8 tokens",
        "(b) GRPO log-probs + entropy, forward + backward, 1 x 64 tokens",
        "(b) reference log-probs, no gradient, 1 x 64 tokens", "(b) SFT loss, forward + backward, 1 x 64 tokens"]
    for r in rows:   # columns: case, GiB ours, dense, ratio, transformers, ratio, seconds ours, dense, transformers
        b = r[0].startswith("(b)")                                       # (a) has no dense baseline
        assert all(0 <= float(r[i]) < 8 for i in [1, 4] + [2] * b), r
        assert all(float(r[i]) > 0 for i in [6, 8] + [7] * b), r
