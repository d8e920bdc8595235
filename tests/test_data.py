"""data/: toy-V* scenes, the visual search agent, the released dataset formats and the build command."""
import json
import os
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import cof
import crop_kernels
import evaluate as E
from data import agent, build, formats, synth
from data import tiny
import tokenizer as T
import crop_kernels as ck


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth"))
    card = build.build(build.BuildConfig(out=out, n=24, rl=24, val=6, test=8, per_kind=3, seed=3, table_items=0))
    return out, card


# ----------------------------------------------------------------------------------------------------------------
# Determinism


def _tree(root):
    files = {}
    for d, _, names in os.walk(root):
        for n in names:
            if n != "card.json":             # holds the build time
                p = os.path.join(d, n)
                files[os.path.relpath(p, root)] = open(p, "rb").read()
    return files


def test_same_seed_same_dataset(built, tmp_path, monkeypatch):
    out, _ = built
    monkeypatch.chdir(tmp_path)  # a relative --out works (paths are stored relative to OUT, not to the cwd)
    monkeypatch.setattr(build, "POOL_MIN_JOBS", 0)     # `built` ran in this process; this one in 2 worker processes
    build.build(build.BuildConfig(out="again", n=24, rl=24, val=6, test=8, per_kind=3, seed=3, table_items=0),
                workers=2)
    again = str(tmp_path / "again")
    assert formats.read_sft(os.path.join(again, "sft_train.json"))[1] == 0
    assert len(E.read_synthetic(os.path.join(again, "val.jsonl"))) == 6
    a, b = _tree(out), _tree(again)
    assert sorted(a) == sorted(b) and len(a) > 60
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]][:5]
    # items depend on (seed, split, index) only; another seed gives other items
    first = [s.to_dict() for s in synth.make_split(3, "train", 4)]
    assert first == [s.to_dict() for s in synth.make_split(3, "train", 9)[:4]]
    assert first != [s.to_dict() for s in synth.make_split(4, "train", 4)]


# ----------------------------------------------------------------------------------------------------------------
# Scenes and the legibility measurement


def test_question_text_and_answer_match_the_scene():
    for sc in synth.make_split(7, "train", 40):
        lines = sc.text.split("\n")
        assert lines[-1] == "Answer with the option's letter from the given choices directly."
        opts = E.parse_options(sc.text)
        assert list(opts) == list("ABCD") and sorted(opts.values()) == sorted(
            synth.ORIENTATIONS if sc.category == "direct_attributes" else synth.RELATIONS)
        assert opts[sc.label] == sc.answer
        colours = [o.colour for o in sc.objects]
        assert colours.count(sc.target_obj.colour) == 1 and sc.name in sc.question
        # the answer really is in the rendered pixels: read at full resolution
        img = synth.render(sc)
        readings = [synth.read_texture(img, t, lambda b: b)[0] for t in sc.details]
        assert synth.answer_from_reading(sc, readings) == sc.answer
    # options are shuffled: every letter is the answer sometimes
    labels = {sc.label for sc in synth.make_split(7, "train", 40)}
    assert labels == set("ABCD")


def test_fixed_option_order_changes_only_the_options():
    """shuffle_options=False: the same scene and answer with the options in ORIENTATIONS / RELATIONS order, so that a
    letter always means the same answer (the built-in world); each kind's detail has its kind's stripe period."""
    for i in range(40):
        a = synth.make_scene(synth.scene_rng(7, "train", i))
        b = synth.make_scene(synth.scene_rng(7, "train", i), shuffle_options=False)
        canon = list(synth.ORIENTATIONS if a.category == "direct_attributes" else synth.RELATIONS)
        assert b.options == canon and b.options[" ABCD".index(b.label) - 1] == b.answer == a.answer
        assert (a.objects, a.target_box, a.question.split("\n")[0]) == (b.objects, b.target_box, b.question.split("\n")[0])
        assert E.parse_options(b.text) == dict(zip("ABCD", canon))
    for kind, (cat, diff) in synth.KIND_TARGET.items():
        sc = synth.make_scene(synth.scene_rng(7, "test", 0), category=cat, difficulty=diff)
        assert {t.period for t in sc.details} == {synth.PERIOD["edge" if kind == "edge" else diff]}


def test_colours_option_and_background():
    scenes = synth.make_split(7, "train", 30)
    assert {o.colour for sc in scenes for o in sc.objects} == set(synth.DEFAULT_COLOURS)
    wide = synth.make_split(7, "train", 30, colours=tuple(synth.PALETTE))
    assert len({o.colour for sc in wide for o in sc.objects}) == len(synth.PALETTE)
    assert all([o.colour for o in sc.objects].count(sc.target_obj.colour) == 1 for sc in scenes + wide)
    with pytest.raises(ValueError, match="at least 2 distinct names"):
        synth.make_scene(synth.scene_rng(0, "train", 0), colours=("red",))
    with pytest.raises(ValueError, match="mauve"):
        synth.make_scene(synth.scene_rng(0, "train", 0), colours=("red", "mauve"))
    with pytest.raises(ValueError, match="--colours"):
        build.BuildConfig(colours="red,mauve").parsed_colours()
    assert build.BuildConfig(colours="all").parsed_colours() == tuple(synth.PALETTE)
    # empty space: the processor's mean colour plus a faint per-cell tint (red channel: column, blue: row)
    img = np.asarray(synth.render(scenes[0]), np.int16)
    taken = {o.cell for o in scenes[0].objects}
    empty = [(r, c) for r in range(4) for c in range(4) if (r, c) not in taken]
    assert empty
    for r, c in empty:
        want = np.rint(np.array(synth.BACKGROUND) + synth.background_tint(r, c))
        assert (img[112 * r:112 * (r + 1), 112 * c:112 * (c + 1)] == want).all()
    tints = np.array([synth.background_tint(r, c) for r in range(4) for c in range(4)])
    assert len({tuple(t) for t in tints}) == 16 and np.allclose(tints.mean(0), 0)
    mean = np.array(synth.BACKGROUND) / 255
    assert np.abs((mean - crop_kernels.OPENAI_CLIP_MEAN) / crop_kernels.OPENAI_CLIP_STD).max() < 0.01


def _stripes_pil(orientation, size=40, period=8):
    """An independent stripe image drawn with PIL (reference for read_pattern)."""
    img = Image.new("RGB", (size, size), (120, 120, 120))
    d = ImageDraw.Draw(img)
    for k in range(-2 * size, 2 * size, period):
        if orientation == "horizontal":
            d.rectangle([0, k, size, k + period // 2 - 1], fill=(200, 200, 200))
        elif orientation == "vertical":
            d.rectangle([k, 0, k + period // 2 - 1, size], fill=(200, 200, 200))
        else:
            for w in range(period // 2):
                if orientation == "rising":      # constant along x + y = k + w
                    d.line([(k + w, 0), (k + w - size, size)], fill=(200, 200, 200))
                else:                                      # constant along x - y
                    d.line([(k + w, 0), (k + w + size, size)], fill=(200, 200, 200))
    return img


@pytest.mark.parametrize("orientation", synth.ORIENTATIONS)
def test_read_pattern_against_pil_drawn_stripes(orientation):
    img = _stripes_pil(orientation)
    ori, rms = synth.read_pattern(img, (0, 0, 40, 40))
    assert ori == orientation and rms > 30
    # averaged away (box-filtered to 1/8): no contrast left
    small = img.resize((5, 5), Image.Resampling.BOX).resize((40, 40), Image.Resampling.NEAREST)
    assert synth.read_pattern(small, (0, 0, 40, 40))[1] < 3


def test_legibility_table_at_the_working_resolution():
    rows = {(r["category"], r["difficulty"]): r for r in build.legibility_table(resolutions=(448,), n=2)}
    easy, med, hard = (rows[("direct_attributes", d)] for d in ("easy", "medium", "hard"))
    # easy: readable in the 112 px main view; medium: gone there, readable after one zoom; hard: after the 2nd
    assert easy["main_period_px"] == 6.0 and easy["main_legible"] == 1.0
    assert med["main_period_px"] == 1.0 and med["main_contrast"] < 0.005 and med["main_legible"] == 0.0
    assert med["cell_legible"] == 1.0 and med["cell_contrast"] > 0.8 and med["cell_period_px"] > 5
    assert hard["main_legible"] == 0.0 and hard["detail_legible"] == 1.0 and hard["detail_period_px"] > 6
    rel = rows[("relative_position", "medium")]
    assert rel["main_legible"] == 0.0 and rel["cell_legible"] == 1.0
    # edge (the two patches on a big object): the reader reads them in the main view (2 px stripes), and better after
    # a zoom on the object (5.2 px, where the model reads the relative kind's patches)
    edge = rows[("relative_position", "easy")]
    assert edge["main_legible"] == 1.0 and edge["main_period_px"] == 2.0
    assert edge["cell_legible"] == 1.0 and edge["cell_contrast"] > edge["main_contrast"] and edge["cell_period_px"] > 5


# ----------------------------------------------------------------------------------------------------------------
# The agent


def _search(sc, R, cap):
    world = agent.scene_world(sc, synth.render(sc), R, cap)
    return world, agent.search(world, agent.OracleTools())


@pytest.mark.parametrize("R,cap", [(448, agent.TINY_VIEW_MAX_PIXELS), (224, agent.TINY_VIEW_MAX_PIXELS),
                                   (224, agent.QWEN_VIEW_MAX_PIXELS), (1024, agent.QWEN_VIEW_MAX_PIXELS)])
def test_agent_zooms_only_where_the_detail_is_below_legibility(R, cap):
    zooms = {}
    for sc in synth.make_split(11, "val", 14):
        world, res = _search(sc, R, cap)
        main = world.main_view()
        sx = world.src_scale[0]
        legible = [synth.read_texture(main.image, t, lambda b: main.from_main(synth.scale_box(b, sx)))[2]
                   for t in sc.details]
        if all(legible):
            assert res.success and res.zooms == [], (sc.uid, "legible in the main view but zoomed")
            continue
        if not res.success:            # only where the detail is gone from the image itself
            full = [synth.read_texture(world.main, t, lambda b: synth.scale_box(b, sx))[2] for t in sc.details]
            assert not all(full), (sc.uid, "readable in the image but the search failed")
            continue
        texts, images = agent.summarize(res)
        assert len(texts) == len(images) and 1 <= len(images) - 1 <= 2
        zooms[sc.uid] = len(images) - 1
        W, H = world.size
        for text, img in zip(texts[:-1], images[1:]):
            crop_box = cof.parse_zoom(text, W, H)            # cof.py's enlarge / clip / int rule
            assert agent.contains(crop_box, world.target_box), (sc.uid, crop_box, world.target_box)
            # the stored zoom image is what the CoF loop sends: crop_kernels crop + LANCZOS to cof.zoom_size
            ref = crop_kernels.resize(crop_kernels.crop(crop_kernels.from_pil(world.main), crop_box),
                                      cof.zoom_size(crop_box), "lanczos")
            assert torch.equal(crop_kernels.from_pil(img), ref)
        assert res.final.letter == sc.label and res.final.view.crop_box is not None
    if cap == agent.TINY_VIEW_MAX_PIXELS:
        assert zooms and set(zooms.values()) >= {1}


def test_zoom_counts_follow_difficulty_at_the_working_resolution():
    counts = {}
    for sc in synth.make_split(5, "train", 40):
        _, res = _search(sc, 448, agent.TINY_VIEW_MAX_PIXELS)
        assert res.success
        counts.setdefault(sc.difficulty, []).append(len(agent.summarize(res)[1]) - 1)
    assert set(counts["easy"]) == {0} and set(counts["medium"]) == {1}
    assert sum(z == 2 for z in counts["hard"]) >= 0.6 * len(counts["hard"]) and min(counts["hard"]) >= 1


def test_kind_weights_decide_where_items_are():
    """--kinds / --rl_kinds: each split draws item kinds with its weights (a weight of 0 never appears), and the
    by-kind set has exactly --per_kind items of every kind --kinds weighs (the same items as with every kind on)."""
    cfg = build.BuildConfig(kinds="easy=1,hard=3", rl_kinds="edge=1,relative=1,medium=2", per_kind=2)
    kinds = lambda items: [synth.question_kind(s.category, s.difficulty) for s in items]  # noqa: E731
    train = kinds(build._items(cfg, "train", 400))
    assert set(train) == {"easy", "hard"} and abs(train.count("hard") / 400 - 0.75) < 0.07
    rl = kinds(build._items(cfg, "rl", 400, "rl_kinds"))
    assert set(rl) == {"edge", "relative", "medium"} and abs(rl.count("medium") / 400 - 0.5) < 0.08
    assert kinds(build._items_by_kind(cfg, 2)) == ["easy", "easy", "hard", "hard"]
    every = build._items_by_kind(build.BuildConfig(per_kind=2), 2)
    assert [s.uid for s in build._items_by_kind(cfg, 2)] == [s.uid for s in every if s.uid.split("-")[1] in ("easy", "hard")]
    for bad in ("easy=abc", "wide=1", "easy=-1", "easy=nan"):
        with pytest.raises(ValueError, match="--kinds"):
            build._items(build.BuildConfig(kinds=bad), "train", 1)
    with pytest.raises(ValueError, match="--rl_kinds .* weight > 0"):
        build._items(build.BuildConfig(rl_kinds="easy=0"), "rl", 1, "rl_kinds")


def test_trajectories_follow_the_eyesight_rule(tmp_path):
    """The agent answers from the main view only where the model's measured eyesight for the kind reaches the bar (and
    its reader reads the detail there), or for the --oracle_share of a kind's items; everything else zooms."""
    cfg = build.BuildConfig(out=str(tmp_path), seed=2, eyesight="easy=0.9,edge=0.5", eyesight_bar=0.8,
                            oracle_share="edge=0.6")
    allowed = [build.main_view_allowed(cfg, "edge", "train", i) for i in range(3000)]
    assert abs(sum(allowed) / 3000 - 0.6) < 0.03
    assert all(build.main_view_allowed(cfg, k, "train", i) for k in ("easy", "medium") for i in range(50))  # 1.0 if unlisted
    assert build.main_view_allowed(cfg, "edge", "train", 7) == build.main_view_allowed(cfg, "edge", "train", 7)
    # per resolution ("kind@R=acc" wins at R; "kind=acc" holds elsewhere)
    rung = replace(cfg, eyesight="easy=0.9,easy@112=0.3,medium@224=0.95,medium@112=0.1", oracle_share="")
    assert [build.main_view_allowed(rung, "easy", "train", 0, R) for R in (112, 224, None)] == [False, True, True]
    assert [build.main_view_allowed(rung, "medium", "train", 0, R) for R in (112, 168, 224)] == [False, True, True]
    assert rung.eyesight_at("medium", 224) == 0.95 and rung.eyesight_at("medium", 168) is None
    for bad, msg in (("easy@x=0.5", "resolution"), ("easy@0=0.5", "resolution"), ("wide@112=0.5", "unknown kind"),
                     ("easy@112=1.5", "easy@112")):
        with pytest.raises(ValueError, match=msg):
            build.BuildConfig(eyesight=bad)
    scenes = [synth.make_scene(synth.scene_rng(2, "train", i), category=c, difficulty=d)
              for i in range(12) for c, d in (synth.KIND_TARGET["easy"], synth.KIND_TARGET["edge"])]
    _, recs = build.trajectories(cfg, scenes, "train")
    for i, r in enumerate(recs):
        assert r["success"] and r["reader_direct"]             # the reader reads both kinds in the main view
        direct = r["kind"] == "easy" or build.main_view_allowed(cfg, "edge", "train", i)
        assert (r["zooms"] == 0) == direct, r
    assert {r["zooms"] for r in recs if r["kind"] == "edge"} == {0, 1}
    summary = {r["kind"]: r for r in build.kind_summary(cfg, recs)}
    edge = [r for r in recs if r["kind"] == "edge"]
    assert summary["edge"]["direct"] == sum(r["zooms"] == 0 for r in edge) / len(edge) and summary["easy"]["direct"] == 1
    # raise the bar above easy's eyesight: easy zooms too; no eyesight table: the reader alone decides
    _, recs = build.trajectories(replace(cfg, eyesight_bar=0.95, oracle_share=""), scenes[:4], "train")
    assert all(r["zooms"] == 1 for r in recs)
    _, recs = build.trajectories(replace(cfg, eyesight="", oracle_share=""), scenes[:4], "train")
    assert all(r["zooms"] == 0 for r in recs)


def test_option_orders_rotate_the_letters_not_the_search(tmp_path):
    """--option_orders N: each search gives N rows with the options rotated 0..N-1 places: the same images and
    thoughts up to the last one, whose restated options, letter and <answer> follow the rotated question."""
    cfg = build.BuildConfig(out=str(tmp_path), seed=4, shuffle_options=True)
    scenes = synth.make_split(4, "train", 5)
    rows, recs = build.trajectories(cfg, scenes, "train", orders=3)
    assert len(rows) == 3 * len(scenes) and all(r["success"] for r in recs)
    for sc, group in zip(scenes, (rows[i:i + 3] for i in range(0, len(rows), 3))):
        labels = []
        for k, row in enumerate(group):
            shown = synth.rotate_options(sc, k)
            assert shown.answer == sc.answer and shown.options[:len(sc.options) - k] == sc.options[k:]
            assert shown.options["ABCD".index(shown.label)] == sc.answer
            assert row["images"] == group[0]["images"]
            assert row["messages"][1]["content"] == cof.rl_prompt(shown.question, shown.label)
            last = row["messages"][-1]["content"]
            assert last.endswith(f"({shown.label}), so the answer is {shown.label}.</think>\n<answer>{shown.label}</answer>")
            assert ", ".join(f"({L}) {o}" for L, o in zip("ABCD", shown.options)) in last
            assert [m["content"] for m in row["messages"][2:-1]] == [m["content"] for m in group[0]["messages"][2:-1]]
            labels.append(shown.label)
        assert len(set(labels)) == 3


def test_trajectory_text_format(built):
    out, _ = built
    rows, bad = formats.read_sft(os.path.join(out, "sft_train.json"))
    assert bad == 0 and len(rows) == 24 * build.BuildConfig.option_orders     # every search, its options rotated
    call = re.compile(r'^<think>[^<]+</think>\n<tool_call>\n\{"name": "image_zoom_in_tool", "arguments": '
                      r'\{"bbox_2d": \[\d+, \d+, \d+, \d+\]\}\}\n</tool_call>$')
    final = re.compile(r"^<think>[^<]+</think>\n<answer>[A-D]</answer>$")
    for r in rows:
        m = r["messages"]
        assert m[0] == {"role": "system", "content": cof.SYSTEM_PROMPT}
        assert m[1]["role"] == "user" and m[1]["content"].startswith("<image> Question: ")
        assert m[1]["content"].endswith(cof.LETTER_HINT + cof.USER_PROMPT)
        asst = [x["content"] for x in m if x["role"] == "assistant"]
        assert all(call.match(t) for t in asst[:-1]) and final.match(asst[-1])
        assert all(x["content"] == "<image>" + cof.USER_PROMPT for x in m[3::2])
        q = m[1]["content"][len("<image> Question: "):-len(cof.LETTER_HINT + cof.USER_PROMPT)]
        assert cof.extract_answer(asst[-1]) in E.parse_options(q)
        opts = list(E.parse_options(q).values())      # one option order per question; the letter follows the reading
        assert opts in (list(synth.ORIENTATIONS), list(synth.RELATIONS)) and "The options are" not in asst[-1]
        # the image files hold exactly what cof.py sends back: each zoom image is the crop rule applied to the main
        # image read back from disk (the files are lossless)
        main = crop_kernels.load_image(r["images"][0])
        H, W = main.shape[1:]
        assert len(r["images"]) == len(asst) and all(p.endswith(build.IMAGE_EXT) for p in r["images"])
        for t, path in zip(asst[:-1], r["images"][1:]):
            box = cof.parse_zoom(t, W, H)
            sent = crop_kernels.resize(crop_kernels.crop(main, box), cof.zoom_size(box), "lanczos")
            assert torch.equal(crop_kernels.load_image(path), sent)


# ----------------------------------------------------------------------------------------------------------------
# Formats


def test_sft_rows_round_trip_through_the_released_format(built, tmp_path):
    out, card = built
    path = os.path.join(out, "sft_train.json")
    raw = json.load(open(path))
    assert all(set(r) == {"messages", "images"} for r in raw)
    assert all(all(set(m) == {"role", "content"} for m in r["messages"]) for r in raw)
    assert all(not os.path.isabs(p) for r in raw for p in r["images"])
    rows, bad = formats.read_sft(path)
    copy = str(tmp_path / "copy.json")
    formats.write_sft(copy, rows, root=out)      # absolute paths in, relative to `out` written
    again, bad2 = formats.read_sft(copy, root=out)
    assert bad == bad2 == 0 and again == rows
    assert json.load(open(copy)) == raw
    # released variants: {"image": ...} entries, "./" prefixes, from/value tags
    variant = [{"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                                   "value": m["content"]} for m in r["messages"]],
                "images": [{"image": "./" + p} for p in r["images"]]} for r in raw[:3]]
    vpath = os.path.join(out, "variant.json")
    json.dump(variant, open(vpath, "w"))
    vrows, _ = formats.read_sft(vpath)
    assert [r["messages"] for r in vrows] == [r["messages"] for r in rows[:3]]
    assert [r["images"] for r in vrows] == [r["images"] for r in rows[:3]]
    # to_chat splits placeholders into image items and keeps the text byte for byte
    for r in rows:
        chat = formats.to_chat(r["messages"])
        n_img = sum(1 for m in chat if isinstance(m["content"], list) for c in m["content"] if c["type"] == "image")
        assert n_img == len(r["images"])
        rejoined = ["".join("<image>" if c["type"] == "image" else c["text"] for c in m["content"])
                    if isinstance(m["content"], list) else m["content"] for m in chat]
        assert rejoined == [m["content"] for m in r["messages"]]
    assert card["counts"]["sft_train_rows"] == len(rows)


def test_rl_and_vstar_records(built):
    out, _ = built
    rows, bad = formats.read_rl(os.path.join(out, "rl_train.jsonl"))
    assert bad == 0 and len(rows) == 24                                       # one RL row per scene: no rotations
    r = rows[0]["row"]
    assert set(r) == {"data_source", "agent_name", "prompt", "images", "ability", "reward_model", "extra_info"}
    q = r["extra_info"]["question"]
    assert r["prompt"][1]["content"] == cof.rl_prompt(q, r["reward_model"]["ground_truth"])
    assert r["images"][0]["image"].startswith("file://images/rl/") and r["extra_info"]["kind"] in synth.QUESTION_KINDS
    train_images = {p for row in json.load(open(os.path.join(out, "sft_train.json"))) for p in row["images"]}
    assert not any(os.path.join(out, row["row"]["images"][0]["image"][len("file://"):]) in train_images for row in rows)
    test = [json.loads(l) for l in open(os.path.join(out, "test_questions.jsonl"))]
    items = E.read_vstar(out)                  # the output folder is a V*-layout folder
    assert len(items) == len(test) == 8
    for t, it in zip(test, items):
        assert it["label"] == t["label"] and it["options"][t["label"]] and t["text"].endswith(cof.LETTER_HINT)
        x, y, w, h = t["bbox"][0]
        assert Image.open(it["image"]).size == (448, 448) and 0 <= x and x + w <= 448 and w > 0


def _bad_sft(tmp_path, rows, name="bad.json"):
    Image.new("RGB", (28, 28)).save(tmp_path / "img.png")
    path = tmp_path / name
    path.write_text(json.dumps(rows))
    return str(path)


def _row(content="<image> hi", images=("img.png",), role="user"):
    return {"messages": [{"role": role, "content": content}, {"role": "assistant", "content": "ok"}],
            "images": list(images)}


@pytest.mark.parametrize("row,field,words", [
    (_row(images=("missing.png",)), "images[0]", "not found"),
    (_row(content="no placeholder"), "images", "placeholder"),
    (_row(content="<image><image>"), "images", "2 <image> placeholder"),
    (_row(role="tool"), "messages[0].role", "unknown role"),
    (_row(images=("../outside.png",)), "images[0]", "leaves the dataset root"),
    (_row(images=("/etc/hostname",)), "images[0]", "leaves the dataset root"),
    ({"messages": [{"role": "assistant", "content": "x"}], "images": []}, "messages", "start with 'user'"),
    ({"messages": [{"role": "user", "content": 3}], "images": []}, "messages[0].content", "must be a string"),
    ({"images": []}, "messages", "missing"),
])
def test_bad_sft_records_name_file_row_and_field(tmp_path, row, field, words):
    good = _row()
    path = _bad_sft(tmp_path, [good, good, row, good])
    (tmp_path.parent / "outside.png").write_bytes(b"x")
    with pytest.raises(formats.DataError) as e:
        formats.read_sft(path)
    assert (e.value.path, e.value.row, e.value.field) == (path, 2, field)
    assert words in str(e.value) and "row 2" in str(e.value) and path in str(e.value)
    rows, bad = formats.read_sft(path, skip_bad=True)
    assert bad == 1 and len(rows) == 3


def test_bad_files_and_rl_records(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text("[{")
    with pytest.raises(formats.DataError, match="not valid JSON"):
        formats.read_sft(str(p))
    p.write_text('{"messages": []}')
    with pytest.raises(formats.DataError, match="JSON list"):
        formats.read_sft(str(p))
    Image.new("RGB", (28, 28)).save(tmp_path / "img.png")
    good = formats.rl_record(cof.SYSTEM_PROMPT, cof.rl_prompt("Q?\n(A) a\n(B) b", "A"), "img.png", "A", "Q?", 0)
    no_gt = json.loads(json.dumps(good))
    del no_gt["reward_model"]["ground_truth"]
    two = json.loads(json.dumps(good))
    two["images"].append({"image": "file://img.png"})
    path = tmp_path / "rl.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (good, no_gt, two)))
    with pytest.raises(formats.DataError) as e:
        formats.read_rl(str(path))
    assert (e.value.row, e.value.field) == (1, "reward_model.ground_truth")
    rows, bad = formats.read_rl(str(path), skip_bad=True)
    assert bad == 2 and rows[0]["ground_truth"] == "A" and rows[0]["images"] == [str(tmp_path / "img.png")]


# ----------------------------------------------------------------------------------------------------------------
# The model backend: prompts, reply parsing and box mapping with a scripted model; one real tiny-model call


class Scripted(agent.ModelTools):
    def __init__(self, replies):
        super().__init__(None, None)
        self.replies, self.asked = list(replies), []

    def ask(self, images, text, min_pixels, max_pixels):
        self.asked.append((tuple(im.size for im in images), text, max_pixels))
        return self.replies.pop(0)


def test_model_backend_with_scripted_replies():
    sc = synth.make_scene(synth.scene_rng(0, "test", 0), category="direct_attributes", difficulty="medium")
    world = agent.scene_world(sc)
    r, c = sc.target_obj.cell
    # the model sees the 112 x 112 view; its box is in those pixels: cell (r, c) = 28 px cells
    tools = Scripted(["I cannot tell. unclear",
                      f'```json\n[{{"bbox_2d": [{28 * c}, {28 * r}, {28 * c + 28}, {28 * r + 28}], "label": "x"}}]\n```',
                      f"({sc.label})", "Yes, it is correct."])
    res = agent.search(world, tools)
    assert res.success and len(res.zooms) == 1
    assert res.zooms[0][0] == [112 * c, 112 * r, 112 * c + 112, 112 * r + 112]      # mapped to main-image px
    # the loop's image (448) goes in, with the processor cap that makes the model see 112 x 112
    assert tools.asked[0][0] == ((448, 448),) and "unclear" in tools.asked[0][1]
    assert tools.asked[0][2] == agent.TINY_VIEW_MAX_PIXELS
    assert tools.asked[1][1].startswith(f"Locate the {sc.name}")
    assert agent.parse_box_reply("[1, 2, 3]") is None and agent.parse_box_reply("box [5, 6, 9, 8.5]") == (5, 6, 9, 8.5)
    # a "yes" to a wrong answer never verifies when the label is known
    wrong = "ABCD".replace(sc.label, "")[0]
    tools = Scripted([f"{wrong}", "yes"])
    assert not tools.verify(world, tools.look(world, world.main_view()))


def test_model_backend_runs_a_real_tiny_model(tmp_path):
    import model as M
    d = tiny.make_tiny(str(tmp_path / "tiny"), seed=0)
    net, tok = M.Qwen25VL.from_pretrained(d), T.Tokenizer.from_pretrained(d)
    tools = agent.ModelTools(net, tok, max_new_tokens=8)
    sc = synth.make_scene(synth.scene_rng(0, "test", 1))
    world = agent.scene_world(sc)
    reply = tools.ask([world.main_view().sent], "Locate the red circle.", max_pixels=world.view_max_pixels)
    assert isinstance(reply, str) and len(tok.encode(reply)) <= 8 + 2          # greedy, at most max_new_tokens
    assert tools.ask([world.main_view().sent], "Locate the red circle.", max_pixels=world.view_max_pixels) == reply
    # the view the oracle reads is exactly the model processor's input
    for view in (world.main_view(), world.zoom(agent.tool_call_text(agent.OracleTools().locate(world)))):
        pv, grid = ck.preprocess_image(crop_kernels.from_pil(view.sent), world.view_min_pixels, world.view_max_pixels)
        ref, ref_grid = crop_kernels.patchify(crop_kernels.from_pil(view.image))
        assert torch.equal(pv, ref) and torch.equal(grid, ref_grid) and view.image.size == (112, 112)
    res = agent.search(world, tools, max_zooms=1)    # a random model: the search runs and ends either way
    assert res.steps and res.steps[0].action == "look"


def test_kinds_figure_shows_the_models_views(tmp_path):
    """agent.kinds_figure: a row per question kind; the panel after the scene is the model's 112 px main view, pixel
    for pixel (x2, nearest), and the next one the view of the zoom on the object."""
    path = agent.kinds_figure(str(tmp_path / "kinds.png"), seed=0)
    fig = Image.open(path).convert("RGB")
    pad, cell = 12, 224
    assert fig.size == (pad + (cell + pad) * 4, pad + len(synth.QUESTION_KINDS) * (cell + 3 * pad + 16))
    for k, kind in enumerate(synth.QUESTION_KINDS):
        cat, diff = synth.KIND_TARGET[kind]
        world = agent.scene_world(synth.make_scene(synth.scene_rng(0, "test", 900_000 + k), category=cat,
                                                   difficulty=diff))
        y = pad + k * (cell + 3 * pad + 16) + 16 + pad // 2
        views = [world.main_view(), world.zoom(agent.tool_call_text(agent.OracleTools().locate(world)))]
        for j, v in enumerate(views, 1):
            want = v.image.resize((2 * v.image.width, 2 * v.image.height), Image.Resampling.NEAREST)
            x = pad + j * (cell + pad)
            got = fig.crop((x, y, x + want.width, y + want.height))
            assert np.array_equal(np.asarray(got), np.asarray(want)), (kind, j)
