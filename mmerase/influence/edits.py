"""Edits: what changes in the training set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Edit:
    """Replace training sample ``old`` by ``new``.

    ``Edit(old=z, new=None)`` removes z, ``Edit(old=None, new=z)`` inserts z, and ``Edit(old=z, new=z')``
    modifies it (new query, new image or corrected response). Samples are in the same form as the engine's
    ``train_set`` items (whatever its ``collate_fn`` accepts).
    """

    old: Any = None
    new: Any = None

    def __post_init__(self) -> None:
        if self.old is None and self.new is None:
            raise ValueError("an Edit needs an old sample, a new sample or both; both are None")

    @property
    def kind(self) -> str:
        """'remove', 'insert' or 'modify'."""
        if self.new is None:
            return "remove"
        if self.old is None:
            return "insert"
        return "modify"
