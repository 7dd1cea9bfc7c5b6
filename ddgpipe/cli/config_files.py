"""Settings from a file (``--config``) or a run's own ``config.json`` (``--resume``), under
the flags typed beside them; ``--print-config``'s TOML.

The keys are the ``train`` parser's destinations, which are ``TrainConfig``'s flat keys
(``config.json``'s): the parser is the one table of settings, so a new flag is a new key.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as the package it came from (a dependency there)
    import tomli as tomllib  # type: ignore[import-not-found]

from ddgpipe.cli.options import PRESETS, int_list, str_list
from ddgpipe.errors import UsageError

__all__ = ["with_file_settings", "check_resume_changes", "toml_text", "setting_flags"]

# destinations of the parser that are not settings
NOT_SETTINGS = ("help", "config_file", "print_config")
# what a run records in config.json beyond its settings (read, and skipped)
RECORDED = ("num_blocks", "split_tuning", "stage_devices", "threads_per_stage", "machine",
            "data_info", "parameters")
# settings of the command that resumes, never inherited from the saved run
OWN_TO_THE_RESUME = ("out", "resume", "overwrite", "stop_after", "progress")
# what flags beside --resume may change: the numbers stay those of the saved run (the
# executors agree bitwise; a timeline, a label and the peer timeout only watch or name it)
SAFE_ON_RESUME = (*OWN_TO_THE_RESUME, "iterations", "epochs", "eval_every",
                  "checkpoint_every", "checkpoint_every_epochs", "log_every", "log",
                  "executor", "timeline", "label", "timeout_s")
GROW_ONLY = ("iterations", "epochs")


def with_file_settings(parser: argparse.ArgumentParser, train: argparse.ArgumentParser,
                       argv: Sequence[str] | None,
                       args: argparse.Namespace) -> argparse.Namespace:
    """``args`` parsed again over the settings of ``--config``, of the run ``--resume``
    names and of ``--preset`` (flags > file > saved run > preset > defaults). The saved
    run's settings travel as ``args.saved_settings`` for :func:`check_resume_changes`."""
    settings = file_settings(train, args.config_file) if args.config_file else {}
    resume = args.resume or settings.get("resume")
    saved = saved_run_settings(train, resume) if resume else {}
    defaults = saved | settings
    if defaults:
        args = _parse_over(parser, train, argv, defaults)
    if args.preset:
        preset = dict(PRESETS[args.preset])
        if args.preset == "paper-cifar" and args.model == "resnet110":
            preset["warmup_epochs"] = 1
        args = _parse_over(parser, train, argv, preset | defaults)
    args.saved_settings = saved
    return args


def _parse_over(parser: argparse.ArgumentParser, train: argparse.ArgumentParser,
                argv: Sequence[str] | None, defaults: dict) -> argparse.Namespace:
    """Parse ``argv`` with ``defaults`` under the flags; the parser is left as it was."""
    before = {k: train.get_default(k) for k in defaults}
    train.set_defaults(**defaults)
    try:
        return parser.parse_args(argv)
    finally:
        train.set_defaults(**before)


def read_file(path: str | Path) -> dict[str, Any]:
    """A TOML or JSON file's table (JSON when the name ends in .json or it starts with {)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise UsageError(f"cannot read --config {path}: {e.strerror or e}") from None
    as_json = path.suffix == ".json" or text.lstrip().startswith("{")
    try:
        table = json.loads(text) if as_json else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        kind = "JSON" if as_json else "TOML"
        raise UsageError(f"{path} is not valid {kind}: {e}") from None
    if not isinstance(table, dict):
        raise UsageError(f"{path} must hold a table of settings (key = value)")
    return table


def file_settings(train: argparse.ArgumentParser, path: str | Path) -> dict[str, Any]:
    """``--config FILE`` as parser defaults, each key and value checked."""
    return as_defaults(train, read_file(path), str(path))


def saved_run_settings(train: argparse.ArgumentParser, run_dir: str | Path) -> dict[str, Any]:
    """The settings saved in ``RUN_DIR/config.json`` that a resume inherits (none when the
    run has no config.json: then the flags alone say them, as before)."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        return {}
    saved = as_defaults(train, read_file(path), str(path))
    return {k: v for k, v in saved.items() if k not in OWN_TO_THE_RESUME}


def as_defaults(train: argparse.ArgumentParser, table: Mapping[str, Any],
                source: str) -> dict[str, Any]:
    """A table of settings (flat or nested, as config.json or TOML hold them) as the
    parser's destinations; an unknown key or a value of the wrong kind is refused."""
    from ddgpipe.training.config import flatten

    actions = setting_actions(train)
    flat = flatten(table)
    options = flat.pop("compensation_options", None) or {}
    unknown = [k for k in options if k not in actions]
    if not isinstance(options, Mapping) or unknown:
        raise UsageError(f"unknown compensation option {unknown[0] if unknown else options!r} "
                         f"in {source}")
    defaults = {}
    for key, value in (flat | dict(options)).items():
        if key in RECORDED:
            continue
        if key not in actions:
            raise UsageError(f"unknown setting {key!r} in {source}; the settings are the "
                             "flags' names with _ for - (ddgpipe train --print-config shows "
                             "them)")
        defaults[key] = checked_value(actions[key], key, value, source)
    return defaults


def setting_actions(train: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The train parser's settings, by destination (the config key)."""
    return {a.dest: a for a in train._actions if a.dest not in NOT_SETTINGS}


def setting_flags(train: argparse.ArgumentParser) -> dict[str, str]:
    """The flag that sets each config key."""
    return {dest: a.option_strings[0] for dest, a in setting_actions(train).items()
            if a.option_strings}


def checked_value(action: argparse.Action, key: str, value: Any, source: str) -> Any:
    """``value`` as the flag would have given it, or a one-line refusal."""
    def refuse(expected: str) -> UsageError:
        return UsageError(f"{key} = {value!r} in {source}: expected {expected}")

    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise refuse("true or false")
        return value
    if value is None:
        return None
    kind = action.type
    if kind in (int_list, str_list):
        if isinstance(value, str):
            return kind(value)
        element = int if kind is int_list else str
        if not isinstance(value, list) or not all(
                isinstance(v, element) and not isinstance(v, bool) for v in value):
            raise refuse(f"a list of {element.__name__}s")
        return list(value)
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = float(value)
    wanted = kind if isinstance(kind, type) else str
    if not isinstance(value, wanted) or isinstance(value, bool):
        raise refuse(f"a {wanted.__name__}")
    if action.choices is not None and value not in action.choices:
        raise refuse(f"one of {', '.join(map(str, action.choices))}")
    return value


def check_resume_changes(config, args: argparse.Namespace,
                         train: argparse.ArgumentParser) -> None:
    """Refuse a flag beside ``--resume`` that changes what the saved run's numbers depend on
    (or shortens it), naming the flag, its saved value and the given one."""
    saved_table: dict = getattr(args, "saved_settings", {})
    if not saved_table:
        return
    flags = setting_flags(train)
    saved, now = by_flag(saved_config(saved_table).to_dict()), by_flag(config.to_dict())
    changed = []
    for key, value in now.items():
        before = saved.get(key)
        if key in GROW_ONLY and None not in (value, before) and value < before:
            changed.append(f"{flags[key]} {value} is shorter than the saved run's {before}")
        elif key not in SAFE_ON_RESUME and value != before:
            changed.append(f"{flags.get(key, key)}: saved {_shown(before)}, given "
                           f"{_shown(value)}")
    if changed:
        raise UsageError(f"--resume {args.resume} continues the run with its saved settings "
                         f"(RUN_DIR/config.json); {'; '.join(changed)}: drop the flag(s), or "
                         f"start a new run with another --out")


def by_flag(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Flat settings with the compensation options as settings of their own (one flag each)."""
    options = flat.get("compensation_options") or {}
    return {k: v for k, v in flat.items() if k != "compensation_options"} | dict(options)


def saved_config(saved: Mapping[str, Any]):
    """The config a saved table stands for (its compensation options gathered again)."""
    from ddgpipe.core.compensation import OPTION_TABLE
    from ddgpipe.training.config import TrainConfig, flat_keys

    options = {o.name: saved[o.name] for o in OPTION_TABLE if saved.get(o.name) is not None}
    flat = {k: v for k, v in saved.items() if k in flat_keys()}
    return TrainConfig.from_flat(**flat, compensation_options=options or None)


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "(none)"
    return "(none)" if value is None else str(value)


def toml_text(flat: Mapping[str, Any]) -> str:
    """Flat settings as TOML that ``--config`` reads back; unset (None) ones as comments."""
    lines = ["# ddgpipe train settings (TOML); train with them: ddgpipe train --config FILE"]
    for key, value in flat.items():
        lines.append(f"# {key} = (unset)" if value is None else f"{key} = {_toml(value)}")
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return "[" + ", ".join(_toml(v) for v in value) + "]"
