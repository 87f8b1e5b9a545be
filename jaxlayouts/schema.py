"""Declared knobs and the one checker of their values.

Every knob a user can set (a layout field, a run field, a bench option, a field of a model,
hardware or calibration file) is a dataclass field declared with :func:`knob`: its default, its
help text, its bounds or choices, and its key in the layout's text form. Flags, the text form,
result rows and file loading are derived from those declarations, and :func:`coerce` checks every
value against them: type, finiteness, range and choices, with a message that names the knob and
gives a valid value. Rules that tie several fields together stay beside the values they tie
(``layout.validate``).

This module imports no JAX (entry points validate before JAX starts).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import stat
import types
import typing

import yaml


class InvalidInput(ValueError):
    """Input that cannot work: a flag, a file or a field of one. ``knob`` names the flag (or the
    flag that names the file) to change; the message gives a valid alternative."""

    def __init__(self, knob: str, message: str):
        super().__init__(f"--{knob}: {message}")
        self.knob = knob


def knob(default, help: str, *, key: str | None = None, low: float | None = None,
         above: float | None = None, high: float | None = None, choices: tuple | None = None,
         noun: str = "value", example=None, written: str = "always"):
    """A declared field (``default`` may be ``dataclasses.MISSING``: a required one). ``low``/``high`` are inclusive bounds, ``above`` an exclusive lower one;
    ``key`` is the field's key in a layout's text form, ``written`` when: "always", "pipeline"
    (when pp > 1) or "changed" (when not the default, so older text forms still parse);
    ``example`` is the valid value an error message suggests (default: the default), ``noun`` what
    one choice is called in it ("unknown policy 'x'")."""
    if example is None:
        example = default if default is not dataclasses.MISSING else low
    meta = {"help": help, "key": key, "low": low, "above": above, "high": high, "choices": choices, "noun": noun,
            "example": example, "written": written}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=meta)
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def knobs(cls) -> list[dataclasses.Field]:
    """The declared fields of a dataclass, in declaration order."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def kind_of(cls, field: dataclasses.Field) -> tuple[type, bool]:
    """``(base type, None allowed)`` of a declared field, from its annotation."""
    hint = _hints(cls)[field.name]
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        base = [a for a in args if a is not type(None)]
        return base[0], type(None) in args
    return (typing.get_origin(hint) or hint), False


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def coerce(cls, field: dataclasses.Field, value, where: str = ""):
    """``value`` as ``field``'s type, checked against its declaration; raises :class:`InvalidInput`
    naming ``where`` (a file and field, or empty for a flag) and a valid value."""
    name, meta = field.name, field.metadata
    kind, optional = kind_of(cls, field)
    example = meta["example"]

    def bad(problem: str) -> InvalidInput:
        place = f"{where}{name} " if where else ""
        return InvalidInput(name, f"{place}{value!r} {problem}; e.g. {example}")

    if value is None:
        if optional:
            return None
        raise bad("is missing")
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE + _FALSE and not isinstance(value, float):
            return text in _TRUE
        raise bad("is not true or false")
    if kind is int:
        number = _integer(value)
        if number is None:
            raise bad("is not an integer")
        if abs(number) > MAX_INTEGER:
            raise InvalidInput(name, f"{where}{name + ' ' if where else ''}{_short(value)} does not fit in a "
                               f"signed 64-bit integer (at most {MAX_INTEGER:,}); e.g. {example}")
        value = number
    elif kind is float:
        if isinstance(value, bool):
            raise bad("is not a number")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise bad("is not a number") from None
        if not math.isfinite(value):
            raise bad("is not a finite number")
    elif kind is str:
        if not isinstance(value, str):
            raise bad("is not text")
    elif kind in (dict, list) and not isinstance(value, kind):
        raise bad("is not a mapping" if kind is dict else "is not a list")
    if meta["choices"] is not None and value not in meta["choices"]:
        place = f"{where}{name}: " if where else ""
        raise InvalidInput(name, f"{place}unknown {meta['noun']} {value!r}; choose one of "
                           f"{', '.join(map(str, meta['choices']))}")
    if meta["low"] is not None and value < meta["low"]:
        raise bad(f"is below the least allowed value {meta['low']:,}")
    if meta["above"] is not None and value <= meta["above"]:
        raise bad(f"must be greater than {meta['above']:,}")
    if meta["high"] is not None and value > meta["high"]:
        raise bad(f"is above the largest allowed value {meta['high']:,}")
    return value


MAX_INTEGER = 2**63 - 1
"""The largest integer any knob takes (JAX's seeds and XLA's sizes are signed 64-bit)."""


def _short(value) -> str:
    text = repr(value) if isinstance(value, str) else str(value) if not isinstance(value, int) else (
        f"{value}" if abs(value) < 10**30 else f"an integer of {len(str(abs(value)))} digits")
    return text if len(text) <= 60 else text[:40] + f"... ({len(text)} characters)"


def _integer(value) -> int | None:
    """``value`` as an exact integer (``8``, ``"8"``, ``8.0``, ``"1e3"``), else None. Text of more
    than 30 digits reads as a number of that many digits (only its size matters past 64 bits:
    Python refuses to convert more than 4,300)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    text = value.strip() if isinstance(value, str) else None
    if text is not None and text.isascii() and (sign := text[:1] in "+-") < len(text) and text[sign:].isdigit():
        return int(text[:sign + 30])  # 30 digits: past 64 bits, which coerce refuses
    try:
        number = float(text if text is not None and text.isascii() else value)
    except (TypeError, ValueError):
        return None
    return int(number) if math.isfinite(number) and number.is_integer() else None


def checked(cls, values: dict, where: str = "") -> dict:
    """Every declared field of ``cls`` present in ``values``, coerced and checked."""
    by_name = {f.name: f for f in knobs(cls)}
    return {name: coerce(cls, by_name[name], value, where) if name in by_name else value
            for name, value in values.items()}


def check_instance(obj, knob_name: str | None = None, where: str = "") -> None:
    """Check every declared field of a dataclass instance; a bad one raises :class:`InvalidInput`
    for its own flag, or for ``knob_name`` (naming ``where`` and the field) when it came from a file."""
    for field in knobs(type(obj)):
        try:
            coerce(type(obj), field, getattr(obj, field.name), where if knob_name else "")
        except InvalidInput as error:
            if knob_name is None:
                raise
            raise InvalidInput(knob_name, str(error).split(": ", 1)[1]) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a mapping that repeats a key is an error (YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value
                if key.tag != "tag:yaml.org,2002:merge"]  # keys written here; '<<' merges may be overridden
        repeated = sorted({str(k) for k in keys if keys.count(k) > 1})
        if repeated:
            raise yaml.constructor.ConstructorError(None, None, f"repeated keys {repeated}", node.start_mark)
        return super().construct_mapping(node, deep=deep)


def creatable(path: pathlib.Path) -> bool:
    """Whether ``path`` can be written: it exists and is writable, or its nearest existing
    ancestor is a writable folder (the missing folders can be made)."""
    path = path.resolve()
    if path.exists():
        return os.access(path, os.W_OK)
    while not path.exists():
        path = path.parent
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


MAX_INPUT_BYTES = 256 * 2**20
"""The largest input file read (a results file of a million rows is about a quarter of it)."""


def special_file(path) -> str | None:
    """What ``path`` is when it exists but is neither a regular file nor a folder (a device such as
    /dev/zero, a FIFO, a socket; links followed), else None. Such a file never ends, or never
    opens, or swallows what is written: every entry point refuses it before any work."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file")
    link = f" (a link to {os.path.realpath(path)})" if os.path.islink(path) else ""
    return f"{kind}{link}"


def refuse_special(path, knob_name: str, example: str) -> None:
    """:class:`InvalidInput` for ``knob_name`` when ``path`` is a device, FIFO or socket."""
    kind = special_file(path)
    if kind:
        raise InvalidInput(knob_name, f"{path} is {kind}, not a regular file or folder; give one, e.g. "
                           f"--{knob_name} {example}")


def read_input(path, knob_name: str, limit: int = MAX_INPUT_BYTES) -> bytes:
    """A regular file's bytes, read with a bound: a device, FIFO or socket, or a file over
    ``limit`` bytes, is :class:`InvalidInput` for ``knob_name``; other failures (missing, a
    folder, no permission) raise OSError for the caller to word."""
    path = pathlib.Path(path)
    refuse_special(path, knob_name, "FILE")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO swapped in since the check does not block
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(21, "Is a directory", str(path))
        if not stat.S_ISREG(info.st_mode):
            raise InvalidInput(knob_name, f"{path} is not a regular file; give one")
        if info.st_size > limit:
            raise InvalidInput(knob_name, f"{path} is {info.st_size:,} bytes, more than the {limit:,} an input "
                               "file may have; give a smaller file (split the results)")
        chunks, left = [], limit + 1
        while left > 0 and (chunk := os.read(fd, min(left, 2**20))):
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise InvalidInput(knob_name, f"{path} grew past {limit:,} bytes while being read; give a finished file")
    return data


MAX_YAML_NODES = 100_000
MAX_NESTING = 64
"""Bounds on what an input file may expand to: YAML nodes with every alias expanded (a
"billion laughs" file is a few lines), and nesting depth of YAML and JSON values."""


def _check_expansion(root) -> None:
    """Refuse a YAML document that expands (aliases counted each time they are used) past
    ``MAX_YAML_NODES`` nodes, nests deeper than ``MAX_NESTING`` or refers to itself; linear in the
    document's size (sizes are memoised per node)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node, depth: int) -> int:
        if depth > MAX_NESTING:
            raise InvalidInput("yaml", f"nested deeper than {MAX_NESTING} levels; flatten it")
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise InvalidInput("yaml", "an alias refers to a value that contains it; write the value out")
        open_nodes.add(id(node))
        children = (node.value if isinstance(node, yaml.SequenceNode) else
                    [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
        total = 1 + sum(size(child, depth + 1) for child in children)
        open_nodes.discard(id(node))
        if total > MAX_YAML_NODES:
            raise InvalidInput("yaml", f"expands to more than {MAX_YAML_NODES:,} values (aliases counted "
                               "each time they are used); write a smaller file")
        sizes[id(node)] = total
        return total

    if root is not None:
        size(root, 0)


def json_value(text: str | bytes):
    """``json.loads(text)``, but a value nested deeper than ``MAX_NESTING`` levels is a ValueError
    (not a JSONDecodeError, which readers take for a torn line; not a RecursionError)."""
    try:
        value = json.loads(text)
    except RecursionError:
        value = None
        deep = True
    else:
        deep = _depth(value) > MAX_NESTING
    if deep:
        raise ValueError(f"a JSON value nested deeper than {MAX_NESTING} levels")
    return value


def _depth(value, depth: int = 0) -> int:
    if depth > MAX_NESTING:
        return depth
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return max((_depth(child, depth + 1) for child in children), default=depth)


def load_yaml(path: pathlib.Path, knob_name: str, empty_ok: bool = False) -> dict:
    """A YAML file's top-level mapping (``{}`` for an empty file where ``empty_ok``); anything else
    (repeated keys too) is :class:`InvalidInput` for ``knob_name``."""
    try:
        loader = _UniqueKeyLoader(read_input(path, knob_name).decode())
        try:
            node = loader.get_single_node()
            _check_expansion(node)
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, yaml.YAMLError) as error:
        if isinstance(error, InvalidInput) and error.knob == knob_name:
            raise
        if isinstance(error, InvalidInput):
            raise InvalidInput(knob_name, f"{path}: {str(error).split(': ', 1)[1]}") from None
        if "integer string conversion" in str(error):  # Python's own bound on integer text
            raise InvalidInput(knob_name, f"{path}: an integer of more than 4,300 digits; sizes are "
                               f"at most {MAX_INTEGER:,}") from None
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InvalidInput(knob_name, f"{path}: cannot read it as YAML ({first})") from None
    if data is None and empty_ok:
        return {}
    if not isinstance(data, dict):
        raise InvalidInput(knob_name, f"{path}: expected a mapping of field: value, found "
                           f"{type(data).__name__}")
    return data


def from_mapping(cls, data: dict, path: pathlib.Path, knob_name: str, **fixed):
    """Build ``cls`` from a file's mapping: unknown fields, missing required fields (those without
    a default) and bad values are :class:`InvalidInput` for ``knob_name``, naming the file and field."""
    declared = [f.name for f in knobs(cls)]
    unknown = sorted(set(map(str, data)) - set(declared))
    if unknown:
        raise InvalidInput(knob_name, f"{path}: unknown fields {unknown}; the fields are {declared}")
    missing = [f.name for f in knobs(cls) if f.name not in data and f.name not in fixed
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise InvalidInput(knob_name, f"{path}: missing fields {missing}; the fields are {declared}")
    try:
        values = checked(cls, data, where=f"{path}: ")
    except InvalidInput as error:
        raise InvalidInput(knob_name, str(error).split(": ", 1)[1]) from None
    return cls(**values, **fixed)


def finite_json(value):
    """``value`` with every NaN or infinity replaced by None: JSON has neither, and a figure
    that does not exist (a rank correlation of one run) is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_json(v) for v in value]
    return value
