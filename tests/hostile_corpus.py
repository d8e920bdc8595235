"""A hostile-input corpus: every public function and command line of the project given what a careless or hostile
user gives it (bad types, bad numbers, NaN / inf, empty and huge inputs, truncated and corrupt files). Each case says
what must happen: an error of a given type whose message holds given words (the argument, option or file it names,
and what is allowed), an argparse error (exit status 2) naming the option, a one-line command-line error (exit
status 1), or a documented fallback (a value the case checks). Anything else fails the case: another error type (a
raw KeyError / IndexError / ZeroDivisionError / UnicodeDecodeError from deep inside), a message without the words, a
silent success, a case running past its time limit.

    python tests/hostile_corpus.py          # every case, one line each, then a summary; exit status 1 if any fails

tests/test_hostile.py runs every case as a test (pytest -k corpus). Cases run in-process: the command lines through
their main(argv), SystemExit caught."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import bench  # noqa: E402
import checks  # noqa: E402
import cof  # noqa: E402
import crop_kernels as ck  # noqa: E402
import decode  # noqa: E402
import evaluate as E  # noqa: E402
import grpo  # noqa: E402
import hub  # noqa: E402
import model as M  # noqa: E402
import report  # noqa: E402
import sft  # noqa: E402
import sweep  # noqa: E402
import tokenizer as T  # noqa: E402
import trainer  # noqa: E402
from data import build, formats, tiny  # noqa: E402

NAN, INF = float("nan"), float("inf")
CASES = {}   # id -> (fn(env), expectation)


# ---- expectations ----------------------------------------------------------------------------------------------

class Raises:
    """The call raises `kind` (or a subclass) and its message holds every word."""

    def __init__(self, kind, *words):
        self.kind, self.words = kind, words

    def judge(self, outcome, err):
        what, value = outcome
        if what != "raise":
            return f"expected {self.kind.__name__}, got {what} {value!r:.200}"
        if not isinstance(value, self.kind):
            return f"expected {self.kind.__name__}, got {type(value).__name__}: {value}"
        missing = [w for w in self.words if w not in str(value)]
        return f"message lacks {missing}: {value}" if missing else None


class Exits:
    """The command line exits with `code`; its message (SystemExit's text, or stderr for argparse) holds the words
    and is one line (argparse prints its usage above it)."""

    def __init__(self, code, *words):
        self.code, self.words = code, words

    def judge(self, outcome, err):
        what, value = outcome
        if what != "exit":
            return f"expected exit {self.code}, got {what} {type(value).__name__ if what == 'raise' else ''} {value!r:.300}"
        code, text = (value.code, err) if isinstance(value.code, int) else (1, str(value.code))
        if code != self.code:
            return f"expected exit {self.code}, got {code}: {text[-300:]}"
        line = text.strip().splitlines()[-1] if text.strip() else ""
        missing = [w for w in self.words if w not in line]
        return f"error line lacks {missing}: {line!r}" if missing else None


class Returns:
    """A documented fallback: the call returns, and check(result) holds."""

    def __init__(self, check, why):
        self.check, self.why = check, why

    def judge(self, outcome, err):
        what, value = outcome
        if what != "return":
            return f"expected the fallback ({self.why}), got {what} {type(value).__name__}: {value!r:.300}"
        return None if self.check(value) else f"fallback not met ({self.why}): got {value!r:.300}"


def add(name, fn, expect):
    assert name not in CASES, name
    CASES[name] = (fn, expect)


def argv_error(main, prefix, table):
    """Command-line cases: table maps an id to (argv, the words argparse's error line must hold): exit status 2."""
    for name, (argv, *words) in table.items():
        add(f"{prefix}/{name}", lambda env, argv=argv: main([env.fill(a) for a in argv]), Exits(2, *words))


def value_errors(prefix, table, kind=ValueError):
    """Library cases: table maps an id to (fn(env), words): `kind` (TypeError or ValueError) holding the words."""
    for name, (fn, *words) in table.items():
        add(f"{prefix}/{name}", fn, Raises(kind, *words))


# ---- the shared setting: a tiny model, images, files ------------------------------------------------------------

class Env:
    """Made once, lazily: a temp folder, a tiny model and tokenizer, an image file, a V* folder, SFT rows, a trainer
    checkpoint. `fill` replaces {tmp}, {model}, {png}, {vstar}, {rows} and {ckpt} in command-line words."""

    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="hostile_corpus_")
        self._made = {}

    def close(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def path(self, *parts):
        return os.path.join(self.tmp, *parts)

    def fill(self, word):
        for key in ("model", "png", "vstar", "rows", "ckpt"):
            if "{" + key + "}" in word:
                word = word.replace("{" + key + "}", str(getattr(self, key)))
        return word.replace("{tmp}", self.tmp)

    def _once(self, key, make):
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]

    @property
    def model(self):
        return self._once("model", lambda: tiny.make_tiny(self.path("m"), bpe_vocab_size=300, max_pixels=112 * 112,
                                                          min_pixels=56 * 56))

    @property
    def net(self):
        return self._once("net", lambda: M.Qwen25VL.from_pretrained(self.model).eval())

    @property
    def tok(self):
        return self._once("tok", lambda: T.Tokenizer.from_pretrained(self.model))

    @property
    def png(self):
        def make():
            ck.to_pil(torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8)).save(self.path("img.png"))
            return self.path("img.png")
        return self._once("png", make)

    @property
    def vstar(self):
        def make():
            os.makedirs(self.path("vstar"), exist_ok=True)
            shutil.copy(self.png, self.path("vstar", "a.png"))
            with open(self.path("vstar", "test_questions.jsonl"), "w") as f:
                for i in range(2):
                    f.write(json.dumps({"image": "a.png", "text": f"What? (A) x (B) y {i}", "label": "A",
                                        "category": "c", "question_id": i}) + "\n")
            return self.path("vstar")
        return self._once("vstar", make)

    @property
    def rows(self):
        def make():
            shutil.copy(self.png, self.path("row.png"))
            row = {"messages": [{"role": "user", "content": "<image> Question: what?"},
                                {"role": "assistant", "content": "<answer>A</answer>"}], "images": ["row.png"]}
            with open(self.path("rows.json"), "w") as f:
                json.dump([row] * 4, f)
            return self.path("rows.json")
        return self._once("rows", make)

    def rl_row(self, **change):
        """A valid CoF-RL row (its image next to it), with reward_model / extra_info entries replaced by `change`."""
        shutil.copy(self.png, self.path("rl.png"))
        row = formats.rl_record(cof.SYSTEM_PROMPT, cof.rl_prompt("What? (A) x (B) y", "A"), "rl.png", "A",
                                "What? (A) x (B) y", 0)
        for k, v in change.items():
            where, key = k.split(".")
            row[where][key] = v
        return row

    @property
    def ckpt(self):
        """A trainer checkpoint (OUT/ckpt-000001) of the tiny model; cases corrupt copies of it (`fresh_ckpt`)."""
        def make():
            raw = M.Qwen25VL.from_pretrained(self.model)
            cfg = sft.TrainConfig(out=self.path("run"), keep_last=5)
            return str(trainer.save_checkpoint(raw, trainer.make_optimizer(raw, cfg), 1, cfg, {}))
        return self._once("ckpt", make)

    def fresh_ckpt(self, name):
        """A copy of the checkpoint under {tmp}/<name>/ckpt-000001 (with `latest`), for one case to damage."""
        out = self.path(name)
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(self.ckpt, os.path.join(out, "ckpt-000001"))
        with open(os.path.join(out, "latest"), "w") as f:
            f.write("ckpt-000001\n")
        return os.path.join(out, "ckpt-000001")


def run_case(name, env, limit=120.0):
    """Run one case with stdout / stderr captured, in a thread with a time limit -> (problem or None, seconds)."""
    fn, expect = CASES[name]
    out, err, box = io.StringIO(), io.StringIO(), {}

    def go():
        try:
            box["outcome"] = ("return", fn(env))
        except SystemExit as e:
            box["outcome"] = ("exit", e)
        except BaseException as e:  # noqa: BLE001 - judged below: the wrong type is a failure of the case
            box["outcome"] = ("raise", e)

    t0 = time.time()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):   # undone even when the case hangs
        th = threading.Thread(target=go, daemon=True)
        th.start()
        th.join(limit)
    if th.is_alive():
        return f"still running after {limit:.0f} s (a hang)", time.time() - t0
    return expect.judge(box["outcome"], err.getvalue()), time.time() - t0


def main():
    env = Env()
    failed = 0
    try:
        for name in CASES:
            problem, dt = run_case(name, env)
            failed += problem is not None
            print(f"{'FAIL' if problem else 'ok  '} {dt:6.2f}s {name}" + (f": {problem}" if problem else ""),
                  flush=True)
    finally:
        env.close()
    print(f"{len(CASES)} cases, {len(CASES) - failed} ok, {failed} failed")
    return 1 if failed else 0


# ==== the cases ===================================================================================================

def _img(h=56, w=56):
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8)


def _logits():
    return torch.randn(2, 10)


# ---- sampling arguments: decode.sample_next / generate, CofConfig, cof.run / rollouts ------------------------

value_errors("sample_next", {
    "temperature_negative": (lambda env: decode.sample_next(_logits(), True, -1.0), "temperature", ">= 0", "-1.0"),
    "temperature_nan": (lambda env: decode.sample_next(_logits(), True, NAN), "temperature", "nan"),
    "temperature_inf": (lambda env: decode.sample_next(_logits(), True, INF), "temperature", "inf"),
    "top_p_negative": (lambda env: decode.sample_next(_logits(), True, 1.0, -0.5), "top_p", "> 0 and <= 1"),
    "top_p_zero": (lambda env: decode.sample_next(_logits(), True, 1.0, 0.0), "top_p", "> 0"),
    "top_p_above_one": (lambda env: decode.sample_next(_logits(), True, 1.0, 1.5), "top_p", "<= 1"),
    "top_p_nan": (lambda env: decode.sample_next(_logits(), True, 1.0, NAN), "top_p"),
    "top_k_negative": (lambda env: decode.sample_next(_logits(), True, 1.0, 1.0, -3), "top_k", ">= 0"),
    "top_k_fraction": (lambda env: decode.sample_next(_logits(), True, 1.0, 1.0, 2.5), "top_k", "whole number"),
    "logits_1d": (lambda env: decode.sample_next(torch.randn(10)), "logits", "[B, V]"),
    "logits_ints": (lambda env: decode.sample_next(torch.ones(2, 3, dtype=torch.long)), "logits", "float"),
})
value_errors("sample_next_types", {
    "temperature_text": (lambda env: decode.sample_next(_logits(), True, "1"), "temperature", "'1'"),
    "do_sample_text": (lambda env: decode.sample_next(_logits(), "yes"), "do_sample", "True or False"),
    "top_k_bool": (lambda env: decode.sample_next(_logits(), True, 1.0, 1.0, True), "top_k"),
    "generator_seed": (lambda env: decode.sample_next(_logits(), True, generator=0), "generator", "torch.Generator"),
    "logits_list": (lambda env: decode.sample_next([[1.0, 2.0]]), "logits", "tensor"),
}, TypeError)
add("sample_next/temperature_zero_is_greedy", lambda env: decode.sample_next(torch.tensor([[0.0, 3.0, 1.0]]), True, 0.0),
    Returns(lambda t: t.tolist() == [1], "temperature 0 = greedy, as transformers"))

value_errors("generate", {
    "max_new_tokens_negative": (lambda env: decode.generate(env.net, torch.tensor([[1, 2]]), max_new_tokens=-1),
                                "max_new_tokens", ">= 1", "-1"),
    "max_new_tokens_zero": (lambda env: decode.generate(env.net, torch.tensor([[1, 2]]), max_new_tokens=0),
                            "max_new_tokens"),
    "max_new_tokens_fraction": (lambda env: decode.generate(env.net, torch.tensor([[1, 2]]), max_new_tokens=2.5),
                                "max_new_tokens", "whole number"),
    "temperature_nan": (lambda env: decode.generate(env.net, torch.tensor([[1]]), do_sample=True, temperature=NAN),
                        "temperature"),
    "temperature_negative": (lambda env: decode.generate(env.net, torch.tensor([[1]]), do_sample=True,
                                                         temperature=-0.7), "temperature"),
    "top_p_negative": (lambda env: decode.generate(env.net, torch.tensor([[1]]), do_sample=True, top_p=-1.0), "top_p"),
    "empty_prompt": (lambda env: decode.generate(env.net, torch.zeros(1, 0, dtype=torch.long)), "input_ids", "(1, 0)"),
    "token_past_vocabulary": (lambda env: decode.generate(env.net, torch.tensor([[10 ** 6]]), max_new_tokens=2),
                              "input_ids", "outside the vocabulary", "1000000"),
    "negative_token": (lambda env: decode.generate(env.net, torch.tensor([[-5]]), max_new_tokens=2),
                       "outside the vocabulary", "-5"),
    "eos_negative": (lambda env: decode.generate(env.net, torch.tensor([[1]]), eos_token_id=[-1]), "eos_token_id"),
    "pad_past_vocabulary": (lambda env: decode.generate(env.net, torch.tensor([[1]]), pad_token_id=10 ** 9),
                            "pad_token_id"),
})
add("generate/huge_max_new_tokens", lambda env: decode.generate(env.net, torch.tensor([[1, 2]]), max_new_tokens=10 ** 12,
                                                               eos_token_id=list(range(env.net.cfg.text.vocab_size))),
    Returns(lambda t: t.shape == (1, 1), "no cache of 10^12 slots up front: the row stops at its first token"))
value_errors("generate_types", {
    "max_new_tokens_none": (lambda env: decode.generate(env.net, torch.tensor([[1]]), max_new_tokens=None),
                            "max_new_tokens"),
    "ids_list": (lambda env: decode.generate(env.net, [[1, 2]]), "input_ids", "LongTensor"),
    "ids_float": (lambda env: decode.generate(env.net, torch.tensor([[1.0, 2.0]])), "input_ids", "integer"),
    "top_k_text": (lambda env: decode.generate(env.net, torch.tensor([[1]]), do_sample=True, top_k="5"), "top_k"),
}, TypeError)

value_errors("CofConfig", {
    "temperature_negative": (lambda env: cof.CofConfig(temperature=-1.0), "CofConfig.temperature", ">= 0"),
    "temperature_nan": (lambda env: cof.CofConfig(temperature=NAN), "CofConfig.temperature", "nan"),
    "top_p_zero": (lambda env: cof.CofConfig(top_p=0.0), "CofConfig.top_p", "> 0 and <= 1"),
    "top_p_big": (lambda env: cof.CofConfig(top_p=2.0), "CofConfig.top_p"),
    "top_k_negative": (lambda env: cof.CofConfig(top_k=-1), "CofConfig.top_k"),
    "max_turns_zero": (lambda env: cof.CofConfig(max_turns=0), "CofConfig.max_turns", ">= 1"),
    "max_turns_fraction": (lambda env: cof.CofConfig(max_turns=2.5), "CofConfig.max_turns", "whole number"),
    "max_new_tokens_negative": (lambda env: cof.CofConfig(max_new_tokens=-8), "CofConfig.max_new_tokens"),
    "enlarge_below_one": (lambda env: cof.CofConfig(enlarge=0.5), "CofConfig.enlarge", ">= 1"),
    "enlarge_inf": (lambda env: cof.CofConfig(enlarge=INF), "CofConfig.enlarge"),
    "scaleup_zero": (lambda env: cof.CofConfig(scaleup=0), "CofConfig.scaleup", "> 0"),
    "invalid_choice": (lambda env: cof.CofConfig(invalid="retry"), "CofConfig.invalid", "image, text"),
    "pixels_inverted": (lambda env: cof.CofConfig(min_pixels=5000, max_pixels=100), "min_pixels", "larger"),
    "unknown_key": (lambda env: cof.CofConfig.from_dict({"max_turn": 3}), "unknown CofConfig keys", "max_turn"),
})
value_errors("CofConfig_types", {
    "do_sample_text": (lambda env: cof.CofConfig(do_sample="true"), "CofConfig.do_sample", "true or false"),
    "max_turns_text": (lambda env: cof.CofConfig(max_turns="3"), "CofConfig.max_turns"),
    "question_format_none": (lambda env: cof.CofConfig(question_format=None), "CofConfig.question_format"),
    "from_dict_list": (lambda env: cof.CofConfig.from_dict([("max_turns", 3)]), "CofConfig options", "dict"),
}, TypeError)


def _run(env, images=None, questions=("q",), cfg=None, **kw):
    cfg = cfg if cfg is not None else cof.CofConfig(max_new_tokens=2, max_turns=1)
    return cof.run(env.net, env.tok, [_img()] if images is None else images, list(questions), cfg, **kw)


value_errors("cof.run", {
    "no_questions": (lambda env: cof.run(env.net, env.tok, [], []), "questions", "non-empty"),
    "more_images": (lambda env: _run(env, images=[_img(), _img()]), "2 images for 1 questions"),
    "group_size_zero": (lambda env: _run(env, group_size=0), "group_size", ">= 1"),
    "group_size_negative": (lambda env: _run(env, group_size=-2), "group_size"),
    "group_size_fraction": (lambda env: _run(env, group_size=1.5), "group_size", "whole number"),
    "empty_image": (lambda env: _run(env, images=[torch.zeros(3, 0, 5, dtype=torch.uint8)]), "image", "empty"),
    "float_image": (lambda env: _run(env, images=[torch.rand(3, 56, 56)]), "image", "uint8"),
    "grey_image": (lambda env: _run(env, images=[torch.zeros(1, 56, 56, dtype=torch.uint8)]), "image", "[3, H, W]"),
    "image_bad_bytes": (lambda env: _run(env, images=[b"\\x00not an image"]), "cannot read it as an image"),
    "messages_count": (lambda env: _run(env, messages=[[], []]), "2 message lists for 1 questions"),
    "rollouts_group_zero": (lambda env: cof.rollouts(env.net, env.tok, [_img()], ["q"], 0, max_new_tokens=2),
                            "group_size", ">= 1"),
    "rollouts_temperature_nan": (lambda env: cof.rollouts(env.net, env.tok, [_img()], ["q"], 2, temperature=NAN),
                                 "CofConfig.temperature"),
    "rollouts_unknown_override": (lambda env: cof.rollouts(env.net, env.tok, [_img()], ["q"], 2, temprature=1.0),
                                  "unknown CofConfig keys", "temprature"),
})
value_errors("cof.run_types", {
    "question_int": (lambda env: _run(env, questions=[5]), "questions[0]", "string"),
    "question_none": (lambda env: _run(env, questions=[None]), "questions[0]"),
    "questions_text": (lambda env: cof.run(env.net, env.tok, [_img()], "q"), "questions", "list"),
    "cfg_dict": (lambda env: _run(env, cfg={"max_new_tokens": 2}), "cfg", "CofConfig"),
    "generator_int": (lambda env: _run(env, generator=7), "generator", "torch.Generator"),
    "on_turn_text": (lambda env: _run(env, on_turn="print"), "on_turn", "function"),
    "image_none": (lambda env: _run(env, images=[None]), "load_image", "NoneType"),
}, TypeError)
add("cof.run/huge_question", lambda env: _run(env, questions=["word " * 20000],
                                              cfg=cof.CofConfig(max_new_tokens=2, max_model_len=4096)),
    Returns(lambda out: out[0].turns[0]["stop"] == "context" and out[0].answer == "",
            "a prompt past max_model_len is refused like vLLM: no generation, stop 'context'"))


# ---- reward functions: grpo.score_rollouts / grpo.train(reward_fn=...) -----------------------------------------

def _score(env, reward_fn, group_size=2):
    """score_rollouts on `group_size` stand-in trajectories of one prompt, rewarded by reward_fn."""
    ids = env.tok.encode("<think>x</think><answer>A</answer>")
    trajs = [types.SimpleNamespace(group=0, ids=[1] + ids, prompt_len=1, n_zooms=0, n_generated=len(ids))
             for _ in range(group_size)]
    prompts = [dict(kind="all", label="A", options={"A": "x", "B": "y"})]
    return grpo.score_rollouts(trajs, prompts, env.tok, grpo.GRPOConfig(group_size=group_size), reward_fn)


value_errors("reward_fn", {
    "one_too_many": (lambda env: _score(env, lambda g: [1.0] * (len(g) + 1)), "reward_fn returned 3 rewards",
                     "group of 2"),
    "one_too_few": (lambda env: _score(env, lambda g: [1.0]), "reward_fn returned 1 rewards", "one number per record"),
    "none_left": (lambda env: _score(env, lambda g: []), "returned 0 rewards"),
    "nan": (lambda env: _score(env, lambda g: [NAN, 1.0]), "reward_fn's reward 0", "finite", "nan"),
    "inf": (lambda env: _score(env, lambda g: [1.0, -INF]), "reward_fn's reward 1", "-inf"),
})
value_errors("reward_fn_types", {
    "returns_none": (lambda env: _score(env, lambda g: None), "reward_fn's result", "list", "NoneType"),
    "returns_number": (lambda env: _score(env, lambda g: 1.0), "reward_fn's result", "one number per record"),
    "returns_dict": (lambda env: _score(env, lambda g: {"a": 1}), "reward_fn's result"),
    "returns_text": (lambda env: _score(env, lambda g: ["1", "0"]), "reward_fn's reward 0", "'1'"),
    "not_callable": (lambda env: grpo.train(grpo.GRPOConfig(), reward_fn=5), "reward_fn", "function"),
    "cfg_dict": (lambda env: grpo.train({"lr": 1e-6}), "cfg", "GRPOConfig"),
    "sft_cfg_dict": (lambda env: sft.train({"lr": 1e-6}), "cfg", "TrainConfig"),
}, TypeError)
add("reward_fn/tensor", lambda env: [r["reward"] for r in _score(env, lambda g: torch.tensor([1.0, 0.5]))],
    Returns(lambda r: r == [1.0, 0.5], "a tensor of one reward per record is read as a list"))


# ---- RL rows and records: a label that is not a string, a question that is not a string --------------------------

def _read_rl(env, **change):
    path = env.path("rl.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps(env.rl_row(**change)) + "\n")
    return formats.read_rl(path)


def _read_records(env, **row):
    shutil.copy(env.png, env.path("rec.png"))
    path = env.path("records.json")
    with open(path, "w") as f:
        json.dump([{"question": "What? (A) x (B) y", "groundtruth": "A", "image_name": "rec.png", **row}], f)
    return E.read_synthetic(path)


for _name, _gt in (("null", None), ("list", ["A", "B"]), ("number", 3), ("empty", ""), ("dict", {"a": 1}),
                   ("blank", "  "), ("bool", True)):
    add(f"rl_row/ground_truth_{_name}", lambda env, gt=_gt: _read_rl(env, **{"reward_model.ground_truth": gt}),
        Raises(formats.DataError, "row 0", "reward_model.ground_truth", "non-empty string"))
for _name, _q in (("number", 7), ("list", ["q"]), ("dict", {"q": 1})):
    add(f"rl_row/question_{_name}", lambda env, q=_q: _read_rl(env, **{"extra_info.question": q}),
        Raises(formats.DataError, "row 0", "extra_info.question", "string"))
add("rl_row/kind_number", lambda env: _read_rl(env, **{"extra_info.kind": 3}),
    Raises(formats.DataError, "extra_info.kind"))
add("rl_row/question_absent", lambda env: _read_rl(env, **{"extra_info.question": None})[0][0]["question"],
    Returns(lambda q: q is None, "no question: grpo reads it from the prompt"))
for _name, _row in (("groundtruth_list", {"groundtruth": ["A"]}), ("groundtruth_null", {"groundtruth": None}),
                    ("groundtruth_number", {"groundtruth": 2}), ("question_number", {"question": 5})):
    add(f"rl_records/{_name}", lambda env, row=_row: _read_records(env, **row),
        Raises(E.BenchError, "record 0", next(iter(_row))))
add("rl_records/groundtruth_empty", lambda env: _read_records(env, groundtruth=""), Raises(E.BenchError, "record 0"))


# ---- evaluation output: what produced it, and where the summary goes --------------------------------------------

def _eval(env, out, *extra, model=None):
    return E.main(["--model", model or env.model, "--bench", "vstar", "--data", env.vstar, "--out", out,
                   "--device", "cpu", "--cfg", "max_new_tokens=2", "--cfg", "max_turns=1", *extra])


def _other_model(env):
    """A second tiny model (another seed): another source for the same --out."""
    return env._once("other", lambda: tiny.make_tiny(env.path("m2"), bpe_vocab_size=300, seed=1,
                                                     max_pixels=112 * 112, min_pixels=56 * 56))


def _rerun(env, name, *second, model=None):
    out = env.path(name, "res.jsonl")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    _eval(env, out)
    return _eval(env, out, *second, model=model)


add("eval_source/other_model", lambda env: _rerun(env, "ev1", model=_other_model(env)),
    Exits(1, "evaluate.py: error:", "res.jsonl holds results of another source (model.checkpoint", "m2", "--fresh"))
add("eval_source/other_cfg", lambda env: _rerun(env, "ev2", "--cfg", "enlarge=2.0"),
    Exits(1, "holds results of another source (cfg.enlarge 1.5 -> 2.0)", "--fresh"))
add("eval_source/other_dtype", lambda env: _rerun(env, "ev3", "--dtype", "fp32"), Exits(1, "(dtype None -> 'fp32')"))
add("eval_source/same_source_resumes", lambda env: [r["n"] for r in _rerun(env, "ev4")],
    Returns(lambda n: n == [2], "the same model, options and data resume: 2 questions, none run twice"))
add("eval_source/fresh_starts_over",
    lambda env: (_rerun(env, "ev5", "--fresh", model=_other_model(env)),
                 json.load(open(env.path("ev5", "res.jsonl.source")))["model"]["checkpoint"]),
    Returns(lambda r: r[1] == os.path.abspath(r[1]) and r[1].endswith("m2") and r[0][0]["n"] == 2,
            "--fresh deletes the other source's results and records the new one"))


def _unknown_source(env):
    out = env.path("ev6", "res.jsonl")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(json.dumps({"key": "orig:0", "correct": True}) + "\n")
    with open(out + ".source", "w") as f:
        f.write("[1, 2")                        # a damaged .source: an unknown source
    return _eval(env, out)


add("eval_source/unknown_source", _unknown_source, Exits(1, "results whose source is unknown", "--fresh"))


def _dotted_out(env):
    out = env.path("runs.v2", "results")        # no extension, a dot in a folder name
    os.makedirs(os.path.dirname(out), exist_ok=True)
    _eval(env, out)
    return sorted(os.listdir(env.path("runs.v2"))), os.path.exists(env.path("runs_summary.md"))


add("eval_out/dotted_folder", _dotted_out,
    Returns(lambda r: r == (["results", "results.source", "results_summary.md"], False),
            "the summary lands beside --out, never outside its folder"))
argv_error(E.main, "eval_out", {
    "folder": (["--model", "{model}", "--bench", "vstar", "--data", "{vstar}", "--out", "{tmp}"],
               "--out", "is a folder"),
})
value_errors("evaluate.evaluate", {
    "batch_size_zero": (lambda env: E.evaluate(env.net, env.tok, [], env.path("e.jsonl"), batch_size=0),
                        "batch_size", ">= 1"),
    "resolution_zero": (lambda env: E.evaluate(env.net, env.tok, [], env.path("e.jsonl"), resolutions=[0]),
                        "resolutions"),
    "out_is_folder": (lambda env: E.evaluate(env.net, env.tok, [], env.tmp), "is a folder"),
    "other_source": (lambda env: (E.claim_results(env.path("c.jsonl"), {"model": "a"}),
                                  open(env.path("c.jsonl"), "w").write("{}\n"),
                                  E.claim_results(env.path("c.jsonl"), {"model": "b"})),
                     "another source (model 'a' -> 'b')", "restart=True"),
})
value_errors("evaluate.evaluate_types", {
    "items_text": (lambda env: E.evaluate(env.net, env.tok, "items", env.path("e.jsonl")), "items", "list"),
    "item_not_dict": (lambda env: E.evaluate(env.net, env.tok, [1], env.path("e.jsonl")), "items[0]"),
    "cfg_dict": (lambda env: E.evaluate(env.net, env.tok, [], env.path("e.jsonl"), cfg={"a": 1}), "cfg"),
}, TypeError)
add("evaluate.load_results/junk_lines", lambda env: (open(env.path("r.jsonl"), "wb").write(
        b'{"key": "orig:1"}\n\xff\xfe junk\n[1]\n{"key": 5}\n{"key": "orig:2", "corr'), E.load_results(env.path("r.jsonl")))[1],
    Returns(lambda r: list(r) == ["orig:1"], "lines that are not records (torn, junk, not UTF-8) are skipped"))


# ---- trainer files that fail to load: named, with what to do ----------------------------------------------------

def _damage(env, name, file, data):
    """A copy of the checkpoint with trainer/<file> replaced by `data` (bytes), or cut to `data` bytes (an int)."""
    ckpt = env.fresh_ckpt(name)
    path = os.path.join(ckpt, "trainer", file)
    blob = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(blob[:data] if isinstance(data, int) else data)
    return ckpt


def _raw(env):
    return M.Qwen25VL.from_pretrained(env.model)


RESUME = "resume from an earlier checkpoint"
for _name, _data in (("truncated", 2000), ("empty", 0), ("junk", b"\x00\xff" * 64)):
    add(f"resume/rng_{_name}", lambda env, n=_name, d=_data: trainer.load_rng(_damage(env, f"rng_{n}", "rng-rank0.pt", d)),
        Raises(trainer.RunError, "rng-rank0.pt", RESUME))
    add(f"resume/optimizer_{_name}", lambda env, n=_name, d=_data: trainer.load_optimizer(
            _raw(env), trainer.make_optimizer(_raw(env), sft.TrainConfig()), _damage(env, f"opt_{n}", "optimizer.pt", d)),
        Raises(trainer.RunError, "optimizer.pt", RESUME))
    add(f"resume/trainable_{_name}", lambda env, n=_name, d=_data: trainer.load_trainable(
            _raw(env), _damage(env, f"tr_{n}", "trainable.safetensors", d)),
        Raises(trainer.RunError, "trainable.safetensors", RESUME))


def _partial_rng(env, state):
    ckpt = env.fresh_ckpt("rng_partial")
    torch.save(state, os.path.join(ckpt, "trainer", "rng-rank0.pt"))
    return trainer.load_rng(ckpt)


add("resume/rng_partial", lambda env: _partial_rng(env, {"torch": torch.get_rng_state()}),
    Raises(trainer.RunError, "rng-rank0.pt", "not the RNG state", RESUME))
add("resume/rng_wrong_types", lambda env: _partial_rng(env, {"torch": [1, 2], "numpy": 5, "python": "x"}),
    Raises(trainer.RunError, "rng-rank0.pt", RESUME))
add("resume/rng_a_list", lambda env: _partial_rng(env, [1, 2, 3]), Raises(trainer.RunError, "rng-rank0.pt", RESUME))


def _optimizer_of(env, state):
    ckpt = env.fresh_ckpt("opt_other")
    torch.save(state, os.path.join(ckpt, "trainer", "optimizer.pt"))
    raw = _raw(env)
    return trainer.load_optimizer(raw, trainer.make_optimizer(raw, sft.TrainConfig()), ckpt)


add("resume/optimizer_partial", lambda env: _optimizer_of(env, {"state": {}}), Raises(trainer.RunError, "optimizer.pt", RESUME))
add("resume/optimizer_a_list", lambda env: _optimizer_of(env, [1]), Raises(trainer.RunError, "optimizer.pt", RESUME))
for _name, _data in (("junk", b"{not json"), ("a_list", b"[1, 2]"), ("no_step", b'{"world": 1}'),
                     ("step_negative", b'{"step": -3}'), ("step_text", b'{"step": "3"}'), ("latin1", "{\"step\": 1, \"é\": 1}".encode("latin-1")),
                     ("empty", b""), ("deep", b"[" * 100000)):
    add(f"resume/state_{_name}", lambda env, n=_name, d=_data: trainer.read_state(_damage(env, f"st_{n}", "state.json", d)),
        Raises(trainer.RunError, "state.json", RESUME))


def _metrics(env, blob, start):
    path = env.path("metrics.jsonl")
    with open(path, "wb") as f:
        f.write(blob)
    trainer.Metrics(path, start=start).log(step=start + 1, loss=0.5)
    return [json.loads(line)["step"] for line in open(path, encoding="utf-8")]


_LINES = b"".join(json.dumps({"step": s, "loss": 1.0}).encode() + b"\n" for s in range(1, 5))
add("resume/metrics_binary_junk_after_last_line", lambda env: _metrics(env, _LINES + b"\xff\xfe\x00junk\x80", 4),
    Returns(lambda steps: steps == [1, 2, 3, 4, 5], "the junk is dropped like a torn line"))
add("resume/metrics_junk_between_lines", lambda env: _metrics(env, b"\x80\n" + _LINES + b"[1]\n\n", 2),
    Returns(lambda steps: steps == [1, 2, 3], "lines that are no step's metrics are dropped"))
add("resume/metrics_no_newline_at_end", lambda env: _metrics(env, _LINES.rstrip(b"\n"), 4),
    Returns(lambda steps: steps == [1, 2, 3, 4, 5], "the last line keeps its own line"))


def _latest(env, data):
    out = os.path.dirname(env.fresh_ckpt("latest_junk"))
    with open(os.path.join(out, "latest"), "wb") as f:
        f.write(data)
    return trainer.resolve_resume(sft.TrainConfig(out=out, resume="auto"))


add("resume/latest_not_utf8", lambda env: _latest(env, b"\xff\xfe\n"),
    Raises(FileNotFoundError, "--resume auto", "not a checkpoint of this trainer"))
add("resume/latest_outside", lambda env: _latest(env, b"../../etc\n"), Raises(FileNotFoundError, "--resume auto"))


def _sft_resume_cli(env):
    """The whole command line: a resume whose state.json is damaged ends with one line naming it (exit status 1)."""
    ckpt = _damage(env, "cli_state", "state.json", b"{oops")
    return sft.main(["--model", env.model, "--data", env.rows, "--out", os.path.dirname(ckpt), "--resume", ckpt,
                     "--max_steps", "2", "--batch_size", "1", "--grad_accum", "1", "--max_len", "512",
                     "--eval_n", "0", "--progress", "false", "--threads", "1"])


add("resume/sft_cli_damaged_state", _sft_resume_cli, Exits(1, "sft.py: error:", "state.json", RESUME))


# ---- command lines: every main rejects a bad option with argparse's one-line error naming it (exit status 2) ----

argv_error(sft.main, "sft.py", {
    "seed_negative": (["--seed", "-1"], "--seed", ">= 0"),
    "seed_huge": (["--seed", str(2 ** 40)], "--seed", "<= 4294967295"),
    "seed_text": (["--seed", "abc"], "--seed"),
    "lr_nan": (["--lr", "nan"], "--lr", "finite"),
    "lr_zero": (["--lr", "0"], "--lr", "> 0"),
    "lr_inf": (["--lr", "inf"], "--lr"),
    "beta1_one": (["--beta1", "1"], "--beta1", "< 1"),
    "warmup_above_one": (["--warmup_ratio", "1.5"], "--warmup_ratio", "<= 1"),
    "lora_dropout_negative": (["--lora_dropout", "-0.1"], "--lora_dropout"),
    "threads_negative": (["--threads", "-2"], "--threads", ">= 0"),
    "threads_huge": (["--threads", "100000"], "--threads", "<= 4096"),
    "batch_zero": (["--batch_size", "0"], "--batch_size", ">= 1"),
    "max_len_negative": (["--max_len", "-5"], "--max_len"),
    "eval_n_negative": (["--eval_n", "-1"], "--eval_n"),
    "epochs_nan": (["--epochs", "nan"], "--epochs"),
    "dtype_choice": (["--dtype", "fp8"], "--dtype", "one of"),
    "freeze_choice": (["--freeze_vision", "maybe"], "--freeze_vision"),
    "unknown_option": (["--lerning_rate", "1"], "unrecognized arguments", "--lerning_rate"),
    "pixels_inverted": (["--eval.processor_min_pixels", "5000", "--eval.processor_max_pixels", "100"],
                        "--eval.processor_min_pixels", "larger than --eval.processor_max_pixels"),
    "bool_text": (["--eval_no_zoom", "maybe"], "--eval_no_zoom", "true/false"),
    "nested_unknown": (["--eval.max_turn", "3"], "unrecognized arguments", "--eval.max_turn"),
    "nested_bad": (["--eval.max_new_tokens", "0"], "--eval.max_new_tokens must be a whole number >= 1"),
})
argv_error(grpo.main, "grpo.py", {
    "group_size_zero": (["--group_size", "0"], "--group_size", ">= 1"),
    "temperature_zero": (["--rollout.temperature", "0"], "--rollout.temperature", "> 0"),
    "temperature_nan": (["--rollout.temperature", "nan"], "--rollout.temperature"),
    "greedy_rollouts": (["--rollout.do_sample", "false"], "--rollout.do_sample", "must stay true"),
    "loops_differ": (["--rollout.system", "true"], "--rollout.system True and --eval.system False differ"),
    "clip_low_one": (["--clip_low", "1"], "--clip_low", "< 1"),
    "clip_dual_half": (["--clip_dual", "0.5"], "--clip_dual", "> 1"),
    "seed_negative": (["--seed", "-1"], "--seed"),
    "loss_choice": (["--loss", "sum"], "--loss", "token_mean, seq_mean"),
    "prompts_zero": (["--prompts_per_step", "0"], "--prompts_per_step"),
    "beta_negative": (["--beta", "-0.1"], "--beta"),
})
argv_error(sweep.main, "sweep.py", {
    "seed_negative": (["--seed", "-1"], "--seed", ">= 0"),
    "base_missing": (["--base", "{tmp}/no/such/ckpt"], "--base", "not a checkpoint directory"),
    "base_any_folder": (["--base", "{tmp}"], "--base", "config.json"),
    "sft_lr_nan": (["--sft_lr", "nan"], "--sft_lr"),
    "threads_zero": (["--threads", "0"], "--threads", ">= 1"),
    "per_kind_zero": (["--per_kind", "0"], "--per_kind"),
})
argv_error(build.main, "data.build", {
    "n_negative": (["--n", "-1"], "--n", ">= 0"),
    "rl_negative": (["--rl", "-5"], "--rl"),
    "seed_negative": (["--seed", "-1"], "--seed", ">= 0"),
    "seed_text": (["--seed", "x"], "--seed"),
    "kinds_text": (["--kinds", "easy=abc"], "--kinds easy", "'abc'"),
    "kinds_negative": (["--kinds", "easy=-1,hard=1"], "--kinds easy", ">= 0"),
    "kinds_nan": (["--kinds", "easy=nan"], "--kinds easy"),
    "kinds_all_zero": (["--kinds", "easy=0,hard=0"], "--kinds", "weight > 0"),
    "kinds_unknown": (["--kinds", "tricky=1"], "--kinds", "unknown kind"),
    "rl_kinds_text": (["--rl_kinds", "easy=x"], "--rl_kinds easy"),
    "oracle_share_above_one": (["--oracle_share", "edge=1.5"], "--oracle_share edge", "<= 1"),
    "eyesight_unknown": (["--eyesight", "wide=0.5"], "--eyesight", "unknown kind"),
    "eyesight_bar_above_one": (["--eyesight_bar", "2"], "--eyesight_bar", "<= 1"),
    "option_orders_zero": (["--option_orders", "0"], "--option_orders", ">= 1"),
    "resolutions_text": (["--resolutions", "448,abc"], "--resolutions", "'abc'"),
    "resolutions_zero": (["--resolutions", "0"], "--resolutions", ">= 1"),
    "acuity_nan": (["--acuity", "nan"], "--acuity"),
    "view_zero": (["--view_max_pixels", "0"], "--view_max_pixels"),
    "periods_fine": (["--periods", "medium=1"], "stripe periods"),
    "periods_text": (["--periods", "medium:6"], "--periods"),
    "colours_unknown": (["--colours", "red,mauve"], "--colours", "mauve"),
    "always_zoom_text": (["--always_zoom", "maybe"], "--always_zoom"),
})
argv_error(bench.main, "bench.py", {
    "model_reps_zero": (["model", "--reps", "0"], "--reps", ">= 1"),
    "model_hidden_32": (["model", "--hidden", "32"], "--hidden", ">= 64"),
    "model_hidden_100": (["model", "--hidden", "100"], "--hidden", "multiple of 64"),
    "model_layers_zero": (["model", "--layers", "0"], "--layers"),
    "model_image_tiny": (["model", "--image", "3"], "--image", ">= 28"),
    "model_new_tokens_negative": (["model", "--new_tokens", "-1"], "--new_tokens"),
    "model_samples_zero": (["model", "--samples", "0"], "--samples"),
    "model_threads_negative": (["model", "--threads", "-1"], "--threads"),
    "model_crop_source_text": (["model", "--crop_source", "abc"], "--crop_source", "WxH"),
    "model_crop_source_zero": (["model", "--crop_source", "0x5"], "--crop_source", ">= 1"),
    "model_device_unknown": (["model", "--device", "tpu9"], "--device", "torch device"),
    "cof_n_negative": (["cof", "--n", "-1"], "--n", ">= 1"),
    "cof_zooms_negative": (["cof", "--zooms", "-1"], "--zooms", ">= 0"),
    "cof_size_zero": (["cof", "--size", "0"], "--size"),
    "cof_hidden_32": (["cof", "--hidden", "32"], "--hidden"),
    "cof_reps_zero": (["cof", "--reps", "0"], "--reps"),
    "cof_cfg_temperature": (["cof", "--cfg", "temperature=-1"], "--cfg", "CofConfig.temperature"),
    "cof_cfg_unknown": (["cof", "--cfg", "bogus=1"], "--cfg", "bogus"),
    "cof_samples_without_data": (["cof", "--samples", "4"], "--model, --data and --samples"),
    "memory_parts_unknown": (["memory", "--parts", "attention,foo"], "--parts", "one of"),
    "memory_lengths_text": (["memory", "--lengths", "2k"], "--lengths"),
    "memory_lengths_odd": (["memory", "--lengths", "100"], "--lengths", "multiple of 8"),
    "memory_batches_text": (["memory", "--batches", "2y3"], "--batches", "ROWSxTOKENS"),
    "memory_batches_zero": (["memory", "--batches", "0x2048"], "--batches", ">= 1"),
    "memory_turn_zero": (["memory", "--turn", "0"], "--turn"),
    "memory_vocab_zero": (["memory", "--vocab", "0"], "--vocab"),
    "memory_hidden_100": (["memory", "--hidden", "100"], "--hidden"),
    "memory_device_unknown": (["memory", "--device", "tpu9"], "--device", "torch device"),
})
argv_error(ck._main, "crop_kernels", {
    "sources_text": (["--bench", "--sources", "abc"], "--sources", "WxH"),
    "sources_zero": (["--bench", "--sources", "0x768"], "--sources", ">= 1"),
    "sources_fraction": (["--bench", "--sources", "10.5x7"], "--sources"),
    "threads_negative": (["--threads", "-1"], "--threads", ">= 1"),
    "resample_unknown": (["--bench", "--resample", "nearest"], "--resample", "choice"),
})
argv_error(E.main, "evaluate.py", {
    "device_unknown": (["ask", "--model", "{model}", "--image", "{png}", "--question", "q", "--device", "tpu9"], "--device"),
    "dtype_unknown": (["ask", "--model", "{model}", "--image", "{png}", "--question", "q", "--dtype", "fp8"], "--dtype"),
    "cfg_zero_turns": (["ask", "--model", "{model}", "--image", "{png}", "--question", "q", "--cfg", "max_turns=0"],
                       "--cfg", "CofConfig.max_turns", ">= 1"),
    "cfg_text_number": (["ask", "--model", "{model}", "--image", "{png}", "--question", "q", "--cfg", "enlarge=abc"],
                        "--cfg enlarge=abc"),
    "cfg_unknown": (["ask", "--model", "{model}", "--image", "{png}", "--question", "q", "--cfg", "nope=1"],
                    "unknown --cfg key 'nope'"),
    "cfg_no_equals": (["ask", "--model", "{model}", "--image", "{png}", "--question", "q", "--cfg", "max_turns"],
                      "--cfg expects key=value"),
    "cfg_bool": (["ask", "--model", "{model}", "--image", "{png}", "--question", "q", "--cfg", "do_sample=ture"],
                 "--cfg do_sample=ture"),
    "eval_batch_zero": (["--model", "{model}", "--bench", "vstar", "--data", "{vstar}", "--out", "{tmp}/o.jsonl",
                         "--batch_size", "0"], "--batch_size", ">= 1"),
    "eval_limit_negative": (["--model", "{model}", "--bench", "vstar", "--data", "{vstar}", "--out",
                             "{tmp}/o.jsonl", "--limit", "-1"], "--limit"),
    "eval_resolutions_text": (["--model", "{model}", "--bench", "vstar", "--data", "{vstar}", "--out",
                               "{tmp}/o.jsonl", "--resolutions", "orig,big"], "--resolutions", "'big'"),
    "eval_resolutions_zero": (["--model", "{model}", "--bench", "vstar", "--data", "{vstar}", "--out",
                               "{tmp}/o.jsonl", "--resolutions", "0"], "--resolutions", ">= 1"),
    "eval_bench_unknown": (["--model", "{model}", "--bench", "mmbench", "--data", "{vstar}", "--out",
                            "{tmp}/o.jsonl"], "--bench"),
})
for _name, _argv, _words in (
        ("image_missing", ["ask", "--model", "{model}", "--image", "{tmp}/none.png", "--question", "q"], "none.png"),
        ("image_not_an_image", ["ask", "--model", "{model}", "--image", "{vstar}/test_questions.jsonl", "--question", "q"],
         "cannot read it as an image"),
        ("model_missing", ["ask", "--model", "{tmp}/nothing", "--image", "{png}", "--question", "q"], "is not a directory"),
        ("eval_data_missing", ["--model", "{model}", "--bench", "vstar", "--data", "{tmp}/nodata", "--out",
                               "{tmp}/o.jsonl"], "test_questions.jsonl not found"),
        ("eval_hrbench_missing", ["--model", "{model}", "--bench", "hrbench", "--data", "{tmp}/x.tsv",
                                  "--out", "{tmp}/o.jsonl"], "x.tsv not found")):
    add(f"evaluate.py/{_name}", lambda env, argv=_argv: E.main([env.fill(a) for a in argv]),
        Exits(1, "evaluate.py: error:", *_words))
add("gpu_acceptance/threads_negative", lambda env: __import__("gpu_acceptance")._parse(["--threads", "-1"]),
    Exits(2, "--threads", ">= 0"))
add("gpu_acceptance/device_unknown", lambda env: __import__("gpu_acceptance")._parse(["--device", "tpu"]),
    Exits(2, "--device", "invalid choice"))
add("data.build/out_is_a_file", lambda env: build.main(["--out", env.png, "--n", "1", "--rl", "0", "--val", "0",
                                                         "--test", "0", "--per_kind", "0", "--table_items", "0"]),
    Exits(1, "data.build: error:", "img.png"))
add("sft.py/data_missing", lambda env: sft.main(["--model", env.model, "--data", env.path("none.json"), "--out",
                                                 env.path("o"), "--max_steps", "1"]),
    Exits(1, "sft.py: error:", "none.json", "file not found"))


# ---- deep inside: what used to surface as a raw error from a lower layer -----------------------------------------

value_errors("parse_zoom", {
    "enlarge_negative": (lambda env: cof.parse_zoom(_CALL, 100, 100, enlarge=-1.5), "enlarge", ">= 1"),
    "enlarge_below_one": (lambda env: cof.parse_zoom(_CALL, 100, 100, enlarge=0.5), "enlarge"),
    "enlarge_nan": (lambda env: cof.parse_zoom(_CALL, 100, 100, enlarge=NAN), "enlarge", "nan"),
    "width_zero": (lambda env: cof.parse_zoom(_CALL, 0, 100), "width", ">= 1"),
    "height_inf": (lambda env: cof.find_box(_CALL, 100, INF), "height"),
})
value_errors("parse_zoom_types", {
    "text_none": (lambda env: cof.parse_zoom(None, 100, 100), "text", "string", "NoneType"),
    "text_bytes": (lambda env: cof.find_box(_CALL.encode(), 100, 100), "text", "bytes"),
    "text_list": (lambda env: cof.parse_zoom([_CALL], 100, 100), "text"),
    "enlarge_text": (lambda env: cof.parse_zoom(_CALL, 100, 100, enlarge="2"), "enlarge"),
    "extract_answer_int": (lambda env: cof.extract_answer(5), "text", "int"),
    "judge_answer_list": (lambda env: cof.judge_answer(["<answer>A</answer>"]), "text"),
    "match_answer_label_none": (lambda env: E.match_answer("A", None), "label", "NoneType"),
    "match_answer_options_list": (lambda env: E.match_answer("A", "A", ["A"]), "options", "dict"),
}, TypeError)
_CALL = '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 10, 50, 50]}}</tool_call>'
add("parse_zoom/inverted_box_is_no_box", lambda env: cof.find_box(_CALL.replace("10, 10, 50, 50", "50, 50, 10, 10"),
                                                                  100, 100),
    Returns(lambda r: r[0] is None and r[1] == "none" and "must be greater" in r[2], "an inverted box is refused"))
add("parse_zoom/box_in_range_is_enlarged", lambda env: cof.parse_zoom(_CALL, 100, 100),
    Returns(lambda b: b == (0, 0, 60, 60), "x1.5 about its centre, clipped"))
add("extract_answer/none_is_empty", lambda env: (cof.extract_answer(None), cof.judge_answer(None)),
    Returns(lambda r: r == ("", ""), "None: no answer (the loop's empty turn)"))

value_errors("tokenize_chat_types", {
    "string": (lambda env: T.tokenize_chat(env.tok, "hello"), "messages", "list", "str"),
    "list_of_strings": (lambda env: T.tokenize_chat(env.tok, ["hello"]), "messages[0]", "dict"),
    "dict": (lambda env: T.tokenize_chat(env.tok, {"role": "user", "content": "x"}), "messages", "list"),
    "text_int": (lambda env: T.tokenize_chat(env.tok, [{"role": "user", "content": [{"type": "text", "text": 5}]}]),
                 "messages[0] text", "string"),
    "encode_none": (lambda env: env.tok.encode(None), "text", "string"),
    "encode_bytes": (lambda env: env.tok.encode(b"abc"), "text"),
    "decode_text": (lambda env: env.tok.decode("abc"), "ids", "list"),
}, TypeError)
value_errors("tokenize_chat", {
    "empty": (lambda env: T.tokenize_chat(env.tok, []), "messages", "non-empty"),
    "role_unknown": (lambda env: T.tokenize_chat(env.tok, [{"role": "robot", "content": "x"}]), "unknown role"),
    "content_none": (lambda env: T.tokenize_chat(env.tok, [{"role": "user", "content": None}]), "content must be"),
    "grid_wrong_shape": (lambda env: T.tokenize_chat(env.tok, [{"role": "user", "content": [{"type": "image"}]}],
                                                     image_grid_thw=[[1, 2]]), "image_grid_thw", "[n_images, 3]"),
    "grid_zero": (lambda env: T.tokenize_chat(env.tok, [{"role": "user", "content": [{"type": "image"}]}],
                                              image_grid_thw=[[1, 0, 4]]), "image_grid_thw", ">= 1"),
    "grid_text": (lambda env: T.tokenize_chat(env.tok, [{"role": "user", "content": [{"type": "image"}]}],
                                              image_grid_thw="1,2,2"), "image_grid_thw"),
    "decode_negative": (lambda env: env.tok.decode([-1]), "ids", "-1"),
    "decode_fraction": (lambda env: env.tok.decode([1.5]), "ids", "1.5"),
    "decode_huge": (lambda env: env.tok.decode([2 ** 70]), "ids"),
})
add("tokenizer/decode_past_vocabulary", lambda env: env.tok.decode([10 ** 6]),
    Returns(lambda t: t == "", "ids past the vocabulary (a model's padded rows) decode to nothing, as transformers"))

value_errors("model", {
    "forward_token_past_vocabulary": (lambda env: env.net(torch.tensor([[1, 10 ** 6]])), "input_ids",
                                      "outside the vocabulary", "[0, 384)"),
    "forward_negative_token": (lambda env: env.net(torch.tensor([[-1]])), "outside the vocabulary"),
    "extend_token_past_vocabulary": (lambda env: env.net.extend(env.net.new_cache(1), torch.tensor([[999]])),
                                     "outside the vocabulary"),
    "extend_rows": (lambda env: env.net.extend(env.net.new_cache(2), torch.tensor([[1]])), "1 rows", "2"),
    "grid_bad": (lambda env: env.net(torch.tensor([[1]]), image_grid_thw=[[1, 2]]), "image_grid_thw"),
    "device_unknown": (lambda env: M.Qwen25VL.from_pretrained(env.model, device="tpu9"), "device", "torch device"),
})
value_errors("model_types", {
    "forward_float_ids": (lambda env: env.net(torch.tensor([[1.5]])), "input_ids", "integer"),
    "forward_1d_ids": (lambda env: env.net(torch.tensor([1, 2])), "input_ids", "[B, L]"),
    "forward_list": (lambda env: env.net([[1, 2]]), "input_ids", "tensor"),
    "dtype_text": (lambda env: M.Qwen25VL.from_pretrained(env.model, dtype="bf16"), "dtype", "torch dtype"),
    "path_none": (lambda env: M.Qwen25VL.from_pretrained(None), "path_or_id"),
}, TypeError)


def _config(env, name, **change):
    d = env.path(name)
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(env.model, d)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg.update(change)
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    return M.Qwen25VL.from_pretrained(d)


add("config/hidden_disagrees_with_weights", lambda env: _config(env, "c1", hidden_size=48),
    Raises(hub.CheckpointError, "config.json", "hidden_size 48", "disagrees with the weights", "[384, 64]"))
add("config/hidden_and_vocab_disagree", lambda env: _config(env, "c2", hidden_size=128, vocab_size=1000),
    Raises(hub.CheckpointError, "vocab_size 1000 and hidden_size 128", "disagree"))
add("config/more_layers_than_weights", lambda env: _config(env, "c3", num_hidden_layers=3),
    Raises(hub.CheckpointError, "missing tensor", "model.layers.2"))
add("config/heads_zero", lambda env: _config(env, "c4", num_attention_heads=0),
    Raises(hub.CheckpointError, "num_attention_heads must be a whole number >= 1, got 0"))
add("config/eps_text", lambda env: _config(env, "c5", rms_norm_eps="1e-6"), Raises(hub.CheckpointError, "rms_norm_eps"))

value_errors("crop_kernels", {
    "resize_empty": (lambda env: ck.resize(torch.zeros(3, 0, 0, dtype=torch.uint8), (28, 28)), "resize", "empty"),
    "resize_empty_row": (lambda env: ck.resize(torch.zeros(3, 5, 0, dtype=torch.uint8), (28, 28)), "empty"),
    "resize_float": (lambda env: ck.resize(torch.rand(3, 8, 8), (28, 28)), "uint8"),
    "resize_zero_size": (lambda env: ck.resize(_img(8, 8), (0, 28)), "size", "positive"),
    "crop_empty_image": (lambda env: ck.crop(torch.zeros(3, 0, 9, dtype=torch.uint8), (0, 0, 1, 1)), "crop", "empty"),
    "crop_inverted": (lambda env: ck.crop(_img(20, 20), (10, 10, 5, 5)), "inverted"),
    "crop_fraction": (lambda env: ck.crop(_img(20, 20), (0, 0, 5.5, 5)), "integer"),
    "patchify_empty": (lambda env: ck.patchify(torch.zeros(3, 0, 0, dtype=torch.uint8)), "positive multiples"),
    "smart_resize_nan": (lambda env: ck.smart_resize(NAN, 10), "height", "nan"),
    "smart_resize_zero": (lambda env: ck.smart_resize(10, 0), "width", "> 0"),
    "smart_resize_aspect": (lambda env: ck.smart_resize(10, 5000), "aspect ratio"),
    "load_image_empty_bytes": (lambda env: ck.load_image(b""), "cannot read it as an image"),
    "load_image_text_file": (lambda env: ck.load_image(os.path.join(env.vstar, "test_questions.jsonl")),
                             "cannot read it as an image"),
    "crp_no_boxes": (lambda env: ck.crop_resize_patchify(_img(56, 56), [], []), "at least one box"),
})
value_errors("crop_kernels_types", {
    "smart_resize_text": (lambda env: ck.smart_resize("10", 10), "height"),
    "load_image_none": (lambda env: ck.load_image(None), "load_image", "NoneType"),
    "load_image_int": (lambda env: ck.load_image(5), "load_image"),
}, TypeError)
add("crop_kernels/load_image_missing", lambda env: ck.load_image(env.path("nope.png")), Raises(FileNotFoundError, "nope.png"))
add("crop_kernels/image_past_pixel_limit", lambda env: ck.load_image(env.png, max_pixels=100),
    Raises(ck.ImageTooLargeError, "80x60 = 4800 pixels", "decompression-bomb limit"))


# ---- the rest of the public functions: bad types and numbers ------------------------------------------------------

value_errors("library", {
    "group_advantages_group_zero": (lambda env: grpo.group_advantages(torch.ones(4), 0), "group_size", ">= 1"),
    "group_advantages_partial_group": (lambda env: grpo.group_advantages(torch.ones(5), 2), "whole groups"),
    "group_advantages_nan": (lambda env: grpo.group_advantages(torch.tensor([1.0, NAN]), 2), "finite"),
    "agar_lengths": (lambda env: grpo.agar([True], [True, False], [True]), "agar", "one entry per sample"),
    "resize_long_side_zero": (lambda env: E.resize_long_side(_img(10, 10), 0), "size", ">= 1"),
    "question_format": (lambda env: cof.question_text("q", "bogus"), "question_format", "released, train"),
    "zoom_size_inverted": (lambda env: cof.zoom_size((10, 10, 5, 5)), "zoom_size", "inverted"),
    "steps_per_epoch_zero_batch": (lambda env: sft.steps_per_epoch(10, 0), "global_batch"),
    "new_cache_negative": (lambda env: env.net.new_cache(-1), "batch_size", ">= 0"),
    "resize_size_three": (lambda env: ck.resize(_img(10, 10), (1, 2, 3)), "size must be (h, w)"),
    "patchify_nan": (lambda env: ck.patchify(torch.full((3, 28, 28), NAN)), "patchify", "[0, 255]"),
    "trainconfig_group": (lambda env: grpo.GRPOConfig(group_size=0), "--group_size", ">= 1"),
    "hrbench_style": (lambda env: E.hrbench_question("q", {}, "x"), "prompt style"),
    "write_sft_no_messages": (lambda env: formats.write_sft(env.path("w.json"), [{"images": []}]), "messages"),
})
value_errors("huge", {
    "seed_past_int_text_limit": (lambda env: sft.TrainConfig(seed=10 ** 5000), "--seed", "an integer of 16610 bits"),
    "cfg_number_of_5000_digits": (lambda env: E.cfg_from_args(["max_turns=" + "9" * 5000]), "--cfg max_turns=",
                                  "whole number"),
    "megabyte_option_text": (lambda env: E.cfg_from_args(["invalid=" + "x" * 10 ** 6]), "CofConfig.invalid", "..."),
    "question_of_a_megabyte": (lambda env: cof.question_text("q" * 10 ** 6, "nope"), "question_format"),
})
value_errors("library_types", {
    "format_ok_none": (lambda env: grpo.format_ok(None), "text", "string"),
    "accuracy_none": (lambda env: grpo.accuracy(None, {"label": "A"}), "text"),
    "is_correct_no_label": (lambda env: E.is_correct({}, "A"), "item['label']"),
    "build_messages_none": (lambda env: cof.build_messages(None), "question", "string"),
    "rl_prompt_label_list": (lambda env: cof.rl_prompt("q", ["A"]), "ground_truth", "string"),
    "to_chat_text": (lambda env: formats.to_chat("abc"), "messages", "list"),
    "crop_resize_patchify_sizes_none": (lambda env: ck.crop_resize_patchify(_img(56, 56), [(0, 0, 28, 28)], None),
                                        "sizes", "list"),
    "draw_trace_none": (lambda env: report.draw_trace(None, env.path("t.png")), "traj", "Trajectory"),
    "force_prefixes_none": (lambda env: bench.force_prefixes(env.tok, None), "prefixes", "list"),
    "read_vstar_none": (lambda env: E.read_vstar(None), "root"),
    "read_hrbench_int": (lambda env: E.read_hrbench(5), "path"),
    "read_sft_none": (lambda env: formats.read_sft(None), "path"),
    "read_rl_list": (lambda env: formats.read_rl(["a.jsonl"]), "path"),
    "config_from_dict_none": (lambda env: sft.TrainConfig.from_dict(None), "TrainConfig options", "dict"),
    "config_out_none": (lambda env: sft.TrainConfig(out=None), "--out", "string"),
    "config_lr_bool": (lambda env: sft.TrainConfig(lr=True), "--lr"),
}, TypeError)

# ---- files: truncated, corrupt, not UTF-8, the wrong shape ---------------------------------------------------------

def _file(env, name, data):
    path = env.path("files", name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())
    return path


_SFT_OK = json.dumps([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
for _name, _data, _words in (
        ("truncated", _SFT_OK[:40], "not valid JSON"), ("latin1", '[{"messages": "caf\u00e9"}]'.encode("latin-1"),
                                                       "not UTF-8"),
        ("object", '{"messages": []}', "JSON list of rows"), ("rows_numbers", "[1, 2]", "row 0"),
        ("deep", "[" * 200000, "not valid JSON"), ("empty", "", "not valid JSON"),
        ("role_wrong", json.dumps([{"messages": [{"role": "bot", "content": "x"}]}]), "unknown role"),
        ("image_outside", json.dumps([{"messages": [{"role": "user", "content": "<image>q"},
                                                    {"role": "assistant", "content": "a"}], "images": ["../../x.png"]}]),
         "leaves the dataset root")):
    add(f"files/sft_{_name}", lambda env, n=_name, d=_data: formats.read_sft(_file(env, f"sft_{n}.json", d)),
        Raises(formats.DataError, f"sft_{_name}.json", _words))
for _name, _data, _words in (("truncated_line", '{"prompt": [', "line 1 is not valid JSON"),
                             ("not_utf8", b"\xff\xfe\n", "not UTF-8"), ("list_row", "[1]\n", "JSON object"),
                             ("no_prompt", "{}\n", "prompt")):
    add(f"files/rl_{_name}", lambda env, n=_name, d=_data: formats.read_rl(_file(env, f"rl_{n}.jsonl", d)),
        Raises(formats.DataError, f"rl_{_name}.jsonl", _words))
add("files/rl_skip_bad", lambda env: formats.read_rl(_file(env, "rl_mixed.jsonl", "[1]\n{}\n"), skip_bad=True),
    Returns(lambda r: r == ([], 2), "--skip_bad: bad rows skipped and counted"))
for _name, _data, _words in (("not_utf8", b"\xff\n", "not UTF-8"), ("list_line", "[1]\n", "expected a JSON object"),
                             ("no_label", json.dumps({"image": "a.png", "text": "q"}) + "\n", "missing field"),
                             ("text_number", json.dumps({"image": "a.png", "text": 3, "label": "A"}) + "\n",
                              "'text' must be a string"),
                             ("image_absolute", json.dumps({"image": "/etc/passwd", "text": "q", "label": "A"}) + "\n",
                              "leaves the benchmark folder"),
                             ("deep", "[" * 100000 + "\n", "not JSON")):
    add(f"files/vstar_{_name}", lambda env, n=_name, d=_data: E.read_vstar(_file(env, f"v_{n}/test_questions.jsonl", d)),
        Raises(E.BenchError, "test_questions.jsonl", _words))
for _name, _data, _words in (("empty", "", "no rows"), ("not_utf8", b"\xff\xfe\x00", "not a UTF-8 TSV"),
                             ("no_image", "index\tquestion\tanswer\tA\tB\n0\tq\tA\tx\ty\n", "missing field"),
                             ("answer_not_option", "index\tquestion\tanswer\tA\tB\timage\n0\tq\tE\tx\ty\tQUJD\n",
                              "answer 'E' is not one of the options")):
    add(f"files/hrbench_{_name}", lambda env, n=_name, d=_data: E.read_hrbench(_file(env, f"hr_{n}.tsv", d)),
        Raises(E.BenchError, f"hr_{_name}.tsv", _words))
for _name, _data, _words in (("not_json", "{x", "not UTF-8 JSON"), ("object", '{"a": 1}', "expected a list of records"),
                             ("record_list", "[[1]]", "expected a JSON object")):
    add(f"files/records_{_name}", lambda env, n=_name, d=_data: E.read_synthetic(_file(env, f"rec_{n}.json", d)),
        Raises(E.BenchError, f"rec_{_name}.json", _words))


def _checkpoint_file(env, name, file, data):
    d = env.path(name)
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(env.model, d)
    path = os.path.join(d, file)
    blob = open(path, "rb").read() if os.path.exists(path) else b""
    with open(path, "wb") as f:
        f.write(blob[:data] if isinstance(data, int) else data)
    return d


for _name, _file_name, _data, _words in (
        ("weights_truncated", "model.safetensors", 5000, "model.safetensors"),
        ("weights_empty", "model.safetensors", 0, "model.safetensors"),
        ("config_truncated", "config.json", 30, "config.json"),
        ("config_not_utf8", "config.json", b"\xff\xfe{}", "config.json"),
        ("config_list", "config.json", b"[1]", "expected a JSON object"),
        ("generation_junk", "generation_config.json", b"{oops", "generation_config.json"),
        ("generation_list", "generation_config.json", b"[1, 2]", "generation_config.json"),
        ("preprocessor_junk", "preprocessor_config.json", b"{oops", "preprocessor_config.json"),
        ("preprocessor_list", "preprocessor_config.json", b"[1]", "preprocessor_config.json"),
        ("preprocessor_not_utf8", "preprocessor_config.json", b"\xff\xfe", "preprocessor_config.json"),
        ("preprocessor_pixels_text", "preprocessor_config.json", b'{"min_pixels": "a", "max_pixels": 5}',
         "min_pixels/max_pixels")):
    add(f"checkpoint/{_name}", lambda env, n=_name, f=_file_name, d=_data: M.Qwen25VL.from_pretrained(
            _checkpoint_file(env, n, f, d)), Raises(hub.CheckpointError, _words))
for _name, _file_name, _data, _words in (
        ("tokenizer_truncated", "tokenizer.json", 100, "tokenizer.json"),
        ("tokenizer_config_junk", "tokenizer_config.json", b"{x", "tokenizer_config.json"),
        ("tokenizer_config_not_utf8", "tokenizer_config.json", b"\xff\xfe", "tokenizer_config.json")):
    add(f"checkpoint/{_name}", lambda env, n=_name, f=_file_name, d=_data: T.Tokenizer.from_pretrained(
            _checkpoint_file(env, n, f, d)), Raises(hub.CheckpointError, _words))


if __name__ == "__main__":
    raise SystemExit(main())
