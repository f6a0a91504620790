"""``--config FILE`` of the evaluation commands: a YAML (or JSON) mapping of option names (with - or _) to values,
read and checked by :mod:`mmerase.options` as mmerase's own commands' config files are (an unknown key or a bad value
is a one-line error naming the file); flags given on the command line override it."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmerase.options import UsageError, config_file_values, parser_flags, read_yaml

from .errors import UserError


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Raise :mod:`mmerase.options`' :class:`~mmerase.options.UsageError` as a :class:`UserError` (exit 2)."""
    try:
        yield
    except UsageError as e:
        raise UserError(str(e)) from None


def config_defaults(parser: argparse.ArgumentParser, path: str | Path, command: str) -> dict[str, Any]:
    """Validated ``{dest: value}`` from a config file for ``parser`` (one subcommand's parser)."""
    with user_errors():
        return config_file_values(path, command, parser_flags(parser, skip=("help", "config")))


def load_mapping_file(path: str | Path) -> Any:
    """A YAML (or JSON) file's data, e.g. a price table; a syntax error names the line."""
    with user_errors():
        return read_yaml(path)
