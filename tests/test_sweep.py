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
    assert PERIODS == {"easy": 16.0, "edge": 8.0, "medium": 14.0, "hard": 2.5}      # edge and hard keep their own
    swap = {synth.PERIOD[d]: PERIODS[d] for d in synth.PERIOD}
    for a, b in zip(plain, wide):
        assert (a.question, a.label, a.target_box, a.detail_box) == (b.question, b.label, b.target_box, b.detail_box)
        assert [(o.cell, o.colour, o.shape, o.box, o.tag) for o in a.objects] == \
            [(o.cell, o.colour, o.shape, o.box, o.tag) for o in b.objects]
        for oa, ob in zip(a.objects, b.objects):            # every texture, distractors' too, swaps its period
            for ta, tb in zip(oa.textures, ob.textures):
                assert (ta.box, ta.orientation, tb.period) == (tb.box, tb.orientation, swap[ta.period])
    for bad in ({"huge": 3.0}, {"medium": 1.0}, {"hard": float("nan")}):
        with pytest.raises(ValueError, match="stripe periods"):
            synth.check_periods(bad)
    with pytest.raises(ValueError, match="difficulty=px"):
        build.BuildConfig(periods="medium:6").parsed_periods()


def test_the_setting_crosses_over_where_the_docstring_says():
    """sweep.py's claims, measured by the reader with the acuity rule: both kinds' stripes need a zoom at 112 px and
    are read directly from 168; easy is direct from 140; at 56 px only easy survives (a zoom reads it); rungs under
    112 are shown at 112."""
    ladder = (56, 112, 140, 168, 196, 224)
    rows = build.legibility_table(resolutions=ladder, view_max_pixels=sweep.VIEW_MAX_PIXELS, n=2,
                                  acuity=sweep.ACUITY, periods=PERIODS, min_box=sweep.MIN_BOX)
    got = {(r["resolution"], r["difficulty"]): (r["main_legible"], r["cell_legible"]) for r in rows
           if r["category"] == "direct_attributes"}
    assert sweep.KINDS == ("easy", "medium")
    assert got[(56, "easy")] == (0, 1) and got[(56, "medium")] == (0, 0)
    assert got[(112, "easy")] == (0, 1) and got[(112, "medium")] == (0, 1)
    assert got[(140, "easy")] == (1, 1) and got[(140, "medium")] == (0, 1)
    assert all(got[(R, k)] == (1, 1) for R in (168, 196, 224) for k in sweep.KINDS)
    assert {r["resolution"]: r["main_px"] for r in rows} == {R: max(R, 112) for R in ladder}


def _search(sc, R, acuity, always_zoom=False):
    world = agent.scene_world(sc, synth.render(sc), R, sweep.VIEW_MAX_PIXELS, acuity, min_box=sweep.MIN_BOX)
    return agent.search(world, agent.OracleTools(), always_zoom=always_zoom)


def test_acuity_is_what_makes_the_agent_zoom():
    sc = synth.make_scene(synth.scene_rng(0, "test", 5), category="direct_attributes", difficulty="medium",
                          periods=PERIODS)
    ideal, sharp = _search(sc, 140, 0.0), _search(sc, 140, sweep.ACUITY)
    # at 140 px the stripes are 4.4 px in the view: in the pixels (the ideal reader answers directly), under acuity
    assert ideal.success and ideal.zooms == []
    assert sharp.success and len(sharp.zooms) == 1 and sharp.final.letter == sc.label
    texts, images = agent.summarize(sharp)
    assert "<tool_call>" in texts[0] and images[1].size[0] >= 2 * 1.5 * sweep.MIN_BOX - 4   # the zoom doubles


def test_always_zoom_zooms_where_the_adaptive_agent_answers_directly():
    sc = synth.make_scene(synth.scene_rng(0, "test", 6), category="direct_attributes", difficulty="easy",
                          periods=PERIODS)
    adaptive, always = _search(sc, 224, sweep.ACUITY), _search(sc, 224, sweep.ACUITY, always_zoom=True)
    assert adaptive.success and adaptive.zooms == []
    assert always.success and len(always.zooms) == 1 and always.final.letter == sc.label
    cfg = build.BuildConfig.from_args(["--always_zoom", "true", "--acuity", "5", "--periods", sweep.PERIODS])
    assert cfg.always_zoom is True and cfg.acuity == 5.0
    with pytest.raises(SystemExit):
        build.BuildConfig.from_args(["--always_zoom", "maybe"])


def test_eyesight_table_is_the_build_option():
    """EYESIGHT has one accuracy per rung and kind, and the build sees each of them at its own rung."""
    assert set(sweep.EYESIGHT) == set(sweep.KINDS) and all(len(v) == len(sweep.LADDER) for v in sweep.EYESIGHT.values())
    cfg = build.BuildConfig(eyesight=sweep.eyesight_option())
    for k, accs in sweep.EYESIGHT.items():
        assert [cfg.eyesight_at(k, R) for R in sweep.LADDER] == list(accs)


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
    """Two models x two rungs, two questions of each kind (easy, medium), with known outcomes."""
    out = {}
    for name, zooms in (("always-zoom", [1, 1]), ("cof-sft", [0, 1])):
        recs = []
        for R in (112, 224):
            for k, kind in enumerate(sweep.KINDS):
                for j in range(2):
                    recs.append(dict(resolution=R, kind=kind, category="x", correct=(k == 0 or j == 0) if R == 224
                                     else (k == 0 and j == 0), n_zooms=zooms[k], n_generated=40 + 30 * zooms[k],
                                     seconds=0.5, error=None))
        out[name] = recs
    return out


def test_result_rows_markdown_and_plot(tmp_path):
    rows = sweep.result_rows(_records())
    by = {(r["model"], r["resolution"]): r for r in rows}
    assert len(rows) == 4 and by[("cof-sft", 224)]["accuracy"] == 75.0 and by[("cof-sft", 112)]["accuracy"] == 25.0
    r = by[("cof-sft", 224)]
    assert (r["acc_easy"], r["acc_medium"], r["n"]) == (100.0, 50.0, 4)
    assert r["mean_zooms"] == 0.5 and r["direct_share"] == 50.0 and r["gen_tokens"] == 55.0 and r["s_per_q"] == 0.5
    assert by[("always-zoom", 224)]["direct_share"] == 0.0 and by[("always-zoom", 224)]["gen_tokens"] == 70.0
    md = sweep.markdown(rows)
    assert "| long side | model | accuracy | easy | medium | mean zooms |" in md
    assert "| 224 | cof-sft | 75.0 | 100 | 50 | 0.50 | 50% | 55 | 0.500 |" in md
    assert "| long side | always-zoom | cof-sft |\n|---|---|---|\n| 56 | - | - |\n| 84 | - | - |\n| 112 | 25.0 | 25.0 |" in md
    assert "| 224 | 1.00 | 0.50 |" in md                                 # mean zooms pivot
    eye = sweep.eyesight_markdown([dict(r, model="direct") for r in rows if r["model"] == "cof-sft"])
    assert eye.count("\n| ") == 1 + len(sweep.KINDS) and "-> 100 (" in eye and "-> 50 (" in eye
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


def test_min_box_grows_zoom_boxes_about_their_centre_inside_the_image():
    """World.min_box: the oracle's boxes grow to at least min_box a side (the object's box stays inside), shift to
    stay in the image, and the crop rule then shows them at twice the main image's scale or more."""
    sc = synth.make_scene(synth.scene_rng(0, "test", 5), category="direct_attributes", difficulty="medium",
                          periods=PERIODS)
    tools = agent.OracleTools()
    for R in (112, 168, 224):
        plain = agent.scene_world(sc, None, R, sweep.VIEW_MAX_PIXELS)
        grown = agent.scene_world(sc, None, R, sweep.VIEW_MAX_PIXELS, min_box=sweep.MIN_BOX)
        b0, b = tools.locate(plain), tools.locate(grown)
        assert b0[2] - b0[0] < sweep.MIN_BOX and agent.contains(b, b0)
        assert min(b[2] - b[0], b[3] - b[1]) >= sweep.MIN_BOX - 1 and 0 <= b[0] and b[2] <= grown.size[0]
        assert abs((b[0] + b[2]) - (b0[0] + b0[2])) <= 2 or b[0] == 0 or b[2] == grown.size[0]
        assert grown.zoom(agent.tool_call_text(b)).scale[0] >= 1.9
    w = agent.scene_world(sc, None, 112, sweep.VIEW_MAX_PIXELS, min_box=38)
    assert w.grown((0, 100, 10, 110)) == (0, 74, 38, 112)                # pushed in from the corner
    assert w.grown((10, 10, 60, 60)) == (10, 10, 60, 60)                 # big enough already
