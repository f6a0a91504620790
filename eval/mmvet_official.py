"""``--official-evaluator FILE``: take the grading prompt and the retry wording from the user's own copy of MM-Vet's
evaluator script (``mm-vet_evaluator.py`` or ``mm-vet-v2_evaluator.py``), so that judged scores equal what that
script computes with the same judge. This package does not ship that text.

The file is parsed, never run: the prompt is its module-level ``prompt = "..."`` string; the retry wording is the
text literal that the code in an ``except`` block appends to the prompt when a reply has no score (``... +
"<wording>"``). The prompt layout follows the script: v2 (``| `` before the row, ``<IMG>`` segments replaced by
``<image>``, newlines by ``<br>``) when the script handles ``<IMG>``, else v1.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

_SHAPE = ("a module-level prompt = \"\"\"...\"\"\" string with the example table, as in MM-Vet's mm-vet_evaluator.py "
          "or mm-vet-v2_evaluator.py")


@dataclass(frozen=True)
class OfficialPrompt:
    """What a judged run takes from the evaluator script."""

    preamble: str
    retry_suffix: str
    version: str
    path: str


def _module_prompt(tree: ast.Module) -> str | None:
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id == "prompt" and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)):
            return node.value.value
    return None


def _retry_suffixes(tree: ast.Module) -> list[str]:
    """Text literals that an ``except`` block's assignments append last (``x = ... + "text"``)."""
    found: list[str] = []
    for handler in ast.walk(tree):
        if not isinstance(handler, ast.ExceptHandler):
            continue
        for node in ast.walk(handler):
            value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
            if (isinstance(value, ast.BinOp) and isinstance(value.op, ast.Add) and isinstance(value.right, ast.Constant)
                    and isinstance(value.right.value, str) and value.right.value.strip()):
                found.append(value.right.value)
    return list(dict.fromkeys(found))


def _handles_img_tags(tree: ast.Module) -> bool:
    return any(isinstance(n, ast.Constant) and n.value == "<IMG>" for n in ast.walk(tree))


def read_official_evaluator(path: str | Path) -> OfficialPrompt:
    """Read the grading prompt, retry wording and prompt layout from an MM-Vet evaluator script (never executed)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: file not found (--official-evaluator takes your copy of MM-Vet's evaluator script)")
    try:
        tree = ast.parse(p.read_text(encoding="utf-8"), filename=str(p))
    except UnicodeDecodeError:
        raise UserError(f"{p}: not UTF-8 text; --official-evaluator takes MM-Vet's evaluator script") from None
    except SyntaxError as e:
        raise UserError(f"{p}:{e.lineno}: not a Python script ({e.msg}); --official-evaluator takes MM-Vet's "
                        "evaluator script") from None
    except (ValueError, RecursionError, MemoryError) as e:  # a NUL byte; nesting too deep for the parser
        raise UserError(f"{p}: not a Python script mmerase can read ({type(e).__name__}); --official-evaluator "
                        "takes MM-Vet's evaluator script") from None
    except OSError as e:
        raise UserError(f"{p}: cannot read ({e.strerror})") from None
    prompt = _module_prompt(tree)
    if prompt is None or "|" not in prompt:
        raise UserError(f"{p}: no grading prompt found; expected {_SHAPE}")
    suffixes = _retry_suffixes(tree)
    if len(suffixes) != 1:
        what = "no" if not suffixes else f"{len(suffixes)} different"
        raise UserError(f"{p}: {what} retry wording found; expected one text that the script appends to the prompt "
                        "in an except block when a reply has no score, as MM-Vet's evaluator does")
    return OfficialPrompt(prompt, suffixes[0], "v2" if _handles_img_tags(tree) else "v1", str(p))
