"""README as a spec: the reading guide names functions a reader will look for (every name must exist in the code), and
the one-minute demo's command runs and answers."""
import importlib
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ["crop_kernels", "model", "decode", "tokenizer", "report", "cof", "evaluate", "data.synth", "data.agent",
           "data.build", "data.formats", "data.tiny", "hub", "logprobs", "sft", "trainer", "grpo", "bench", "sweep"]
FIELDS = {"messages", "images", "pixel_values"}   # row fields and tensor names the guide mentions, not code


def _resolve(name, mods):
    """The object `name` (dotted: module path, then attributes) names in any of our modules or their classes."""
    parts = name.split(".")
    for mod_name, mod in mods.items():
        mparts = mod_name.split(".")
        rest = parts[len(mparts):] if parts[:len(mparts)] == mparts else parts
        if rest and _walk(mod, rest) is not None:
            return True
        for cls in [v for v in vars(mod).values() if isinstance(v, type) and v.__module__ == mod.__name__]:
            if _walk(cls, rest) is not None:
                return True
    return False


def _walk(obj, attrs):
    for a in attrs:
        if not hasattr(obj, a):
            return None
        obj = getattr(obj, a)
    return obj


def test_reading_guide_names_exist():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = text.index("## How to read this code")
    guide = text[start:text.index("\n## ", start + 1)]
    names = {n for n in re.findall(r"`([A-Za-z_][\w.]*)`", guide) if not n.endswith(".py") and n not in FIELDS}
    mods = {m: importlib.import_module(m) for m in MODULES}
    missing = sorted(n for n in names if not _resolve(n, mods))
    assert len(names) > 30 and not missing, f"README's reading guide names what the code does not have: {missing}"


def test_demo_command_runs(tmp_path):
    """The command under "One-minute demo" (after the install) runs the shipped checkpoint on its item: two zooms on
    the held-out hard item, the right answer (D), and the trace picture written."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text[text.index("## One-minute demo"):text.index("\n## ", text.index("## One-minute demo") + 1)]
    line = re.search(r"```bash\n(.*)\n```", section).group(1)
    cmd = line.split(" && ", 1)[1].split()
    assert cmd[:3] == ["python", "evaluate.py", "ask"] and "--trace" in cmd
    cmd[cmd.index("--trace") + 1] = str(tmp_path / "trace.png")
    out = subprocess.run([sys.executable] + cmd[1:], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "=== answer: 'D'  (zooms 2," in out.stdout and (tmp_path / "trace.png").stat().st_size > 10_000
