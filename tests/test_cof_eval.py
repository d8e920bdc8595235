"""evaluate.py (and report.py's trace picture): V* / HR-Bench / synthetic readers on fixtures written here in the
exact formats, evaluation with resume and the resolution sweep (scripted stand-in model), the summary (HR-Bench cycle
averaging), the trace PNG and the command line on a tiny random model."""
import base64
import csv
import io
import json
import os

import pytest
import torch
from PIL import Image

import cof
import evaluate as E
import report

from cof_fixtures import ScriptedModel, call, img
from data import tiny
import tokenizer as T


def save_jpg(path, h, w, seed):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(img(h, w, seed).permute(1, 2, 0).numpy()).save(path, quality=95)


VSTAR = [  # (image, text, category, label)
    ("direct_attributes/sa_4690.jpg", "What is the material of the glove?\n(A) rubber\n(B) cotton\n(C) kevlar\n"
     "(D) leather\nAnswer with the option's letter from the given choices directly.", "direct_attributes", "A"),
    ("direct_attributes/sa_86101.jpg", "What is the color of the dustpan?\n(A) red\n(B) blue\n(C) green\n(D) black\n"
     "Answer with the option's letter from the given choices directly.", "direct_attributes", "C"),
    ("relative_position/sa_1.jpg", "Is the cup on the left or right side of the dog?\n(A) left\n(B) right\n"
     "Answer with the option's letter from the given choices directly.", "relative_position", "B"),
]


@pytest.fixture()
def vstar_dir(tmp_path):
    with open(tmp_path / "test_questions.jsonl", "w") as f:
        for i, (im, text, cat, label) in enumerate(VSTAR):
            save_jpg(str(tmp_path / im), 150 + 20 * i, 200, i)
            f.write(json.dumps({"image": im, "text": text, "category": cat, "question_id": i, "label": label}) + "\n")
    return str(tmp_path)


def b64jpg(h, w, seed):
    buf = io.BytesIO()
    Image.fromarray(img(h, w, seed).permute(1, 2, 0).numpy()).save(buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture()
def hr_tsv(tmp_path):
    """2 questions x 4 option rotations (cycle_category 0-3), VLMEvalKit-style: rows 1-3 of each question refer to
    the image of its first row by index."""
    path = tmp_path / "hr_bench_4k.tsv"
    cols = ["index", "question", "answer", "category", "A", "B", "C", "D", "cycle_category", "image"]
    qs = [("What color is the car?", ["red", "blue", "green", "white"], 0, "single"),
          ("What is written on the sign?", ["STOP", "GO", "EXIT", "OPEN"], 2, "cross")]
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(cols)
        idx = 0
        for qi, (q, opts, correct, cat) in enumerate(qs):
            first = idx
            for cyc in range(4):
                rot = opts[cyc:] + opts[:cyc]
                ans = "ABCD"[rot.index(opts[correct])]
                image = b64jpg(120, 160, qi) if cyc == 0 else str(first)
                w.writerow([idx, q, ans, cat, *rot, cyc, image])
                idx += 1
    return str(path)


def test_read_vstar(vstar_dir):
    items = E.read_vstar(vstar_dir)
    assert [it["label"] for it in items] == ["A", "C", "B"]
    assert items[0]["options"] == {"A": "rubber", "B": "cotton", "C": "kevlar", "D": "leather"}
    assert items[2]["category"] == "relative_position"
    assert items[2]["image"] == os.path.join(vstar_dir, "relative_position", "sa_1.jpg")
    assert items[0]["question"] == VSTAR[0][1]
    assert len(E.read_vstar(vstar_dir, categories=["relative_position"])) == 1
    with open(os.path.join(vstar_dir, "test_questions.jsonl"), "a") as f:
        f.write(json.dumps({"image": "direct_attributes/sa_4690.jpg", "label": "A"}) + "\n")
    with pytest.raises(E.BenchError, match=r"test_questions.jsonl line 4: missing field\(s\) \['text'\]"):
        E.read_vstar(vstar_dir)


def test_read_hrbench(hr_tsv):
    items = E.read_hrbench(hr_tsv)
    assert len(items) == 8 and [it["cycle"] for it in items] == [0, 1, 2, 3] * 2
    assert [it["label"] for it in items[:4]] == ["A", "D", "C", "B"]          # the correct option rotates
    assert items[1]["options"] == {"A": "blue", "B": "green", "C": "white", "D": "red"}
    assert items[1]["question"] == ("What color is the car?\n(A) blue\n(B) green\n(C) white\n(D) red"
                                    + cof.LETTER_HINT)
    a, b = E.load_item_image(items[0]), E.load_item_image(items[3])      # row 3 refers to row 0's image
    assert a.shape == (3, 120, 160) and torch.equal(a, b)
    v = E.read_hrbench(hr_tsv, style="vlmeval")[0]["question"]
    assert v.startswith("What color is the car?\nOptions:\nA. red\nB. blue\n")


def test_read_synthetic_rl_records(tmp_path):
    save_jpg(str(tmp_path / "img" / "s0.jpg"), 112, 112, 0)
    recs = [{"question": "What is the stripe direction?\n(A) vertical\n(B) horizontal", "groundtruth": "B",
             "image_name": "img/s0.jpg", "category": "attribute"},
            {"question": "What colour is the target?", "groundtruth": "red", "image_name": "img/s0.jpg"}]
    path = tmp_path / "test.json"
    path.write_text(json.dumps(recs))
    items = E.read_synthetic(str(path))
    assert items[0]["question"].endswith(cof.LETTER_HINT) and items[1]["question"].endswith(cof.PHRASE_HINT)
    assert E.is_correct(items[0], "B") and E.is_correct(items[1], "Red.") and not E.is_correct(items[1], "blue")
    # data.build's test split: OUT/test.jsonl in V*'s layout (plus annotations), images relative to OUT
    rec = {"image": "img/s0.jpg", "text": "Which way do the stripes run?\n(A) vertical\n(B) horizontal\n"
           "Answer with the option's letter from the given choices directly.", "category": "direct_attributes",
           "question_id": 7, "label": "A", "bbox": [[1, 2, 3, 4]], "difficulty": "hard", "uid": "test-000007"}
    (tmp_path / "test.jsonl").write_text(json.dumps(rec) + "\n")
    for src in (str(tmp_path), str(tmp_path / "test.jsonl")):
        (it,) = E.read_synthetic(src)
        assert it["id"] == "7" and it["label"] == "A" and it["question"] == rec["text"]
        assert it["image"] == str(tmp_path / "img" / "s0.jpg")


class ByQuestion(ScriptedModel):
    """Picks the script by a keyword of the question found in the conversation (batches change between calls)."""

    def __init__(self, tok, table):
        super().__init__(tok, [])
        self.table = {k: [tok.encode(t) + [tok.im_end_id] for t in v] for k, v in table.items()}

    def _script(self, row, src):
        text = self.tok.decode(row)
        return next(v for k, v in self.table.items() if k in text)


TABLE = {"glove": [call("[10, 10, 60, 60]"), "<answer>A</answer>"],             # right, 1 zoom
         "dustpan": ["<answer>(B) blue</answer>"],                               # wrong
         "cup on the left": [call("[0, 0, 50, 50]"), call("[5, 5, 30, 30]"), "<answer>right</answer>"]}  # right


def test_evaluate_resume_and_sweep(tiny_tok, vstar_dir, tmp_path):
    tok = tiny_tok
    sm = ByQuestion(tok, TABLE)
    items = E.read_vstar(vstar_dir)
    out = str(tmp_path / "res.jsonl")
    rows = E.evaluate(sm, tok, items, out, resolutions=[None, 224], batch_size=2, bench="vstar", progress=False)
    assert [r["resolution"] for r in rows] == ["orig", 224]
    recs = [json.loads(l) for l in open(out)]
    assert len(recs) == 6 and {r["key"] for r in recs} == {f"{s}:{i}" for s in ("orig", 224) for i in "012"}
    # every turn of the script is generated in full, plus its <|im_end|>
    n_gen = {k: sum(len(tok.encode(t)) + 1 for t in texts) for k, texts in TABLE.items()}
    assert [r["n_generated"] for r in recs[:3]] == [n_gen["glove"], n_gen["dustpan"], n_gen["cup on the left"]]
    assert [r["n_zooms"] for r in recs[:3]] == [1, 0, 2]
    for r in rows:
        assert r["n"] == 3 and r["acc_direct_attributes"] == 50.0 and r["acc_relative_position"] == 100.0
        assert abs(r["acc_overall"] - 200 / 3) < 1e-9                           # micro over questions
        assert r["zooms"] == 1.0 and r["errors"] == 0
        assert r["gen_tokens"] == pytest.approx(sum(n_gen.values()) / 3)
        mine = [q for q in recs if q["key"].startswith(f"{r['resolution']}:")]
        assert r["s_per_q"] == pytest.approx(sum(q["seconds"] for q in mine) / 3)
    swept = next(r for r in recs if r["key"] == "224:0")
    assert max(swept["original_size"]) == 224 and swept["main_size"] == list(cof.main_size(*swept["original_size"]))
    assert swept["turns"][0]["tool_call"] and swept["turns"][1]["text"] == "<answer>A</answer>"
    # resume: nothing left to do
    calls = sm.calls
    E.evaluate(sm, tok, items, out, resolutions=[None, 224], batch_size=2, bench="vstar", progress=False)
    assert sm.calls == calls and len(open(out).readlines()) == 6
    # an interrupted run (truncated last line) re-runs just that question: the other lines stay as they were (their
    # timings included), the re-run record equals the lost one but for its timing
    lines = open(out).readlines()
    with open(out, "w") as f:
        f.writelines(lines[:-1] + [lines[-1][:20]])
    rows2 = E.evaluate(sm, tok, items, out, resolutions=[None, 224], batch_size=2, bench="vstar", progress=False)
    assert sm.calls > calls
    now = open(out).readlines()
    assert now[:5] == lines[:5] and now[5] == lines[-1][:20] + "\n" and len(now) == 7
    untimed = lambda r: {k: v for k, v in r.items() if k != "seconds"}       # noqa: E731
    assert untimed(json.loads(now[6])) == untimed(json.loads(lines[-1]))
    assert list(E.load_results(out)) == [json.loads(l)["key"] for l in lines]
    keep = ("n", "acc_direct_attributes", "acc_relative_position", "acc_overall", "errors", "zooms", "gen_tokens")
    assert [[r[k] for k in keep] for r in rows2] == [[r[k] for k in keep] for r in rows]
    assert E.format_table(rows) == "\n".join([
        "| resolution | n | acc_direct_attributes | acc_relative_position | acc_overall | errors | zooms | gen_tokens "
        "| s_per_q |", "|---|---|---|---|---|---|---|---|---|"]
        + [f"| {r['resolution']} | 3 | 50.00 | 100.00 | 66.67 | 0 | 1.00 | {r['gen_tokens']:.2f} | {r['s_per_q']:.2f} |"
           for r in rows])


def test_a_broken_image_is_recorded_not_fatal(tiny_tok, vstar_dir, tmp_path):
    with open(os.path.join(vstar_dir, "direct_attributes/sa_86101.jpg"), "wb") as f:
        f.write(b"not a jpeg")
    out = str(tmp_path / "res.jsonl")
    rows = E.evaluate(ByQuestion(tiny_tok, TABLE), tiny_tok, E.read_vstar(vstar_dir), out, batch_size=3,
                      progress=False)
    recs = E.load_results(out)
    assert rows[0]["n"] == 3 and rows[0]["errors"] == 1 and "error" in recs["orig:1"]
    assert recs["orig:0"]["correct"] and recs["orig:2"]["correct"] and not recs["orig:1"]["correct"]
    bad = os.path.join(vstar_dir, "direct_attributes", "sa_86101.jpg")
    assert recs["orig:1"]["error"].startswith(f"ImageError: '{bad}': cannot read it as an image")
    assert (recs["orig:1"]["answer"], recs["orig:1"]["n_generated"], recs["orig:1"]["turns"]) == ("", 0, [])


def test_hrbench_cycle_average():
    # cycle 0: 2/2 right, cycle 1: 0/1 right -> HR-Bench average 50%, a micro average would say 66.7%
    recs = [dict(resolution=None, category="single", cycle=0, correct=True, n_zooms=1, n_generated=5, seconds=1.0),
            dict(resolution=None, category="single", cycle=0, correct=True, n_zooms=0, n_generated=5, seconds=1.0),
            dict(resolution=None, category="single", cycle=1, correct=False, n_zooms=2, n_generated=5, seconds=1.0)]
    row = E.summarize(recs)[0]
    assert row["acc_overall"] == 50.0 and row["acc_single"] == 50.0 and row["zooms"] == 1.0


def test_hrbench_eval_with_rotations(tiny_tok, hr_tsv, tmp_path):
    tok = tiny_tok
    # always answers "A": right on exactly one rotation of each question -> 25% in every cycle-averaged cell
    sm = ByQuestion(tok, {"car": ["<answer>A</answer>"], "sign": ["<answer>A</answer>"]})
    rows = E.evaluate(sm, tok, E.read_hrbench(hr_tsv), str(tmp_path / "hr.jsonl"), batch_size=3, progress=False)
    assert rows[0]["acc_overall"] == 25.0 and rows[0]["acc_single"] == 25.0 and rows[0]["acc_cross"] == 25.0


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny.make_tiny(str(tmp_path_factory.mktemp("tiny_cli")))


@pytest.fixture(scope="module")
def tiny_tok(tiny_dir):
    return T.Tokenizer.from_pretrained(tiny_dir)


def test_trace_png(tiny_tok, tmp_path):
    tok = tiny_tok
    texts = ["<think>The sign is far away.</think> " + call("[120, 40, 180, 90]"),
             "<think>Closer still.</think> " + call("[130, 50, 150, 70]"), "<answer>A</answer>"]
    grey, white = (128,) * 3, (255,) * 3

    def boxes_drawn(im, turns):
        """Each zoom's box outlined in its colour on the left panel, at its main-image pixels (x640/224 + (10, 30))."""
        for k, t in enumerate(turns[:2]):
            x0, y0, x1, y1 = (round((10, 30)[i % 2] + v * 640 / 224) for i, v in enumerate(t["box"]))
            assert im.getpixel((x0 + 1, (y0 + y1) // 2)) == im.getpixel(((x0 + x1) // 2, y1 - 1)) == report._COLORS[k]

    main = torch.full((3, 168, 224), 128, dtype=torch.uint8)
    tr = cof.run(ScriptedModel(tok, [texts]), tok, [main], ["Q?"], cof.CofConfig(keep_images=True))[0]
    path = report.draw_trace(tr, str(tmp_path / "t.png"))
    im = Image.open(path).convert("RGB")
    # layout: the 224x168 image scaled to a 640x480 panel at (10, 30); the crops as 220 px thumbnails in a column at
    # x = 670, each framed in its zoom's colour under a 20 px caption, 30 px apart; then one text line per line of
    # every turn (plus its header) and the answer line, 18 px each, from y = 480 + 40, and a 20 px margin
    assert [t["status"] for t in tr.turns[:2]] == ["ok", "ok"] and len(tr.images) == 3
    assert im.getpixel((10, 30)) == im.getpixel((649, 509)) == grey
    boxes_drawn(im, tr.turns)
    assert im.getpixel((9, 300)) == im.getpixel((650, 300)) == im.getpixel((300, 510)) == white
    y = 30
    for k, crop in enumerate(tr.images[1:]):
        h, w = crop.shape[1:]
        th, tw = round(220 * h / max(h, w)), round(220 * w / max(h, w))
        mid = y + 20 + th // 2
        assert im.getpixel((668, mid)) == im.getpixel((670 + tw + 1, mid)) == report._COLORS[k]    # the frame
        assert im.getpixel((675, mid)) == grey                                                   # the crop inside
        y += th + 30
    n_lines = sum(1 + len(t["text"].splitlines()) for t in tr.turns) + 1
    assert y - 30 < 480 and im.height == 480 + 40 + 18 * n_lines + 20 and im.width > 670 + 220 + 1
    # the kept main image may be the model's smaller view (a 112 px cap here): boxes are still drawn where they
    # are in main-image pixels, on the left panel (x in [10, 650)), not only around the crop thumbnails
    small = cof.CofConfig(keep_images=True, processor_min_pixels=56 * 56, processor_max_pixels=112 * 112)
    tr = cof.run(ScriptedModel(tok, [texts]), tok, [main], ["Q?"], small)[0]
    assert tr.images[0].shape == (3, 84, 112) and tr.main_size == (168, 224)
    boxes_drawn(Image.open(report.draw_trace(tr, str(tmp_path / "v.png"))).convert("RGB"), tr.turns)
    with pytest.raises(ValueError, match="keep_images"):
        report.draw_trace(cof.run(ScriptedModel(tok, [texts]), tok, [main], ["Q?"])[0], str(tmp_path / "u.png"))


def test_cli_single_and_eval(tiny_dir, vstar_dir, tmp_path, capsys):
    png = tmp_path / "in.png"
    Image.fromarray(img(140, 180, 3).permute(1, 2, 0).numpy()).save(png)
    tr = E.main(["ask", "--model", tiny_dir, "--image", str(png), "--question", "What is it?", "--device", "cpu",
                 "--cfg", "max_new_tokens=6", "--trace", str(tmp_path / "trace.png")])
    out = capsys.readouterr().out
    assert tr.n_generated == 6 and len(tr.turns) == 1 and tr.answer == ""   # one turn cut at 6 tokens: no answer
    assert f"--- turn 1 (6 tokens, stop: length)\n{tr.turns[0]['text']}\n" in out
    h, w = tr.main_size
    assert f"=== answer: ''  (zooms {tr.n_zooms}, generated tokens 6, image {w}x{h}, " in out
    assert f"trace: {tmp_path / 'trace.png'}\n" in out
    assert Image.open(tmp_path / "trace.png").width == 640 + (220 + 20) + 30   # panel, (empty) crop column, margins
    res = tmp_path / "ev.jsonl"
    rows = E.main(["--model", tiny_dir, "--bench", "vstar", "--data", vstar_dir, "--out", str(res),
                   "--device", "cpu", "--resolutions", "orig,112", "--cfg", "max_new_tokens=4", "--batch_size", "3"])
    assert [r["n"] for r in rows] == [3, 3] and len(open(res).readlines()) == 6
    assert [r["resolution"] for r in rows] == ["orig", 112]
    assert E.summarize(list(E.load_results(str(res)).values())) == rows
    assert (tmp_path / "ev_summary.md").read_text() == E.format_table(rows) + "\n"
    with pytest.raises(SystemExit) as e:
        E.main(["ask", "--model", tiny_dir, "--image", str(png), "--question", "q", "--cfg", "max_turn=3"])
    assert e.value.code == 2 and "unknown --cfg key 'max_turn'" in capsys.readouterr().err
