"""Config dataclasses → command-line options and YAML config values (torch-free; shared by mmerase and its eval).

A config field declares its command-line face in its metadata through :func:`option`: the help text, its choices
(a tuple, or a callable returning one — read when a parser is built, so choices come from the registries), how to
parse its string form, and its flag when that differs from ``--field-name``. A command is a list of
:class:`Group` s (a dataclass, which of its fields it exposes, command-specific defaults); :func:`add_groups` adds
their options to an argparse parser and :func:`build` constructs each dataclass from the parsed values through its
constructor, so a config's own validation can never be bypassed. :func:`config_file_values` reads a YAML file's
values for one command (the top level, then the command's section), converted like command-line strings; an
unknown key is an error that suggests the closest option. A hand-written argparse parser (the evaluation harness's)
gets the same config files through :func:`parser_flags`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from .fileio import JSONContentError, check_nesting, shown


class UsageError(ValueError):
    """A problem with the options or the config file, reported as one line."""


_NONE_WORDS = ("none", "null", "")


def option(default: Any = MISSING, *, help: str, choices: Sequence | Callable[[], Sequence] | None = None,
           parse: Callable[[str], Any] | None = None, flag: str | None = None, required: bool = False,
           cli: bool = True, alias: tuple[str, Any] | None = None, default_factory: Any = MISSING) -> Any:
    """A dataclass field with its command-line description.

    ``choices`` may be a callable (evaluated when a parser is built); ``parse`` turns the command-line string into
    the value (default: from the field's annotation: bool, int, float or str, each optionally ``None``);
    ``required`` makes the flag mandatory on the command line (the library default stays); ``cli=False`` keeps
    the field out of every command; ``alias=("--flag", value)`` adds a switch that sets the field to ``value``.
    """
    meta = {"help": help, "choices": choices, "parse": parse, "flag": flag, "required": required, "cli": cli,
            "alias": alias}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Flag:
    """One command-line option, made from a config field. ``dest`` (the flag's name with underscores) is also its
    key in config files; ``field`` is the dataclass field it sets."""

    dest: str
    field: str
    flag: str
    help: str
    default: Any
    parse: Callable[[str], Any] | None
    choices: tuple | None
    boolean: bool
    required: bool
    alias: tuple[str, Any] | None = None
    nargs: str | int | None = None

    def convert(self, value: Any, where: str) -> Any:
        """A config-file value → the field's value, checked like a command-line string. A list option takes a
        YAML list (or one value); a ``NAME: VALUE`` mapping becomes ``NAME=VALUE`` items."""
        if self.nargs not in ("+", "*"):
            return self.convert_one(value, where)
        if isinstance(value, dict):
            value = [f"{k}={v}" for k, v in value.items()]
        return [self.convert_one(v, where) for v in (value if isinstance(value, list) else [value])]

    def convert_one(self, value: Any, where: str) -> Any:
        """One config-file value, as :meth:`convert` (YAML reads a bare on/off as a boolean: it stands for the word
        where the choices are on and off)."""
        if value is None:
            return None
        if self.boolean:
            if not isinstance(value, bool):
                raise UsageError(f"{where}'{self.dest}' must be true or false, got {shown(value)}")
            return value
        if isinstance(value, (dict, list)):
            raise UsageError(f"{where}'{self.dest}' must be a single value, got {shown(value)}")
        if isinstance(value, bool) and self.choices and {"on", "off"} <= set(self.choices):
            value = "on" if value else "off"
        elif isinstance(value, float) and self.parse is int and value.is_integer():
            value = int(value)
        try:
            out = self.parse(str(value)) if self.parse else value
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"{where}'{self.dest}' {e}") from None
        except (TypeError, ValueError):
            raise UsageError(f"{where}'{self.dest}' has an invalid value {shown(value)}") from None
        if self.choices and out not in self.choices:
            raise UsageError(f"{where}'{self.dest}' must be one of {', '.join(map(str, self.choices))}, not "
                             f"{shown(value)}{_hint(str(out)[:200], self.choices)}")
        return out


@dataclass
class Group:
    """The options one config dataclass contributes to a command.

    ``only``/``exclude`` select fields; ``defaults`` overrides field defaults for this command (e.g. the demo's
    validated solver settings); ``fixed`` sets fields that the command decides itself, never the user.
    """

    cls: type
    only: Sequence[str] | None = None
    exclude: Sequence[str] = ()
    defaults: dict[str, Any] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)

    def fields(self) -> list[dataclasses.Field]:
        out = []
        for f in dataclasses.fields(self.cls):
            meta = f.metadata
            if "help" not in meta or not meta["cli"] or f.name in self.exclude or f.name in self.fixed:
                continue
            if self.only is not None and f.name not in self.only:
                continue
            out.append(f)
        unknown = (set(self.only or ()) | set(self.defaults)) - {f.name for f in dataclasses.fields(self.cls)}
        if unknown:
            raise TypeError(f"{self.cls.__name__} has no field(s) {sorted(unknown)}")
        return out

    def flags(self) -> list[Flag]:
        return [_flag(f, self.defaults.get(f.name, _field_default(f))) for f in self.fields()]


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _annotation_parts(annotation: Any) -> tuple[set[str], bool]:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    parts = {p.strip() for p in text.split("|")}
    return parts - {"None"}, "None" in parts


def optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` that also reads none / null / empty as ``None``."""
    def read(text: str) -> Any:
        return None if str(text).lower() in _NONE_WORDS else parse(text)
    read.__name__ = getattr(parse, "__name__", "value")  # argparse names the type in its errors
    return read


def finite_only(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` that refuses a number that is not finite (nan, inf: ``float()`` reads both, and no option of
    mmerase means either), so such a value is an error at parse time rather than inside a solver."""
    def read(text: str) -> Any:
        value = parse(text)
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {shown(str(text))}")
        return value
    read.__name__ = getattr(parse, "__name__", "value")
    return read


def _flag(f: dataclasses.Field, default: Any) -> Flag:
    meta = f.metadata
    base, may_be_none = _annotation_parts(f.type)
    boolean = base == {"bool"}
    parse = meta["parse"]
    if parse is None and not boolean:
        simple = {"int": int, "float": float, "str": str}
        if len(base) != 1 or next(iter(base)) not in simple:
            raise TypeError(f"field {f.name} ({f.type}) needs parse= in its option()")
        parse = simple[next(iter(base))]
    choices = meta["choices"]() if callable(meta["choices"]) else meta["choices"]
    if parse is not None and parse is not str:
        parse = finite_only(parse)
    if parse is not None and may_be_none and (parse is not str or choices):
        parse = optional(parse)  # a field that may be None takes none / null on the command line
        choices = (*choices, None) if choices else choices
    flag = meta["flag"] or "--" + f.name.replace("_", "-")
    return Flag(dest=flag.lstrip("-").replace("-", "_"), field=f.name, flag=flag, help=meta["help"],
                default=default, parse=parse, choices=tuple(choices) if choices else None, boolean=boolean,
                required=meta["required"], alias=meta["alias"])


def command_flags(groups: Iterable[Group], shared: Iterable[str] = ()) -> list[Flag]:
    """Every flag of a command; a field name met in two groups must be listed in ``shared`` (one flag sets both)."""
    seen: dict[str, Flag] = {}
    shared = set(shared)
    for g in groups:
        for fl in g.flags():
            if fl.dest in seen:
                if fl.dest not in shared:
                    raise TypeError(f"option --{fl.dest} is defined by two configs of one command; share or rename it")
                continue
            seen[fl.dest] = fl
    return list(seen.values())


def parser_flags(parser: argparse.ArgumentParser, skip: Iterable[str] = ("help",)) -> list[Flag]:
    """The options of an argparse parser written by hand, as :class:`Flag` s (so :func:`config_file_values` reads
    config files for it): each option's type, choices and list-ness (``nargs``); store_true / store_false /
    BooleanOptionalAction options are booleans. Positional arguments and the ``skip`` destinations are left out."""
    out = []
    for a in parser._actions:
        if not a.option_strings or a.dest in skip or a.dest == argparse.SUPPRESS:
            continue
        boolean = isinstance(a, argparse.BooleanOptionalAction) or (
            isinstance(a, argparse._StoreConstAction) and isinstance(a.const, bool))
        out.append(Flag(dest=a.dest, field=a.dest, flag=a.option_strings[0], help=a.help or "", default=a.default,
                        parse=None if boolean else a.type or str, choices=tuple(a.choices) if a.choices else None,
                        boolean=boolean, required=a.required, nargs=a.nargs))
    return out


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None, or a switch)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action, argparse._StoreConstAction):
            return action.help
        return super()._get_help_string(action)

    def _split_lines(self, text: str, width: int) -> list[str]:
        """The default on a line of its own, never broken."""
        head, sep, tail = text.rpartition(" (default: ")
        if not sep:
            return super()._split_lines(text, width)
        return super()._split_lines(head, width) + ["(default: " + tail]


def add_flags(parser: argparse.ArgumentParser, flags: Iterable[Flag]) -> None:
    """Add ``flags`` to an argparse parser (booleans as --x/--no-x, aliases as switches)."""
    for fl in flags:
        text = fl.help + (" (required)" if fl.required else "")
        if fl.boolean:
            parser.add_argument(fl.flag, dest=fl.dest, action=argparse.BooleanOptionalAction, default=fl.default,
                                help=text)
        else:
            parser.add_argument(fl.flag, dest=fl.dest, type=fl.parse, default=fl.default, help=text,
                                choices=fl.choices, metavar=None if fl.choices else fl.dest.upper())
        if fl.alias:
            parser.add_argument(fl.alias[0], dest=fl.dest, action="store_const", const=fl.alias[1],
                                help=f"the same as {fl.flag} {fl.alias[1]}")


def build(group: Group, values: Any, **overrides: Any) -> Any:
    """The group's dataclass from parsed values (a Namespace or a mapping keyed by option name): the value of each
    of its flags, its fixed values, then ``overrides`` (by field name); constructed through the class so its
    validation runs. A ValueError from that validation becomes a :class:`UsageError` naming the option."""
    mapping = vars(values) if isinstance(values, argparse.Namespace) else dict(values)
    flags = {fl.field: fl for fl in group.flags()}
    kwargs = {name: mapping[fl.dest] for name, fl in flags.items() if fl.dest in mapping}
    kwargs.update(group.fixed)
    kwargs.update(overrides)
    try:
        return group.cls(**kwargs)
    except ValueError as e:
        text = str(e)
        bad = next((fl for name, fl in sorted(flags.items(), key=lambda kv: -len(kv[0])) if name in text), None)
        raise UsageError(text + (f" (option {bad.flag})" if bad else "")) from None


def _hint(value: str, pool: Iterable[Any]) -> str:
    close = difflib.get_close_matches(value, [str(p) for p in pool], n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _key_hint(dest: str, pool: Iterable[str]) -> str:
    """The closest option name, spelled as on the command line (with -)."""
    close = difflib.get_close_matches(dest, sorted(pool), n=1)
    return f" (did you mean '{close[0].replace('_', '-')}'?)" if close else ""


YAML_MAX_VALUES = 100_000  # far more than any config holds; an alias bomb expanding past it is refused at once


def _yaml_loader() -> type:
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, (str, int, float, bool)):
                    continue  # an unhashable key is refused by PyYAML itself
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {shown(key)} is given twice in one mapping", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return Loader


def read_yaml(path: str | Path, label: str = "") -> Any:
    """A YAML (or JSON, a subset of YAML) file's data. A missing file, a folder, bad YAML, text that is not UTF-8,
    a key given twice, nesting deeper than :data:`~mmerase.fileio.MAX_NESTING` or aliases expanding past
    :data:`YAML_MAX_VALUES` values is a :class:`UsageError` naming ``label`` + the file (and the line where YAML
    knows it)."""
    import yaml

    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{label}{p}: is a folder, expected a file")
    if not p.is_file():
        raise UsageError(f"{label}{p}: file not found")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_yaml_loader())  # noqa: S506 - a SafeLoader
        check_nesting(data, max_values=YAML_MAX_VALUES)
        return data
    except JSONContentError as e:
        raise UsageError(f"{label}{p}: {e}") from None
    except RecursionError:
        raise UsageError(f"{label}{p}: nested too deeply") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"{label}{p}{line}: invalid YAML ({problem})") from None
    except UnicodeDecodeError:
        raise UsageError(f"{label}{p}: not UTF-8 text") from None


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A config file's top-level mapping (an empty file is an empty one); see :func:`read_yaml` for its errors."""
    raw = read_yaml(path, "config file ")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UsageError(f"config file {path}: expected a mapping of option: value")
    return raw


def config_file_values(path: str | Path, command: str, flags: Sequence[Flag], known: set[str] | None = None,
                       sections: set[str] | None = None, prog: str = "mmerase") -> dict[str, Any]:
    """The values of config file ``path`` that apply to ``command`` (whose options are ``flags``), keyed by option
    ``dest`` and converted like command-line strings.

    With ``sections`` (the names of every command), the file serves several commands: keys at the top level are
    used by each command that has them (``known`` holds every command's keys) and the ``command:`` section's keys
    must all be its own. Without, the file is this command's alone: every key must be one of its options.
    """
    raw = read_yaml_mapping(path)
    mine = {fl.dest: fl for fl in flags}
    aliases = {fl.alias[0].lstrip("-").replace("-", "_"): fl for fl in flags if fl.alias}
    values: dict[str, Any] = {}

    def take(key: Any, value: Any, section: str | None) -> None:
        dest = str(key).replace("-", "_")
        own = section is not None or sections is None
        pool = set(mine) | set(aliases) if own else set(known or ())
        if dest not in pool:
            scope = f"'{section or command}'" if own else f"any {prog} command"
            raise UsageError(f"config file {path}: unknown key {shown(key)} for {scope}{_key_hint(dest[:200], pool)}")
        where = f"config file {path}: " + (f"section '{section}': " if section else "")
        if dest in aliases:
            if not isinstance(value, bool):
                raise UsageError(f"{where}'{dest}' must be true or false, got {shown(value)}")
            if value:
                values[aliases[dest].dest] = aliases[dest].alias[1]
        elif dest in mine:
            values[dest] = mine[dest].convert(value, where)

    for key, value in raw.items():
        if sections and key in sections:
            if not isinstance(value, dict):
                raise UsageError(f"config file {path}: section {shown(key)} must be a mapping")
            continue
        take(key, value, None)
    for key, value in ((raw.get(command) or {}).items() if sections else ()):
        take(key, value, command)
    return values


__all__ = ["Flag", "Group", "HelpFormatter", "UsageError", "add_flags", "build", "command_flags", "config_file_values",
           "option", "optional", "parser_flags", "read_yaml", "read_yaml_mapping"]
