"""Typed configuration: dataclasses loaded from YAML/dicts with errors that name the bad key.

Every FLAD config (fleet, training, world, ...) is a dataclass; `from_dict` walks its type hints so
a wrong key, type or value is reported as e.g. `fleet.vehicles[2].profile.tflops: expected a number,
got 'fast'` rather than failing deep inside the code that uses it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is missing, unknown, or of the wrong type; `key` is its dotted path."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}" if key else reason)
        self.key = key
        self.reason = reason


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _convert(value: Any, hint: Any, key: str) -> Any:
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        return _convert_union(value, get_args(hint), key)
    if origin is typing.Literal:
        return _convert_literal(value, get_args(hint), key)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key)
    if origin in (list, tuple) or hint in (list, tuple):
        return _convert_sequence(value, origin, get_args(hint), key)
    if origin is dict or hint is dict:
        return _convert_mapping(value, get_args(hint), key)
    return _convert_scalar(value, hint, key)


def _convert_union(value: Any, args: tuple[Any, ...], key: str) -> Any:
    """The first member type that takes `value` (None for an Optional), else every member's reason."""
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _convert(value, arg, key)
        except ConfigError as exc:
            errors.append(exc.reason)
    raise ConfigError(key, "; ".join(errors))


def _convert_literal(value: Any, allowed: tuple[Any, ...], key: str) -> Any:
    if value not in allowed:
        raise ConfigError(key, f"must be one of {list(allowed)}, got {_describe(value)}")
    return value


def _convert_sequence(value: Any, origin: Any, args: tuple[Any, ...], key: str) -> Any:
    """A list, a tuple of fixed length and item types (`tuple[int, str]`), or a homogeneous one (`tuple[int, ...]`)."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(key, f"expected a list, got {_describe(value)}")
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(args) != len(value):
            raise ConfigError(key, f"expected {len(args)} items, got {len(value)}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=False)))
    item = args[0] if args else Any
    items = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _convert_mapping(value: Any, args: tuple[Any, ...], key: str) -> Any:
    if not isinstance(value, dict):
        raise ConfigError(key, f"expected a mapping, got {_describe(value)}")
    kt, vt = args or (Any, Any)
    return {_convert(k, kt, f"{key}.<key>"): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}


def _is_number(value: Any, kinds: type | tuple[type, ...]) -> bool:
    return not isinstance(value, bool) and isinstance(value, kinds)


#: scalar type -> (does it take the value, what the error says was expected, the converted value)
_SCALARS: tuple[tuple[type, Callable[[Any], bool], str, Callable[[Any], Any]], ...] = (
    (bool, lambda v: isinstance(v, bool), "true/false", lambda v: v),
    (int, lambda v: _is_number(v, int), "an integer", lambda v: v),
    (float, lambda v: _is_number(v, (int, float)), "a number", float),
    (str, lambda v: isinstance(v, str), "a string", lambda v: v),
    (Path, lambda v: isinstance(v, (str, Path)), "a path", Path),
)


def _convert_scalar(value: Any, hint: Any, key: str) -> Any:
    """bool, int, float, str and Path are checked (an int is not a bool; a float takes an int); others pass."""
    for kind, takes, expected, convert in _SCALARS:
        if hint is kind:
            if not takes(value):
                raise ConfigError(key, f"expected {expected}, got {_describe(value)}")
            return convert(value)
    return value


def from_dict(cls: type[T], data: Any, key: str = "") -> T:
    """Build dataclass `cls` from a mapping, checking keys and types recursively.

    After construction, a `validate()` method on the dataclass (if any) is called; it should raise
    ConfigError (or ValueError, which is re-raised as ConfigError on this key) for bad values.
    """
    name = key or cls.__name__
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(name, f"expected a mapping, got {_describe(data)}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(str(k) for k in set(data) - set(fields))
    if unknown:
        bad = unknown[0] or '""'
        raise ConfigError(f"{key}.{bad}" if key else bad, f"unknown key (allowed: {', '.join(sorted(fields))})")
    kwargs = {}
    for fname, f in fields.items():
        sub = f"{key}.{fname}" if key else fname
        if fname in data:
            kwargs[fname] = _convert(data[fname], hints[fname], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(sub, "required key is missing")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as exc:
            if key and not exc.key.startswith(key):
                raise ConfigError(f"{key}.{exc.key}" if exc.key else key, exc.reason) from exc
            raise
        except ValueError as exc:
            raise ConfigError(name, str(exc)) from exc
    return obj


def load_yaml(cls: type[T], path: str | Path) -> T:
    """Load dataclass `cls` from a YAML file; errors name the file and the bad key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError("", f"config file not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{path}: invalid YAML: {exc}") from exc
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(exc.key, f"{exc.reason} (in {path})") from exc


def to_dict(obj: Any) -> Any:
    """Plain-data view of a config dataclass (for writing `runs/<id>/config.yaml`)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj
