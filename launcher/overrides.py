"""A config made from a recipe's defaults, the command line, a --config file and a run's own config.

Overrides from the command line or a --config file (YAML or JSON) are checked against the fields
of launcher/config.py: unknown names get close matches, wrong types name the field and the type
expected (`apply_overrides`, `coerce`). A field's help is read from its source line
(`field_help`), and `variant` makes a recipe's config with other defaults.

A run's own config: resuming, `evaluate` and `predict` take every field not given on the command
line from the config the run saved (`inherit`), except the PER_COMMAND ones. On a resume, a given
field that changes the result and differs from the checkpoint's is refused (`result_changes`); the
RESULT_NEUTRAL fields apply freely.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import sys
import types
import typing
from typing import Any, Literal

from launcher.config import (
    CheckpointFields,
    ConfigError,
    ParallelFields,
    TrackingFields,
    TrainConfig,
    type_name,
)

# The fields that leave the weights at a given step as they are (up to rounding): where the run
# writes, when it stops, checkpoints and picks the best, what it logs and where, how it is spread
# over processes, data loading, kernels. A resume applies them freely. Every other field, a
# recipe's own included, changes the result: a resume that gives one another value than the
# checkpoint's is refused unless --resume_changes=allow.
RESULT_NEUTRAL = frozenset(
    {
        "output_dir",
        "max_steps",
        "resume",
        "resume_changes",
        "deterministic",
        "trace_samples",
        "hang_timeout_s",
        "eval_batch_size",
        "num_workers",
        "prefetch_factor",
        "persistent_workers",
        "pin_memory",
        "max_corrupt_fraction",
        *CheckpointFields.__dataclass_fields__,
        *TrackingFields.__dataclass_fields__,
        *ParallelFields.__dataclass_fields__,
        "channels_last",
        "compile",
        "cudnn_benchmark",
    }
)
# What this command does rather than what the run is: never taken from a run's saved config (a
# resume of a run stopped by --max_steps goes on to its end).
PER_COMMAND = frozenset({"output_dir", "resume", "resume_changes", "max_steps"})


def read_config_file(path: str) -> dict[str, Any]:
    """A --config file's {field: value}: JSON for a .json file (a run's config.json), else YAML
    (with YAML 1.2's floats: `lr: 1e-3` is a number)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as error:
        raise ConfigError(
            f"--config={path} cannot be read ({error.strerror}); pass a YAML or JSON file"
        ) from None
    try:
        if path.endswith(".json"):
            import json

            values = json.loads(text)
        else:
            values = _yaml_load(text)
    except ValueError as error:  # json.JSONDecodeError and yaml.YAMLError (both ValueErrors, see _yaml_load)
        problem = " ".join(str(error).split())
        raise ConfigError(
            f"--config={path} does not parse ({problem}); write one `field: value` per line"
        ) from None
    if values is None:
        return {}
    if not isinstance(values, dict) or not all(isinstance(key, str) for key in values):
        raise ConfigError(
            f"--config={path} holds a {type(values).__name__}, not a mapping of field names to "
            "values; write one `field: value` per line"
        )
    return values


def _yaml_load(text: str) -> Any:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(
            r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
            r"|\.(?:inf|Inf|INF))$|^\.(?:nan|NaN|NAN)$"
        ),
        list("-+0123456789."),
    )
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{getattr(error, 'problem', None) or error}{where}") from None


def inherit(
    config: TrainConfig, saved: dict[str, Any], given: set[str] | frozenset[str], origin: str
) -> tuple[TrainConfig, str]:
    """`config` with each field that is not `given` (and not PER_COMMAND) taken from `saved`, a
    run's config; and a note naming the saved fields this Config lacks (ignored: no code of the
    recipe reads them, and a field renamed since should not lock a run out)."""
    hints = typing.get_type_hints(type(config))
    changes, unknown = {}, []
    for name, value in saved.items():
        if name == "recipe" or name in given or name in PER_COMMAND:
            continue
        if name not in hints or name not in config.__dataclass_fields__:
            unknown.append(name)
            continue
        try:
            changes[name] = coerce(name, value, hints[name])
        except ConfigError:
            raise ConfigError(
                f"{origin} has {name}={value!r}, which --{name} does not take ({type_name(hints[name])}); "
                f"pass --{name}"
            ) from None
    updated = dataclasses.replace(config, **changes)
    updated.validate()
    note = (
        f"note: {origin} has fields that {type(config).__module__}.{type(config).__name__} lacks, ignored: "
        f"{', '.join(unknown)}"
        if unknown
        else ""
    )
    return updated, note


def changed_fields(config: TrainConfig, saved: dict[str, Any], names) -> list[tuple[str, Any, Any]]:
    """(name, value in `config`, value in `saved`) for each of `names` whose values differ; a field
    `saved` lacks (added to the recipe since) is not compared."""
    hints = typing.get_type_hints(type(config))
    changed = []
    for name in names:
        if name not in saved or name not in hints or name not in config.__dataclass_fields__:
            continue
        try:
            then = coerce(name, saved[name], hints[name])
        except ConfigError:
            then = saved[name]
        if getattr(config, name) != then:
            changed.append((name, getattr(config, name), then))
    return changed


def result_changes(config: TrainConfig, saved: dict[str, Any], names=None) -> list[tuple[str, Any, Any]]:
    """`changed_fields` among `names` (default: all) that change the result: the recipe's own first."""
    names = [f.name for f in dataclasses.fields(config)] if names is None else list(names)
    shared = TrainConfig.__dataclass_fields__
    ordered = [n for n in names if n not in shared] + [n for n in names if n in shared]
    return changed_fields(config, saved, [n for n in ordered if n not in RESULT_NEUTRAL])


def shown(value: Any) -> str:
    """A field's value as it would be typed after --name=."""
    if isinstance(value, (tuple, list)):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value) if value != "" else "''"


FIELD_LINE = re.compile(r"\s+(\w+)\s*:[^#]*(?:#\s*(.+))?$")  # `name: type = default  # help`
HELP_LINE = re.compile(r"\s*#:\s?(.*)$")  # a help too long for its field's line, above it (Sphinx's `#:`)


def field_help(config_cls: type) -> dict[str, str]:
    """Field name -> its help, from the class and its bases: the `# comment` ending the field's line, or
    else the `#:` lines right above the field (a help too long for the line, which ruff format would
    move off the field's line)."""
    helps: dict[str, str] = {}
    for klass in reversed(config_cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        above: list[str] = []
        for line in lines:
            help_line, field = HELP_LINE.match(line), FIELD_LINE.match(line)
            if help_line:
                above.append(help_line.group(1).strip())
                continue
            if field and (field.group(2) or above):
                helps[field.group(1)] = (field.group(2) or " ".join(above)).strip()
            above = []
    return helps


def apply_overrides(config: TrainConfig, overrides: dict[str, Any], source: str = "") -> TrainConfig:
    """Return a copy of `config` with CLI values applied, each checked against its field type;
    `source`: the file they come from (--config), named in the errors."""
    hints = typing.get_type_hints(type(config))
    known = [f.name for f in dataclasses.fields(config)]
    changes = {}
    dash = "" if source else "--"
    for key, value in overrides.items():
        name = key.replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = (
                f"did you mean {', '.join(dash + c for c in close)}?"
                if close
                else ("see the fields with --help")
            )
            raise ConfigError(
                f"{source + ': ' if source else ''}unknown field {dash}{name} for "
                f"{type(config).__module__}; {hint}"
            )
        try:
            changes[name] = coerce(name, value, hints[name])
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}" if source else str(error)) from None
    updated = dataclasses.replace(config, **changes)
    updated.validate()
    return updated


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert a value parsed by fire to the field's type, or raise ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    wrong = ConfigError(f"--{name} expects {type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(name, value, option)
            except ConfigError:
                pass
        raise wrong
    if origin is Literal:
        text = str(value)
        if text in [str(a) for a in args]:
            return next(a for a in args if str(a) == text)
        raise wrong
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).lower() in _TRUE | _FALSE:
            return str(value).lower() in _TRUE
        raise wrong
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise wrong
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise wrong
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise wrong
    if origin in (tuple, list):
        items = value if isinstance(value, (tuple, list)) else (value,)
        item_type = args[0] if args else Any
        converted = [coerce(name, item, item_type) for item in items]
        return origin(converted)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise wrong


def variant(config_cls: type, **defaults) -> type:
    """A subclass of a recipe's Config with other defaults: how tiny and debug variants are made."""
    hints = typing.get_type_hints(config_cls)
    unknown = [name for name in defaults if name not in hints]
    if unknown:
        raise ConfigError(f"variant of {config_cls.__name__}: unknown fields {', '.join(unknown)}")
    fields = [(name, hints[name], dataclasses.field(default=value)) for name, value in defaults.items()]
    cls = dataclasses.make_dataclass(config_cls.__name__, fields, bases=(config_cls,))
    cls.__module__ = sys._getframe(1).f_globals.get("__name__", config_cls.__module__)
    return cls
