"""Digits training sets of any size: scikit-learn's originals, then copies with small random shifts and rotations.

A set of size n is the first n items of one fixed sequence: the originals of the pool (in the given order), then
round 1 (one transformed copy of each original), round 2, ... Each copy is drawn from (seed, round, digit index),
so a larger set extends a smaller one and every run builds the same images.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageChops

from mmerase.data import digit_images

MAX_ROTATION = 12.0  # degrees
MAX_SHIFT = 2  # pixels of the 16×16 image


@dataclass(frozen=True)
class Digit:
    """One training image: its label, the scikit-learn index it comes from and the transform (0 ⇒ original)."""

    image: Image.Image
    label: int
    source: int
    round: int
    rotation: float = 0.0
    shift: tuple[int, int] = (0, 0)

    @property
    def id(self) -> str:
        return f"digit-{self.source}" if self.round == 0 else f"aug{self.round}-{self.source}"


def transform(image: Image.Image, rotation: float, shift: tuple[int, int]) -> Image.Image:
    """Rotate about the centre (bilinear, black fill), then translate by whole pixels (black fill)."""
    out = image.rotate(rotation, resample=Image.BILINEAR, fillcolor=(0, 0, 0))
    return out.transform(out.size, Image.AFFINE, (1, 0, -shift[0], 0, 1, -shift[1]), fillcolor=(0, 0, 0))


def _draw(seed: int, rnd: int, source: int) -> tuple[float, tuple[int, int]]:
    rng = random.Random(f"{seed}-{rnd}-{source}")
    while True:
        rot = rng.uniform(-MAX_ROTATION, MAX_ROTATION)
        shift = (rng.randint(-MAX_SHIFT, MAX_SHIFT), rng.randint(-MAX_SHIFT, MAX_SHIFT))
        if abs(rot) >= 3.0 or shift != (0, 0):
            return rot, shift


def augmented_digits(pool: Sequence[int], n: int, seed: int = 0, size: int = 16) -> list[Digit]:
    """The first ``n`` digits of the sequence built from the scikit-learn indices ``pool`` (see the module)."""
    images, targets = digit_images(size)
    out = [Digit(images[i], targets[i], i, 0) for i in pool[:n]]
    rnd = 0
    while len(out) < n:
        rnd += 1
        for i in pool:
            if len(out) == n:
                break
            rot, shift = _draw(seed, rnd, i)
            img = transform(images[i], rot, shift)
            while ImageChops.difference(img, images[i]).getbbox() is None:  # unchanged (e.g. a blank shift)
                rot, shift = rot + 5.0, (shift[0] + 1, shift[1])
                img = transform(images[i], rot, shift)
            out.append(Digit(img, targets[i], i, rnd, rot, shift))
    return out
