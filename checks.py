"""One way of checking input: what every public function and command line here uses on the values it is given.

A failed check raises TypeError (a value of the wrong kind) or ValueError (the right kind, a wrong value), and the
message names the argument or option, shows the bad value and says what is allowed:

    --lr must be a finite number > 0, got nan
    temperature must be a finite number >= 0, got -1.0
    questions must be a non-empty list, got []

Library functions call `number`, `string`, `one_of`, `sequence`, `kind` and `device` on their arguments once per
call (never per token); config dataclasses declare their fields with `option` (a nested config too: the trainers'
`eval: CofConfig`), LIMITS and CHOICES tables, and call `options`. Every command line is a `ArgumentParser`, one
spelling for all: `--max_steps 3`, `--eval.max_turns 3`, `--progress false` (see there); a config's command line is
`parse_config`, which declares one option per field. Options give argparse `arg(...)` as their type (argparse then
prints its one-line error naming the option, exit status 2) and turn a config's TypeError / ValueError into the same
`parser.error`. Files that fail to load are named by their readers (data/formats.py, evaluate.read_*,
hub.CheckpointError, trainer.py's files), which say what to do.

This is the lowest file: every other file may import it, it imports none of them.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import numbers
import sys

import torch

SEED_MAX = 2**32 - 1   # the largest seed every generator here takes (numpy's seeds are 32-bit)
THREADS_MAX = 4096     # the most CPU threads an option may ask torch for


def rule(lo=None, hi=None, *, lo_open=False, hi_open=False, whole=False) -> str:
    """What a number must be, in words: `a whole number >= 1`, `a finite number > 0 and <= 1`."""
    bounds = [f"{'>' if lo_open else '>='} {lo}" if lo is not None else "",
              f"{'<' if hi_open else '<='} {hi}" if hi is not None else ""]
    return " ".join(["a whole number" if whole else "a finite number", " and ".join(b for b in bounds if b)]).strip()


def _must(name, what, value):
    return f"{name} must be {what}, got {_short(value)}" if name else f"must be {what}, got {_short(value)}"


def number(value, name, lo=None, hi=None, *, lo_open=False, hi_open=False, whole=False):
    """`value` when it is a real number (an int for whole=True; bools are not numbers), finite, and within lo..hi
    (ends excluded with lo_open / hi_open). TypeError for a non-number, ValueError otherwise; both name `name`."""
    what = rule(lo, hi, lo_open=lo_open, hi_open=hi_open, whole=whole)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(_must(name, what, value))
    integral = isinstance(value, numbers.Integral)
    finite = integral or math.isfinite(value)          # (math.isfinite of a huge int would overflow)
    too_low = lo is not None and (value < lo or (lo_open and value == lo))
    too_high = hi is not None and (value > hi or (hi_open and value == hi))
    if (whole and not integral) or not finite or too_low or too_high:
        raise ValueError(_must(name, what, value))
    return value


def parse_number(text, name, lo=None, hi=None, *, lo_open=False, hi_open=False, whole=False):
    """A number written as text (a command-line value, `key=value` pairs), converted (int for whole numbers, else
    float) and checked by `number`; text that is no number is a ValueError naming `name`."""
    try:
        value = int(text) if whole else float(text)
    except (TypeError, ValueError):
        raise ValueError(_must(name, rule(lo, hi, lo_open=lo_open, hi_open=hi_open, whole=whole), text)) from None
    return number(value, name, lo, hi, lo_open=lo_open, hi_open=hi_open, whole=whole)


def parse_bool(text):
    """`true` / `false` (or 1 / 0, yes / no, any case) as a bool; ValueError for anything else."""
    if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise ValueError(f"expected true/false (or 1/0, yes/no), got {text!r}")
    return text.lower() in ("1", "true", "yes")


def string(value, name, *, empty=False):
    """`value` when it is a str (a non-empty one unless empty=True)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__} {_short(value)}")
    if not empty and not value:
        raise ValueError(f"{name} must be a non-empty string, got ''")
    return value


def one_of(value, name, choices):
    """`value` when it is one of `choices`."""
    if not isinstance(value, (str, int, float, bool, type(None))) or value not in choices:
        raise ValueError(_must(name, "one of " + ", ".join(map(str, choices)), value))
    return value


def sequence(value, name, *, empty=False):
    """`value` as a list when it is a list or tuple (a non-empty one unless empty=True); a string, a dict or a
    tensor is not a sequence of items here."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list, got {type(value).__name__} {_short(value)}")
    if not empty and not value:
        raise ValueError(f"{name} must be a non-empty list, got {value!r}")
    return list(value)


def kind(value, name, types, what, *, none=False):
    """`value` when it is an instance of `types` (or None with none=True); `what` says so in words."""
    if (value is None and none) or isinstance(value, types):
        return value
    raise TypeError(f"{name} must be {what}, got {type(value).__name__} {_short(value)}")


def device(value, name="device"):
    """A torch.device from a device or its text (`cpu`, `cuda`, `cuda:1`) that this machine has."""
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(_must(name, "a torch device such as cpu, cuda or cuda:1", value)) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name} {value!r}: torch sees no CUDA device on this machine; use cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"{name} {value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _short(value):
    """repr(value), cut to 80 characters (a hostile value can be a megabyte long)."""
    try:
        text = repr(value)
    except ValueError:           # an int past Python's 4300-digit limit for conversion to text
        return f"an integer of {value.bit_length()} bits"
    return text if len(text) <= 80 else text[:77] + "..."


# ---- config dataclasses --------------------------------------------------------------------------------------------

def option(default, help):
    """A config dataclass field with its help text (what `--help` shows). A default that is itself a config (a nested
    one: `eval: CofConfig`) is copied for every instance."""
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: dataclasses.replace(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def nested_default(f):
    """The default of the dataclass field `f` when it is a nested config (declared with `option(SomeConfig(...))`),
    else None."""
    if f.default_factory is dataclasses.MISSING:
        return None
    default = f.default_factory()
    return default if dataclasses.is_dataclass(default) else None


def options(cfg, label=lambda name: f"--{name}"):
    """Check every field of the dataclass `cfg` against its declared type (int, float, str, bool, `int | None`, a
    nested config; a float must be finite), cfg.LIMITS[name] = (lowest, whether the lowest is allowed[, highest,
    whether the highest is allowed]) and cfg.CHOICES[name] (allowed values), where the class has them. `label` turns
    a field name into the name the user wrote (`--lr` on a command line, `CofConfig.max_turns` in code). A nested
    config checks its own fields when it is built."""
    limits, choices = getattr(cfg, "LIMITS", {}), getattr(cfg, "CHOICES", {})
    for f in dataclasses.fields(cfg):
        v, name = getattr(cfg, f.name), label(f.name)
        typ = f.type if isinstance(f.type, str) else f.type.__name__
        nested = nested_default(f)
        if nested is not None:
            kind(v, name, type(nested), f"a {type(nested).__name__}")
            continue
        if typ.endswith(" | None"):
            if v is None:
                continue
            typ = typ[:-len(" | None")]
        if typ in ("int", "float"):
            lo, lo_ok, hi, hi_ok = (tuple(limits.get(f.name, ())) + (None, True, None, True))[:4]
            number(v, name, lo, hi, lo_open=not lo_ok, hi_open=not hi_ok, whole=typ == "int")
        elif typ == "bool" and not isinstance(v, bool):
            raise TypeError(_must(name, "true or false", v))
        elif typ == "str":
            string(v, name, empty=True)
        if f.name in choices:
            one_of(v, name, choices[f.name])


def from_dict(cls, d):
    """cls(**d) for a config dataclass, refusing keys it does not have (a typo must not be silently dropped). A nested
    config's fields come as `name.field` keys (the command line's spelling: `eval.max_turns`) or as a dict under its
    name (what dataclasses.asdict writes); the fields not given keep the nested default."""
    kind(d, f"{cls.__name__} options", dict, "a dict of option -> value")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    subs = {name: sub for name, f in fields.items() for sub in [nested_default(f)] if sub is not None}
    d, parts = dict(d), {name: {} for name in subs}
    for key in [k for k in d if isinstance(k, str) and k.partition(".")[0] in subs and "." in k]:
        outer, _, inner = key.partition(".")
        parts[outer][inner] = d.pop(key)
    unknown = sorted(set(d) - set(fields), key=str)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; valid keys: {sorted(fields)}")
    for name, sub in subs.items():
        if parts[name] or isinstance(d.get(name), dict):
            base = d[name] if dataclasses.is_dataclass(d.get(name)) else sub
            given = {**(d[name] if isinstance(d.get(name), dict) else {}), **parts[name]}
            d[name] = nested(base, given, f"--{name}")
    return cls(**d)


def nested(base, given, label):
    """The nested config `base` with the fields in `given` replaced; an unknown field or a bad value is an error
    naming it as `label.field` (`--eval.max_turns must be a whole number >= 1, got 0`)."""
    names = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(given) - names, key=str)
    if unknown:
        raise ValueError(f"unknown {label} keys {unknown}; valid keys: {sorted(names)}")
    try:
        return dataclasses.replace(base, **given)
    except (TypeError, ValueError) as e:
        raise type(e)(str(e).replace(f"{type(base).__name__}.", f"{label}.")) from None


# ---- command lines -------------------------------------------------------------------------------------------------

def arg(check=parse_number, **kw):
    """An argparse `type=`: check(text, "", **kw) (default: a number, e.g. arg(lo=1, whole=True)). A TypeError /
    ValueError becomes argparse's error `argument --reps: must be a whole number >= 1, got '0'` (exit status 2)."""
    def convert(text):
        try:
            return check(text, "", **kw)
        except (TypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = getattr(check, "__name__", "value")
    return convert


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the one spelling of every command line here: an option is written as the field it sets, with
    underscores (`--max_steps 3`), a nested config's field with a dot (`--eval.max_turns 3`), a yes/no option as
    `--flag` or `--flag false`. The other spellings are read as these, with nothing declared twice: a dash in an
    option's name as an underscore (`--max-steps`), `--no_flag` / `--no-flag` as `--flag false`. An option is never
    abbreviated: `--eval.max_turn` is an error, not `--eval.max_turns`."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **{"allow_abbrev": False, **kw})

    def parse_known_args(self, args=None, namespace=None):
        args, out = list(sys.argv[1:] if args is None else args), []
        while args and args[0] != "--":                          # after a bare `--` every word is a value
            word = args.pop(0)
            if not word.startswith("--"):
                out.append(word)
                continue
            name, eq, value = word.partition("=")
            name = "--" + name[2:].replace("-", "_")
            flag = self._option_string_actions.get("--" + name[5:]) if name.startswith("--no_") else None
            if name not in self._option_string_actions and flag is not None and flag.nargs == "?":
                out += [flag.option_strings[0], "false"]
            else:
                out.append(name + eq + value)
        return super().parse_known_args(out + args, namespace)


def parse_value(text, name, typ):
    """A command-line value for a config field of type `typ` (`int`, `float`, `str`, `bool`, `int | None`): a bool is
    true / false (or 1 / 0, yes / no), an optional field takes `none`; ValueError naming `name` otherwise."""
    if typ.endswith(" | None") and text.lower() == "none":
        return None
    typ = typ.removesuffix(" | None")
    if typ == "bool":
        return parse_bool(text)
    if typ in ("int", "float"):
        try:
            return int(text) if typ == "int" else float(text)
        except ValueError:
            raise ValueError(_must(name, "a whole number" if typ == "int" else "a number", text)) from None
    return text


def config_options(cls):
    """(option name, field, default) of every command-line option of the config dataclass `cls`: its fields, and a
    nested config's fields as `name.field` with the nested default."""
    out = []
    for f in dataclasses.fields(cls):
        sub = nested_default(f)
        out += [(f"{f.name}.{g.name}", g, getattr(sub, g.name)) for g in dataclasses.fields(sub)] if sub is not None \
            else [(f.name, f, f.default)]
    return out


def parse_config(cls, argv=None, preset=None, description=""):
    """Fill the config dataclass `cls` from the command line, spelled as ArgumentParser says; `--help` lists every
    option with its help and default. An option not given keeps the dataclass default, or preset(given)[name] where
    the preset has it (the built-in default runs; its keys are option names). argparse rejects unknown options, the
    dataclass impossible values, each as argparse's one-line error (exit status 2)."""
    p = ArgumentParser(description=description, formatter_class=argparse.RawTextHelpFormatter,
                       usage="%(prog)s [--option value ...]")
    shown = preset({}) if preset else {}
    for name, f, default in config_options(cls):
        typ = f.type if isinstance(f.type, str) else f.type.__name__
        h = f"{f.metadata.get('help', '')} (default: {default!r}"
        h += f"; built-in default run: {shown[name]!r})" if name in shown else ")"
        if typ == "bool":
            p.add_argument(f"--{name}", nargs="?", const=True, type=arg(parse_value, typ=typ),
                           default=argparse.SUPPRESS, help=h, metavar="true|false")
        else:
            p.add_argument(f"--{name}", type=arg(parse_value, typ=typ), default=argparse.SUPPRESS, help=h,
                           metavar=name.upper())
    given = vars(p.parse_args(argv))
    try:
        return from_dict(cls, {**(preset(given) if preset else {}), **given})
    except (TypeError, ValueError) as e:
        p.error(str(e))


@contextlib.contextmanager
def one_line_errors(prog, *errors):
    """Run a command line's work so that an exception of the types `errors` (the user's: a file that does not load,
    an input that does not fit) ends it with the one line `prog: error: ...` and exit status 1, not a traceback."""
    try:
        yield
    except errors as e:
        raise SystemExit(f"{prog}: error: {e}") from None
