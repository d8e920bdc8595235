"""README's reading guide names functions a reader will look for: every name in it must exist in the code."""
import importlib
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ["crop_kernels", "model", "decode", "tokenizer", "report", "cof", "evaluate", "data.synth", "data.agent",
           "data.build", "data.formats", "data.tiny", "sft", "trainer", "grpo", "bench", "sweep"]
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
