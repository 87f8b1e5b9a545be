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
import math
import os
import pathlib
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


def _integer(value) -> int | None:
    """``value`` as an exact integer (``8``, ``"8"``, ``8.0``, ``"1e3"``), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    text = value.strip() if isinstance(value, str) else None
    if text is not None and text.isascii() and text.lstrip("+-").isdigit():
        return int(text)
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


def load_yaml(path: pathlib.Path, knob_name: str, empty_ok: bool = False) -> dict:
    """A YAML file's top-level mapping (``{}`` for an empty file where ``empty_ok``); anything else
    (repeated keys too) is :class:`InvalidInput` for ``knob_name``."""
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
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
