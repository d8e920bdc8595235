"""bench.py: each benchmark runs on a tiny model and its baselines compute what ours computes (same tokens, same
logits), so its tables compare the cost of one computation. Speed itself is shown by the tables, never asserted."""
import bench


def test_bench_cof_baseline_gives_the_same_tokens(capsys):
    """`python bench.py cof`: the re-encode baseline, the one-cache loop and the batched loop make the same
    trajectories (forced zooms on a random model), so the table compares costs of one computation."""
    rows = bench.main(["cof", "--n", "2", "--hidden", "64", "--layers", "2", "--new-tokens", "6", "--zooms", "2"])
    assert [r["same_tokens_as_baseline"] for r in rows] == [True, True, True, True]
    assert [r["zooms"] for r in rows] == [2.0, 2.0, 2.0, 2.0]
    assert "re-encode each turn" in capsys.readouterr().out



def test_bench_model_rows_and_agreement(capsys):
    """`python bench.py model` on a tiny config: every row of the table, and ours agrees with transformers."""
    out = bench.main(["model", "--layers", "2", "--hidden", "128", "--image", "56", "--new_tokens", "4", "--reps", "1",
                      "--samples", "3", "--no_crop", "--threads", "1"])
    steps = [r[0] for r in out["rows"]]
    both = ["decode, batch 1: both compiled (transformers: static cache)",
            "one prompt x 3 samples: decode, both compiled"]
    assert [s for s in steps if s not in both] == [
        "vision encoder, 16 patches", f"prefill, vision + {steps[1].split()[-2]} tokens", "decode, batch 1",
        "decode, batch 1: ours compiled", "one prompt x 3 samples: prefill", "one prompt x 3 samples: decode",
        "one prompt x 3 samples: decode, ours compiled", f"training forward + backward, {steps[1].split()[-2]} tokens"]
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
