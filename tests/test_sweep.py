"""The resolution sweep's setting and tables (sweep.py): stripe periods and the agent's acuity in data/, the forced
direct answers of CofConfig.direct, and the table / plot code on records whose numbers are known."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import cof
import model as M
import sweep
import tokenizer as T
from data import agent, build, synth
from cof_fixtures import boost
from data.tiny import make_tiny

PERIODS = build.BuildConfig(periods=sweep.PERIODS).parsed_periods()


def test_periods_change_only_the_stripes():
    plain = synth.make_split(3, "train", 30)
    wide = synth.make_split(3, "train", 30, periods=PERIODS)
    assert PERIODS == {"easy": 20.0, "edge": 20.0, "medium": 7.5, "hard": 5.0}
    for a, b in zip(plain, wide):
        assert (a.question, a.label, a.target_box, a.detail_box) == (b.question, b.label, b.target_box, b.detail_box)
        assert [(o.cell, o.colour, o.shape, o.box, o.tag) for o in a.objects] == \
            [(o.cell, o.colour, o.shape, o.box, o.tag) for o in b.objects]
        for oa, ob in zip(a.objects, b.objects):            # every texture, distractors' too, swaps its period
            for ta, tb in zip(oa.textures, ob.textures):
                want = {synth.PERIOD[d]: PERIODS[d] for d in synth.PERIOD}[ta.period]
                assert (ta.box, ta.orientation, tb.period) == (tb.box, tb.orientation, want)
    assert {t.period for sc in wide for t in sc.details} == set(PERIODS.values())
    for bad in ({"huge": 3.0}, {"medium": 1.0}, {"hard": float("nan")}):
        with pytest.raises(ValueError, match="stripe periods"):
            synth.check_periods(bad)
    with pytest.raises(ValueError, match="difficulty=px"):
        build.BuildConfig(periods="medium:6").parsed_periods()


def test_the_setting_crosses_over_where_the_docstring_says():
    """sweep.py's claims, measured by the reader with the acuity rule: easy direct everywhere; medium needs a zoom at
    140..280 and is direct from 336; hard needs a zoom at 224..392 and is direct at 448; nothing below that."""
    rows = build.legibility_table(resolutions=(112, 168, 280, 336, 392, 448), view_max_pixels=sweep.VIEW_MAX_PIXELS,
                                  n=2, acuity=sweep.ACUITY, periods=PERIODS)
    got = {(r["resolution"], r["category"][:3], r["difficulty"]): (r["main_legible"], r["cell_legible"]) for r in rows}
    assert all(got[(R, "dir", "easy")] == (1, 1) for R in (112, 168, 448))
    assert got[(112, "dir", "medium")] == (0, 0) and got[(168, "dir", "medium")] == (0, 1)
    assert got[(280, "dir", "medium")] == (0, 1) and got[(336, "dir", "medium")] == (1, 1)
    assert got[(168, "dir", "hard")] == (0, 0) and got[(280, "dir", "hard")] == (0, 1)
    assert got[(392, "dir", "hard")] == (0, 1) and got[(448, "dir", "hard")] == (1, 1)
    main = {r["resolution"]: r["main_px"] for r in rows}
    assert main == {R: R for R in (112, 168, 280, 336, 392, 448)}        # no rung is shrunk for the model


def _search(sc, R, acuity, always_zoom=False):
    world = agent.scene_world(sc, synth.render(sc), R, sweep.VIEW_MAX_PIXELS, acuity)
    return agent.search(world, agent.OracleTools(), always_zoom=always_zoom)


def test_acuity_is_what_makes_the_agent_zoom():
    sc = synth.make_scene(synth.scene_rng(0, "test", 5), category="direct_attributes", difficulty="medium",
                          periods=PERIODS)
    ideal, sharp = _search(sc, 280, 0.0), _search(sc, 280, sweep.ACUITY)
    # at 280 px the stripes are 4.7 px in the view: in the pixels (the ideal reader answers directly), under acuity
    assert ideal.success and ideal.zooms == []
    assert sharp.success and len(sharp.zooms) == 1 and sharp.final.letter == sc.label
    texts, images = agent.summarize(sharp)
    assert "<tool_call>" in texts[0] and images[1].size[0] > 2 * 280 * 56 // 448


def test_always_zoom_zooms_where_the_adaptive_agent_answers_directly():
    sc = synth.make_scene(synth.scene_rng(0, "test", 6), category="direct_attributes", difficulty="easy",
                          periods=PERIODS)
    adaptive, always = _search(sc, 448, sweep.ACUITY), _search(sc, 448, sweep.ACUITY, always_zoom=True)
    assert adaptive.success and adaptive.zooms == []
    assert always.success and len(always.zooms) == 1 and always.final.letter == sc.label
    cfg = build.BuildConfig.from_args(["--always_zoom", "true", "--acuity", "5", "--periods", sweep.PERIODS])
    assert cfg.always_zoom is True and cfg.acuity == 5.0
    with pytest.raises(SystemExit):
        build.BuildConfig.from_args(["--always_zoom", "maybe"])


# ---------------------------------------------------------------------------------------------------------------
# CofConfig.direct: the forced direct answers of model (a)


class _Banned:
    """The obviously right version: the model with the <tool_call> logit at -inf after every extend."""

    def __init__(self, net, banned):
        self.net, self.banned = net, banned

    def __getattr__(self, name):
        return getattr(self.net, name)

    def extend(self, *a, **k):
        logits = self.net.extend(*a, **k)
        logits[..., self.banned] = float("-inf")
        return logits


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    d = make_tiny(str(tmp_path_factory.mktemp("direct")), max_pixels=112 * 112, min_pixels=56 * 56)
    return M.Qwen25VL.from_pretrained(d).eval(), T.Tokenizer.from_pretrained(d)


@pytest.mark.parametrize("compiled", [False, True])
def test_direct_never_samples_a_tool_call(tiny_model, compiled):
    net, tok = tiny_model
    images = [torch.randint(0, 256, (3, 112, 140), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
              for i in range(4)]
    runs = {}
    for direct in (False, True):
        cfg = cof.CofConfig(do_sample=True, max_new_tokens=12, max_turns=3, invalid="text", direct=direct,
                            compile=compiled)
        runs[direct] = cof.run(net, tok, images, ["q"] * 4, cfg, group_size=4, generator=torch.Generator().manual_seed(0),
                               logits_processor=boost(tok, ["<tool_call>"], 30.0))  # sampled almost always
    gen = lambda trs: [i for tr in trs for i, g in zip(tr.ids, tr.gen_mask) if g]  # noqa: E731
    assert gen(runs[False]).count(tok.tool_call_id) > 16                   # the boost works...
    assert tok.tool_call_id not in gen(runs[True])                         # ...and direct bans it
    assert all(tr.n_zooms == 0 and len(tr.turns) == 1 for tr in runs[True])


def test_direct_equals_banning_the_logit_in_the_model(tiny_model):
    net, tok = tiny_model
    images = [torch.randint(0, 256, (3, 140, 112), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
              for i in range(3)]
    cfg = cof.CofConfig(max_new_tokens=16, max_turns=2)
    ours = cof.run(net, tok, images, ["what?"] * 3, dataclasses.replace(cfg, direct=True),
                   logits_processor=boost(tok, ["<tool_call>"], 30.0))
    ref = cof.run(_Banned(net, tok.tool_call_id), tok, images, ["what?"] * 3, cfg,
                  logits_processor=boost(tok, ["<tool_call>"], 30.0))
    assert [tr.ids for tr in ours] == [tr.ids for tr in ref]


# ---------------------------------------------------------------------------------------------------------------
# Tables and plot


def _records():
    """Two models x two rungs, one question of each kind (easy, edge, medium, hard, relative), with known outcomes."""
    out = {}
    for name, zooms in (("always-zoom", [1, 1, 1, 2, 1]), ("cof-sft", [0, 0, 1, 2, 0])):
        recs = []
        for R in (112, 448):
            for k, kind in enumerate(sweep.KINDS):
                recs.append(dict(resolution=R, kind=kind, category="x", correct=(k < 4 if R == 448 else k == 0),
                                 n_zooms=zooms[k], n_generated=40 + 30 * zooms[k], seconds=0.5, error=None))
        out[name] = recs
    return out


def test_result_rows_markdown_and_plot(tmp_path):
    rows = sweep.result_rows(_records())
    by = {(r["model"], r["resolution"]): r for r in rows}
    assert len(rows) == 4 and by[("cof-sft", 448)]["accuracy"] == 80.0 and by[("cof-sft", 112)]["accuracy"] == 20.0
    r = by[("cof-sft", 448)]
    assert (r["acc_easy"], r["acc_edge"], r["acc_relative"], r["n"]) == (100.0, 100.0, 0.0, 5)
    assert r["mean_zooms"] == 0.6 and r["direct_share"] == 60.0 and r["gen_tokens"] == 58.0 and r["s_per_q"] == 0.5
    assert by[("always-zoom", 448)]["direct_share"] == 0.0 and by[("always-zoom", 448)]["gen_tokens"] == 76.0
    md = sweep.markdown(rows)
    assert "| 448 | cof-sft | 80.0 | 100 | 100 | 100 | 100 | 0 | 0.60 | 60% | 58 | 0.500 |" in md
    assert "| long side | always-zoom | cof-sft |\n|---|---|---|\n| 112 | 20.0 | 20.0 |" in md
    assert "| 448 | 1.20 | 0.60 |" in md                                 # mean zooms pivot
    png = sweep.plot(rows, str(tmp_path / "p.png"))
    im = Image.open(png)
    assert im.size == (3 * 560, 300) and len(np.unique(np.asarray(im).reshape(-1, 3), axis=0)) > 3      # lines drawn in the models' colours


def test_config_rejects_unknown_and_impossible_options():
    with pytest.raises(SystemExit):
        sweep.main(["--no_such_option", "1"])
    with pytest.raises(ValueError, match="sft_steps"):
        sweep.SweepConfig(sft_steps=0)
    with pytest.raises(ValueError, match="unknown SweepConfig keys"):
        sweep.SweepConfig.from_dict({"stpes": 3})
    assert json.loads(json.dumps(sweep.SweepConfig().__dict__))["out"] == os.path.join("runs", "sweep")


def test_job_reuses_a_finished_stage_and_reports_a_failed_one(tmp_path):
    cfg = sweep.SweepConfig(out=str(tmp_path))
    done = tmp_path / "ckpt-000010"
    done.mkdir()
    job = sweep.Job(cfg, "finished", ["sft.py", "--no_such_option"], str(done))
    assert job.proc is None and job.wait() == str(done)               # reused: nothing was started
    job = sweep.Job(cfg, "broken", ["sft.py", "--no_such_option", "1"], str(tmp_path / "never"))
    assert job.proc is not None
    with pytest.raises(RuntimeError, match=r"broken exited with code 2; its last line: .*no_such_option"):
        job.wait()
    assert os.path.exists(tmp_path / "logs" / "broken.log")
    with open(tmp_path / "logs" / "progress.log", "w") as f:          # a progress bar rewrites its line with \r
        f.write("model: x\nsft 1/9 [..] loss 0.9\rsft 2/9 [#.] loss 0.8\r")
    job.log_path = str(tmp_path / "logs" / "progress.log")
    assert job.last_line() == "sft 2/9 [#.] loss 0.8"


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux only (PR_SET_PDEATHSIG)")
def test_a_killed_sweep_takes_its_trainers_with_it():
    """A trainer outliving a killed sweep would train on while the next sweep starts the same job in the same
    directory: Job's children get SIGTERM when the sweep dies, even by SIGKILL."""
    import subprocess
    import sys
    import time

    code = ("import subprocess, sys, time; sys.path.insert(0, sys.argv[1]); import sweep; "
            "p = subprocess.Popen(['sleep', '60'], preexec_fn=sweep._die_with_parent); print(p.pid, flush=True); "
            "time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code, os.path.dirname(os.path.abspath(sweep.__file__))],
                              stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()

    def state():   # the child's state letter; "gone" once reaped (a zombie "Z" is dead, waiting for init)
        try:
            with open(f"/proc/{child}/status") as f:
                return next(ln.split()[1] for ln in f if ln.startswith("State:"))
        except FileNotFoundError:
            return "gone"

    deadline = time.time() + 10
    while state() not in ("Z", "gone") and time.time() < deadline:
        time.sleep(0.05)
    assert state() in ("Z", "gone")
