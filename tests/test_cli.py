"""Every command line here is spelled one way (checks.ArgumentParser): an option is the name of what it sets, with
underscores (`--max_steps`), a nested config's field with a dot (`--eval.max_turns`), a yes/no option `--flag` or
`--flag false`. Each command's `--help` is read (in this process: a few seconds for all of them) and every option it
lists must follow that rule; a file with a command line this test does not know fails it."""
import dataclasses
import os
import re

import pytest

import bench
import cof
import crop_kernels as ck
import evaluate as E
import gpu_acceptance
import grpo
import sft
import sweep
from data import agent, build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STYLE = re.compile(r"--[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)?")

# file with a `__main__` -> the argv of each of its command lines (the `--help` is added)
COMMANDS = {
    "sft.py": [(sft.main, [])],
    "grpo.py": [(grpo.main, [])],
    "sweep.py": [(sweep.main, [])],
    "evaluate.py": [(E.main, []), (E.main, ["ask"])],
    "bench.py": [(bench.main, []), (bench.main, ["model"]), (bench.main, ["cof"]), (bench.main, ["memory"])],
    "crop_kernels.py": [(ck._main, [])],
    "data/build.py": [(build.main, [])],
    "data/agent.py": [(agent.main, [])],
    "tests/gpu_acceptance.py": [(gpu_acceptance._parse, [])],
}
NO_OPTIONS = {"tests/hostile_corpus.py": "runs every case, takes no arguments",
              "tests/grpo_runner.py": "one JSON config, written by tests/test_grpo.py"}


def _help(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_every_command_line_is_known():
    found = set()
    for d, dirs, files in os.walk(ROOT):
        dirs[:] = [x for x in dirs if not x.startswith(".") and x not in ("runs", "__pycache__")]
        for f in files:
            path = os.path.relpath(os.path.join(d, f), ROOT)
            if f.endswith(".py") and 'if __name__ == "__main__"' in open(os.path.join(d, f), encoding="utf-8").read():
                found.add(path)
    assert found - {"tests/test_cli.py"} == set(COMMANDS) | set(NO_OPTIONS)


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_every_option_is_spelled_one_way(path, capsys):
    for main, argv in COMMANDS[path]:
        text = _help(main, argv, capsys)
        options = set(re.findall(r"(?<![\w-])--[\w.-]+", text.split("options:", 1)[1]))
        assert options, f"{path} {argv}: no options in its --help"
        bad = sorted(o for o in options if not STYLE.fullmatch(o) and o != "--help")
        assert not bad, f"{path} {' '.join(argv)}: options not spelled --name_with_underscores: {bad}"


def test_the_trainers_nest_the_loop_options_instead_of_declaring_them_again():
    loop = {f.name for f in dataclasses.fields(cof.CofConfig)}
    for cls in (sft.TrainConfig, grpo.GRPOConfig):
        names = {f.name for f in dataclasses.fields(cls)}
        assert not names & loop, f"{cls.__name__} declares loop options of its own: {sorted(names & loop)}"
    assert isinstance(grpo.GRPOConfig().rollout, cof.CofConfig) and isinstance(sft.TrainConfig().eval, cof.CofConfig)


def test_the_other_spellings_are_read_as_the_one_rule(capsys):
    cfg = sft.parse_args(["--model", "m", "--max-steps", "3", "--no-progress", "--eval.max-turns", "2",
                          "--no_eval.system", "--freeze_merger", "--eval_no_zoom=false"])
    assert (cfg.max_steps, cfg.progress, cfg.eval.max_turns, cfg.eval.system) == (3, False, 2, False)
    assert cfg.freeze_merger is True and cfg.eval_no_zoom is False
    assert build.BuildConfig.from_args(["--rl-kinds", "easy=1", "--always-zoom"]).always_zoom is True
    with pytest.raises(SystemExit):                            # never abbreviated
        sft.parse_args(["--model", "m", "--max_step", "3"])
    assert "unrecognized arguments: --max_step" in capsys.readouterr().err


def test_a_config_round_trips_through_its_saved_dict():
    """trainer/state.json holds dataclasses.asdict(cfg): the nested loops as dicts, read back by from_dict."""
    cfg = grpo.parse_args(["--model", "m", "--rollout.max_turns", "3", "--eval.max_new_tokens", "7"])
    again = grpo.GRPOConfig.from_dict(dataclasses.asdict(cfg))
    assert again == cfg and again.rollout.do_sample and again.rollout.max_turns == 3
    with pytest.raises(ValueError, match=r"unknown --rollout keys \['max_len'\]"):
        grpo.GRPOConfig.from_dict({"rollout.max_len": 4})
    with pytest.raises(ValueError, match=r"unknown GRPOConfig keys \['max_len'\]"):
        grpo.GRPOConfig.from_dict({"max_len": 4})
