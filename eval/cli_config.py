"""``--config FILE`` support: a YAML/JSON mapping of option names to values, checked against the subcommand's
options (unknown keys and bad values are clear errors); flags given on the command line override it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from eval.errors import UserError


def load_mapping_file(path: str | Path) -> Any:
    """Read a YAML (or JSON, a subset of YAML) file; syntax errors name the line."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: file not found")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{p}{line}: invalid YAML ({problem})") from None
    except UnicodeDecodeError:
        raise UserError(f"{p}: not UTF-8 text") from None


def _convert(action: argparse.Action, key: str, value: Any, origin: str) -> Any:
    """Check one config value the way argparse would check the flag."""
    def one(v: Any) -> Any:
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(v, bool):
                raise UserError(f"{origin}: {key!r} must be true or false")
            return v
        if v is None:
            return None
        if isinstance(v, bool) and action.choices is not None and {"on", "off"} <= set(action.choices):
            v = "on" if v else "off"  # YAML reads a bare on/off as a boolean
        if action.type is not None and not isinstance(v, bool):
            try:
                if action.type in (int, float) and isinstance(v, (int, float)):
                    if action.type is int and isinstance(v, float) and not v.is_integer():
                        raise ValueError
                    v = action.type(v)
                else:
                    v = action.type(str(v) if not isinstance(v, str) else v)
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                raise UserError(f"{origin}: {key!r} has an invalid value {v!r}") from None
        elif isinstance(v, (dict, list)):
            raise UserError(f"{origin}: {key!r} must be a single value")
        elif action.type is None and not isinstance(v, str):
            v = str(v)
        if action.choices is not None and v not in action.choices:
            raise UserError(f"{origin}: {key!r} must be one of {', '.join(map(str, action.choices))}, not {v!r}")
        return v

    if action.nargs in ("+", "*"):
        if isinstance(value, dict):  # NAME: FILE mapping for NAME=FILE lists
            value = [f"{k}={v}" for k, v in value.items()]
        if not isinstance(value, list):
            value = [value]
        return [one(v) for v in value]
    return one(value)


def config_defaults(parser: argparse.ArgumentParser, path: str | Path, command: str) -> dict[str, Any]:
    """Validated ``{dest: value}`` from a config file for ``parser`` (one subcommand's parser)."""
    data = load_mapping_file(path)
    origin = str(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{origin}: the config must be a mapping of option names to values")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config", argparse.SUPPRESS)}
    out: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in actions:
            known = ", ".join(sorted(k.replace("_", "-") for k in actions))
            raise UserError(f"{origin}: unknown key {raw_key!r} for '{command}' (known: {known})")
        out[key] = _convert(actions[key], str(raw_key), value, origin)
    return out
