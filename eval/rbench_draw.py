"""R-Bench instance-level inputs: draw the subject/object boxes or masks on the image and rewrite the question.

Same conventions as the benchmark's own ``utils.py``: boxes are normalised ``[x0, y0, x1, y1]`` in ``sub_box`` /
``obj_box``, drawn as 4-px outlines in the named colours (subject red, object green by default); a mask is a PNG
``<mask_dir>/<question_id>.png`` whose pixel value 1 marks the subject and 2 the object, resized (nearest) to the
image and pasted as translucent colour (alpha 120); the question gets "in red bounding box" / "in red mask" after the
subject and object words.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .errors import UserError
from .io import shown

MASK_COLORS: dict[str, tuple[int, int, int, int]] = {
    "red": (250, 0, 45, 120),
    "green": (100, 250, 0, 120),
    "blue": (0, 40, 250, 120),
    "gold": (255, 215, 0, 120),
    "pink": (255, 105, 180, 120),
}


def instance_question(record: Mapping[str, Any], kind: str = "box", sub_color: str = "red",
                      obj_color: str = "green") -> str:
    """Question text with the colour/shape hint after the (lower-cased) subject and object names."""
    if kind not in ("box", "mask"):
        raise ValueError("kind must be 'box' or 'mask'")
    shape = "mask" if kind == "mask" else "bounding box"
    text = str(record["text"])
    sub, obj = str(record["subject"]).lower(), str(record["object"]).lower()
    text = text.replace(sub, f"{sub} in {sub_color} {shape}")
    return text.replace(obj, f"{obj} in {obj_color} {shape}")


def draw_boxes(image: Image.Image, record: Mapping[str, Any], sub_color: str = "red", obj_color: str = "green",
               width: int = 4) -> Image.Image:
    """RGB copy of ``image`` with the subject and object boxes (normalised coordinates) outlined."""
    img = image.convert("RGB")
    w, h = img.size
    draw = ImageDraw.Draw(img)
    for key, color in (("sub_box", sub_color), ("obj_box", obj_color)):
        box = record.get(key)
        if not isinstance(box, (list, tuple)) or len(box) != 4:
            raise UserError(f"question {shown(record.get('question_id'))}: {shown(key)} must be [x0, y0, x1, y1] (normalised)")
        draw.rectangle([float(b) * s for b, s in zip(box, (w, h, w, h))], outline=color, width=width)
    return img


def _overlay(selected: np.ndarray, rgba: tuple[int, int, int, int]) -> Image.Image:
    """Transparent RGBA image coloured ``rgba`` where ``selected`` is true."""
    arr = np.zeros((*selected.shape, 4), dtype=np.uint8)
    arr[selected] = rgba
    return Image.fromarray(arr, "RGBA")


def draw_masks(image: Image.Image, mask: Image.Image, sub_color: str = "red", obj_color: str = "green") -> Image.Image:
    """RGBA copy of ``image`` with the subject (mask value 1) and object (value 2) regions tinted.

    The mask's raw pixel values are used (palette indices for a ``P`` image, the first band of a colour image).
    """
    for c in (sub_color, obj_color):
        if c not in MASK_COLORS:
            raise UserError(f"mask colour must be one of {sorted(MASK_COLORS)}, not {shown(c)}")
    img = image.convert("RGBA")
    values = np.asarray(mask.resize(img.size, resample=Image.NEAREST))
    if values.ndim == 3:
        values = values[..., 0]
    for value, color in ((1, sub_color), (2, obj_color)):
        layer = _overlay(values == value, MASK_COLORS[color])
        img.paste(layer, (0, 0), layer)
    return img


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False for a name the system refuses (too long, a NUL byte) instead of an error."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def safe_file_stem(question_id: Any) -> str:
    """A question id as the name of the image file written for it; an id that would name a file elsewhere
    (a path separator, ``.``/``..``, a NUL) or is too long for a file name is a :class:`UserError`."""
    stem = str(question_id)
    if (not stem or stem in (".", "..") or any(c in stem for c in "/\\\0") or len(stem.encode("utf-8")) > 200
            or not stem.isprintable()):
        raise UserError(f"question_id {shown(stem)} cannot name an image file (no path separators, control "
                        "characters or more than 200 bytes)")
    return stem


def prepare_instance(record: Mapping[str, Any], image_dir: str | Path, kind: str = "box",
                     mask_dir: str | Path | None = None, sub_color: str = "red",
                     obj_color: str = "green") -> tuple[Image.Image, str]:
    """The (image, question) pair an instance-level R-Bench question is asked with."""
    img_path = Path(image_dir) / str(record["image"])
    if not _is_file(img_path):
        raise UserError(f"{shown(str(img_path))}: image not found")
    with Image.open(img_path) as im:
        im.load()
        if kind == "box":
            out = draw_boxes(im, record, sub_color, obj_color)
        elif kind == "mask":
            if mask_dir is None:
                raise UserError("--kind mask needs --mask-dir (folder of <question_id>.png masks)")
            mpath = Path(mask_dir) / f"{safe_file_stem(record['question_id'])}.png"
            if not _is_file(mpath):
                raise UserError(f"{shown(str(mpath))}: mask not found")
            with Image.open(mpath) as mk:
                mk.load()
                out = draw_masks(im, mk, sub_color, obj_color)
        else:
            raise UserError(f"--kind must be 'box' or 'mask', not {shown(kind)}")
    return out, instance_question(record, kind, sub_color, obj_color)
