"""Strict loading of nested ``@dataclass`` configs from YAML plus command-line overrides.

A training run is described by a tree of plain dataclasses (sections), filled from three layers in increasing priority:
the dataclass defaults, a YAML file, and ``--section.key=value`` overrides. The loader is deliberately strict: a typo
in a key or a value of the wrong type stops the run before any GPU time is spent, with a message naming the full dotted
key and what would have been accepted, instead of being silently ignored (the classic nanoGPT-configurator failure).

Values are checked against the field type hints (``int``, ``float``, ``bool``, ``str``, ``Optional``/``X | None``,
``Literal``, ``list[T]``, ``tuple[T, ...]``, ``dict[str, T]``, nested dataclasses). Sections are built by calling the
dataclass constructor, so ``__post_init__`` validation runs. ``save_config`` writes the resolved tree back to YAML so a
run folder records exactly what ran, and ``load_config(cls, saved, [])`` gives the same object back.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal, TypeVar, Union

import yaml

__all__ = [
    "ConfigError",
    "config_from_dict",
    "config_to_dict",
    "describe_keys",
    "leaf_values",
    "load_config",
    "parse_override",
    "save_config",
]

T = TypeVar("T")

_NONE_WORDS = ("none", "null", "~")
_TRUE_WORDS = ("true", "1", "yes", "on")
_FALSE_WORDS = ("false", "0", "no", "off")


class ConfigError(ValueError):
    """A config file or override does not fit the dataclass tree (unknown key, wrong type, failed validation)."""


def load_config(cls: type[T], yaml_path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from its defaults, then the YAML file at ``yaml_path`` (if any), then CLI ``overrides``.

    Overrides look like ``--optim.lr=3e-4``, ``--seed=1`` or ``optim.lr=3e-4``; they are applied to the raw YAML tree
    before type checking, so a CLI value always beats the file, which always beats the default.
    """
    raw: dict[str, Any] = {}
    if yaml_path is not None:
        loaded = read_yaml(yaml_path)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"YAML config {os.fspath(yaml_path)!r} must be a mapping of keys to values at top level, "
                f"got {type(loaded).__name__}"
            )
        raw = loaded
    given: dict[str, str] = {}
    for arg in overrides:
        dotted, text = parse_override(arg)
        if dotted in given:  # the last would win unseen; a script that appends overrides must mean one of them
            raise ConfigError(f"--{dotted} is given twice ({given[dotted]!r} and {text!r}); give it once")
        given[dotted] = text
        _apply_override(cls, raw, dotted, text)
    return config_from_dict(cls, raw)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load silently keeps the last of two equal keys in a mapping; a config holding a key twice is refused
    (one of the two values would be ignored)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges, it is not a key of its own
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"key {key!r} appears twice in one mapping (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """The YAML document at `path`; ConfigError naming the file when it is not a readable UTF-8 YAML file."""
    name = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.load(f, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except (OSError, UnicodeDecodeError) as e:  # missing, a folder, no permission, not text
        raise ConfigError(f"cannot read YAML config {name!r}: {e}") from e
    except ConfigError as e:
        raise ConfigError(f"YAML config {name!r}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"could not parse YAML config {name!r}: {e}") from e


def parse_override(arg: str) -> tuple[str, str]:
    """Split ``--section.key=value`` (dashes optional) into ``("section.key", "value")``; the value stays raw text."""
    body = arg[2:] if arg.startswith("--") else arg
    key, sep, value = body.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"bad override {arg!r}: expected the form --section.key=value (or section.key=value)")
    return key, value


def config_from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build the dataclass tree ``cls`` from plain nested mappings, checking keys and types at every depth."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"config_from_dict needs a dataclass type, got {cls!r}")
    return typing.cast(T, _build_dataclass(cls, data, ""))


def config_to_dict(obj: Any) -> Any:
    """Turn a dataclass tree into plain dicts/lists/scalars that ``yaml.safe_dump`` accepts (tuples become lists).

    Only ``init=True`` fields are written, because those are the only ones ``load_config`` accepts back.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: config_to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, Mapping):
        return {k: config_to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [config_to_dict(v) for v in obj]
    return obj


def save_config(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML (parent folders created; written to a temp file then renamed, so a crash
    mid-write never leaves a half config in a run folder)."""
    if not (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        raise TypeError(f"save_config needs a dataclass instance, got {type(obj).__name__}")
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(config_to_dict(obj), f, sort_keys=False, allow_unicode=True)
    os.replace(tmp, path)


def describe_keys(obj: Any, prefix: str = "") -> list[str]:
    """One line per leaf key of a config object, dotted under its sections: ``key  (type; default value)``."""
    return [
        f"{key}  ({_type_name(hint)}; default {config_to_dict(value)!r})" for key, hint, value in _leaves(obj, prefix)
    ]


def leaf_values(obj: Any) -> dict[str, Any]:
    """Every leaf key of a config object, dotted under its sections, with its plain value (as ``config_to_dict``
    writes it; a mapping-valued field is one value)."""
    return {key: config_to_dict(value) for key, _, value in _leaves(obj, "")}


def _leaves(obj: Any, prefix: str) -> Iterator[tuple[str, Any, Any]]:
    """(dotted key, type hint, value) of every leaf of a config object, in field order."""
    hints = _hints(type(obj))
    for name in _init_fields(type(obj)):
        key, value = _join(prefix, name), getattr(obj, name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, key)
        else:
            yield key, hints[name], value


# ----------------------------------------------------------------------------------------------------- internals


def _init_fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _hints(cls: type) -> dict[str, Any]:
    # get_type_hints resolves string annotations (`from __future__ import annotations` in the user's module).
    try:
        return typing.get_type_hints(cls)
    except NameError as e:
        raise TypeError(
            f"cannot resolve the type hints of config class {cls.__qualname__}: {e} "
            "(config dataclasses must be defined at module level when their annotations are strings)"
        ) from e


def _section_label(prefix: str) -> str:
    return f"in '{prefix}'" if prefix else "at top level"


def _unknown_key_error(dotted: str, prefix: str, allowed: Sequence[str]) -> ConfigError:
    name = dotted.rsplit(".", 1)[-1]
    msg = f"unknown config key '{dotted}'; allowed keys {_section_label(prefix)}: {sorted(allowed)}"
    close = difflib.get_close_matches(name, list(allowed), n=1)
    if close:
        msg += f" (did you mean '{_join(prefix, close[0])}'?)"
    return ConfigError(msg)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); a union of several non-None types stays a union."""
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) == 1:
            return args[0], optional
        return Union[tuple(args)], optional  # noqa: UP007 - building a union from a runtime tuple
    return tp, False


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is not None:
        args = typing.get_args(tp)
        name = getattr(origin, "__name__", str(origin))
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return f"tuple[{_type_name(args[0])}, ...]"
        return f"{name}[{', '.join(_type_name(a) for a in args)}]" if args else name
    return getattr(tp, "__name__", repr(tp))


def _wrong_type(key: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build_dataclass(cls: type, data: Any, prefix: str) -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        what = f"section '{prefix}'" if prefix else "the top level of the config"
        raise ConfigError(f"{what} must be a mapping of keys ({sorted(_init_fields(cls))}), got {data!r}")
    fields = _init_fields(cls)
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        dotted = _join(prefix, str(name))
        if name not in fields:
            raise _unknown_key_error(dotted, prefix, list(fields))
        kwargs[name] = _coerce(value, hints[name], dotted)
    missing = [
        _join(prefix, n)
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required config key(s) {missing} (no default; set them in YAML or on the CLI)")
    try:
        return cls(**kwargs)
    except ValueError as e:  # raised by the user's __post_init__ validation
        raise ConfigError(f"invalid config {_section_label(prefix)}: {e}") from e


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the type hint ``tp`` and convert where lossless (int -> float, list -> tuple)."""
    if tp is Any:
        return value
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _wrong_type(key, tp, value)
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _coerce(value, non_none[0], key)
        for arg in non_none:
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise _wrong_type(key, tp, value)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        # `type(a) is type(value)` keeps True from matching a Literal[1] choice and 1 from matching Literal[True].
        for choice in args:
            if choice == value and type(choice) is type(value):
                return choice
        raise ConfigError(f"config key '{key}' must be one of {list(args)}, got {value!r}")
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _wrong_type(key, tp, value)
        container = origin or tp
        if not args:
            items = list(value)
        elif container is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(
                    f"config key '{key}' expects {_type_name(tp)} ({len(args)} items), got {len(value)}: {value!r}"
                )
            items = [_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            items = [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if container is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _wrong_type(key, tp, value)
        key_tp, val_tp = args if args else (Any, Any)
        return {_coerce(k, key_tp, f"{key}.<key>"): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _wrong_type(key, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _wrong_type(key, tp, value)
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            # PyYAML follows YAML 1.1, where `1e-4` (no dot) is a *string*; accepting it here avoids the classic
            # "lr: 1e-4 is not a float" surprise without loosening anything else.
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise _wrong_type(key, tp, value)
        if not math.isfinite(number):  # NaN passes every range check (all its comparisons are false)
            raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(
            f"config key '{key}' expects str, got {type(value).__name__} {value!r} (quote it in YAML to keep it text)"
        )
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _wrong_type(key, tp, value)
    raise ConfigError(f"config key '{key}' has a type hint this loader does not support: {tp!r}")


def _descend(cls: type, dotted: str) -> Any:
    """Check that ``dotted`` names a settable key of ``cls`` and return its type hint."""
    parts = dotted.split(".")
    tp: Any = cls
    prefix = ""
    for i, part in enumerate(parts):
        inner, _ = _strip_optional(tp)
        if isinstance(inner, type) and dataclasses.is_dataclass(inner):
            fields = _init_fields(inner)
            if part not in fields:
                raise _unknown_key_error(_join(prefix, part), prefix, list(fields))
            tp = _hints(inner)[part]
        elif typing.get_origin(inner) is dict or inner is dict:
            dict_args = typing.get_args(inner)
            tp = dict_args[1] if dict_args else Any
        else:
            raise ConfigError(
                f"cannot set '{dotted}': '{prefix}' holds a value of type {_type_name(tp)}, not a section "
                f"(set it as --{prefix}=VALUE instead)"
            )
        prefix = ".".join(parts[: i + 1])
    return tp


def _parse_cli_value(text: str, tp: Any, key: str) -> Any:
    """Turn raw CLI text into a value for a field of type ``tp`` (strings stay raw, the rest goes through YAML)."""
    core, optional = _strip_optional(tp)
    if optional and text.strip().lower() in _NONE_WORDS:
        return None
    if core is str:
        return text
    if core is bool:
        word = text.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
        raise ConfigError(
            f"config key '{key}' expects bool, got {text!r}; use one of {list(_TRUE_WORDS + _FALSE_WORDS)}"
        )
    if typing.get_origin(core) is Literal and text in [a for a in typing.get_args(core) if isinstance(a, str)]:
        return text  # keep e.g. Literal["1", "2"] choices as text, not YAML ints
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"could not parse the CLI value for '{key}' ({text!r}) as YAML: {e}") from e


def _apply_override(cls: type, raw: dict[str, Any], dotted: str, text: str) -> None:
    tp = _descend(cls, dotted)
    value = _parse_cli_value(text, tp, dotted)
    parts = dotted.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"cannot apply override '{dotted}': the YAML sets section '{where}' to {child!r}")
        node = child
    last = parts[-1]
    inner, _ = _strip_optional(tp)
    is_section = isinstance(inner, type) and dataclasses.is_dataclass(inner)
    if is_section and isinstance(value, dict) and isinstance(node.get(last), dict):
        node[last] = {**node[last], **value}  # a mapping given for a whole section updates it key by key
    else:
        node[last] = value  # any other value replaces, a mapping-valued field's too (data.toyworld_caption_mix)
