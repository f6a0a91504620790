"""Loading a base model and its adapter: dtype, attention kernel, NF4, device, LoRA, gradient checkpointing.

Everything here is family-agnostic: a family says which transformers class loads it, which modules LoRA adapts by
default, which modules form its projector and which stay full precision under NF4 (see :class:`FamilySpec`).
"""

from __future__ import annotations

import argparse
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmerase.fileio import FileFormatError, read_json_object, shown
from mmerase.models.exact import keep_norms_in_dtype, register_exact_attention, supports_exact_float64
from mmerase.options import option

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: peft regex of a language model's attention and MLP projections, anchored on ``language_model`` so a vision
#: tower's own ``q_proj``/``k_proj``/``v_proj`` (or Qwen2.5-VL's ``gate_proj``…) never match
LM_TARGETS = r".*language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
#: the same for a text-only causal LM (no ``language_model`` prefix)
TEXT_TARGETS = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


class ModelLoadError(ValueError):
    """A base model or adapter cannot be loaded as asked (bad path, unsupported family, bad option)."""


class AdapterMismatchError(ModelLoadError):
    """An adapter folder does not fit the base model it is being loaded onto."""


@dataclass
class LoraSettings:
    """A new LoRA adapter (peft ``LoraConfig`` fields plus what mmerase adds).

    ``target_modules=None`` means the family's default: the language model's attention and MLP projections only
    (never the vision tower). ``train_projector`` also trains the family's multimodal projector (peft
    ``modules_to_save``; it is saved with the adapter). ``seed`` fixes the adapter's initialisation.
    """

    r: int = option(8, flag="--lora-r", help="LoRA rank")
    alpha: float = option(16.0, flag="--lora-alpha", help="LoRA alpha (the update is scaled by alpha / r)")
    dropout: float = option(0.0, flag="--lora-dropout", help="LoRA dropout")
    target_modules: list[str] | str | None = option(None, flag="--lora-targets", parse=str, help=(
        "regex of modules to adapt (default: the language model's projections, never the vision tower)"))
    train_projector: bool = option(False, help="also train the multimodal projector, saved with the adapter")
    modules_to_save: list[str] | None = option(None, cli=False, help="other modules trained in full")
    seed: int = option(0, help="seed of the adapter's initialisation and of the data order")


def parse_device(text: str) -> str:
    """A ``--device`` value, refused at parse time when it names no device torch knows, or a CUDA device this
    machine does not have (rather than an assertion deep inside torch once the model is loaded)."""
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"is not a device torch knows: {shown(text)} (cpu, cuda, cuda:1 …)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise argparse.ArgumentTypeError(f"{shown(text)} asks for a CUDA device, and this machine has "
                                             f"{count} (torch {torch.__version__}"
                                             f"{'' if torch.version.cuda else ', a build without CUDA'})")
    return text


@dataclass
class LoadOptions:
    """How to load a base model.

    ``exact_hvp`` forces eager attention (SDPA/flash kernels have no double backward, so exact Hessian-vector
    products need eager; asking for another kernel with ``exact_hvp`` is an error, and the engine refuses exact
    products on a model loaded with one); the workflows set it from the solve's plan. ``gradient_checkpointing`` is
    non-reentrant (double backward works through it) and stays active during the engine's products (see
    :func:`keep_checkpointing_in_products`).
    ``quantization="nf4"`` loads the base's language-model linear layers 4-bit through bitsandbytes (compute in
    ``dtype``), made product-ready by :func:`mmerase.models.quant.prepare_4bit`. ``device=None`` picks the current
    CUDA device when available.
    """

    dtype: str = option("float32", choices=tuple(DTYPES), help="dtype of the model and adapter")
    quantization: str | None = option(None, choices=("nf4",), alias=("--load-in-4bit", "nf4"), help=(
        "load the base quantized: nf4 (4-bit, bitsandbytes; needs a CUDA device or bitsandbytes' CPU backend); "
        "the adapter stays in --dtype"))
    exact_hvp: bool = option(True, cli=False, help="eager attention, for products that need a double backward")
    attn_implementation: str | None = option(None, cli=False, help="the attention kernel transformers loads")
    device: str | None = option(None, parse=parse_device, help=(
        "cpu, cuda, cuda:1 … (default: cuda when available)"))
    local_files_only: bool = option(False, help="never contact the hub when loading the base")
    gradient_checkpointing: bool = option(False, help=(
        "recompute activations in the backward pass: less memory, about a third more time (exact products "
        "included)"))

    def torch_dtype(self) -> torch.dtype:
        try:
            return DTYPES[self.dtype]
        except KeyError:
            raise ModelLoadError(f"unknown dtype {self.dtype!r}; choose one of {sorted(DTYPES)}") from None

    def attention(self) -> str | None:
        if self.exact_hvp:
            if self.attn_implementation not in (None, "eager"):
                raise ModelLoadError(
                    f"attn_implementation={self.attn_implementation!r} has no double backward; exact Hessian products "
                    "need 'eager' (or set exact_hvp=False and use a first-order curvature such as fd-hessian)")
            return "eager"
        return self.attn_implementation

    def resolved_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        if torch.cuda.is_available():  # the current device: each data-parallel rank sets its own
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


@dataclass(frozen=True)
class FamilySpec:
    """What loading needs to know about a family: its transformers class (a callable returning it, so nothing is
    imported before use), default LoRA targets, projector modules (regexes over full module names, trained with
    ``train_projector``) and the modules NF4 leaves in full precision (matched by transformers from the start of a
    module name)."""

    name: str
    model_class: Any
    lora_targets: str = LM_TARGETS
    projector_modules: tuple[str, ...] = ()
    quant_skip_modules: tuple[str, ...] = ("lm_head",)


def _quantization_kwargs(spec: FamilySpec, options: LoadOptions, device: torch.device) -> dict[str, Any]:
    if options.quantization != "nf4":
        raise ModelLoadError(f"unknown quantization {options.quantization!r}; the supported one is 'nf4'")
    dtype = options.torch_dtype()
    if dtype == torch.float64:
        raise ModelLoadError("nf4 quantization computes in float32/bfloat16; use dtype='float32' or 'bfloat16'")
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                llm_int8_skip_modules=list(spec.quant_skip_modules))
    index = device.index if device.type == "cuda" and device.index is not None else str(device)
    return {"quantization_config": config, "device_map": {"": index}}


def load_base(spec: FamilySpec, path: str, options: LoadOptions) -> nn.Module:
    """The frozen base model at ``path`` in ``options``' dtype, attention kernel, quantization and device.

    In float64 the families of :mod:`.exact` get an eager attention and RMSNorms that stay float64, so float64
    checks are exact; NF4 layers get :func:`~mmerase.models.quant.prepare_4bit`'s re-dequantizing forward.
    """
    from transformers import AutoConfig

    dtype = options.torch_dtype()
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": options.local_files_only}
    attn = options.attention()
    exact64 = dtype == torch.float64 and supports_exact_float64(
        AutoConfig.from_pretrained(path, local_files_only=options.local_files_only))
    if exact64 and attn == "eager":  # transformers' eager softmax runs in float32 (see .exact)
        attn = register_exact_attention()
    if attn is not None:
        kwargs["attn_implementation"] = attn
    device = options.resolved_device()
    if options.quantization is not None:
        kwargs.update(_quantization_kwargs(spec, options, device))
    try:
        model = spec.model_class().from_pretrained(path, **kwargs)
    except OSError as exc:
        raise ModelLoadError(f"cannot load base model {path!r}: {exc}") from exc
    if options.quantization is None:
        model.to(device)
    else:  # exact double backward without keeping dequantized weights; autograd path in eval mode
        from mmerase.models.quant import prepare_4bit

        prepare_4bit(model)
    if exact64:
        keep_norms_in_dtype(model)
    model.requires_grad_(False)
    return model


def attach_lora(spec: FamilySpec, base: nn.Module, lora: LoraSettings) -> nn.Module:
    """A new seeded LoRA on ``base`` (the family's default targets unless ``lora.target_modules`` is set)."""
    from peft import LoraConfig, get_peft_model

    modules_to_save = list(lora.modules_to_save or [])
    if lora.train_projector:
        found = projector_module_names(spec, base)
        if not found:
            raise ModelLoadError(f"model family {spec.name!r} has no projector to train")
        modules_to_save += [m for m in found if m not in modules_to_save]
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules or spec.lora_targets,
                        modules_to_save=modules_to_save or None, task_type="CAUSAL_LM", bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(lora.seed)
        try:
            return get_peft_model(base, config)
        except ValueError as exc:
            raise ModelLoadError(f"cannot attach LoRA (target_modules={config.target_modules!r}): {exc}") from exc


def projector_module_names(spec: FamilySpec, base: nn.Module) -> list[str]:
    """Full names of the modules of ``base`` matching the family's projector patterns (peft ``modules_to_save``)."""
    names = [name for name, _ in base.named_modules()]
    return [n for n in names if any(re.fullmatch(p, n) for p in spec.projector_modules)]


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant checkpointing (the only kind that supports double backward), kept active in products."""
    base = model.get_base_model()
    if hasattr(base, "activation_checkpointing_enable"):  # transformers ≥ 5.2x name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.enable_input_require_grads()
    keep_checkpointing_in_products(model)


def load_peft_model(spec: FamilySpec, path: str, options: LoadOptions, *, adapter: str | Path | None = None,
                    lora: LoraSettings | None = None) -> nn.Module:
    """Base at ``path`` plus the peft ``adapter`` folder (trainable) or a new LoRA (``lora``)."""
    if adapter is not None and lora is not None:
        raise ModelLoadError("give either an adapter folder to load or LoRA settings for a new adapter, not both")
    base = load_base(spec, path, options)
    if adapter is not None:
        model = load_adapter(base, adapter, base_name=path)
    else:
        model = attach_lora(spec, base, lora or LoraSettings())
        upcast_trainable(model)
    if options.torch_dtype() == torch.float64:  # peft creates adapters in float32; keep all float64 for exact checks
        model.to(torch.float64)
    if options.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


# ---- adapters ----------------------------------------------------------------------------------------------------

ADAPTER_CONFIG = "adapter_config.json"
SAFETENSORS_WEIGHTS = "adapter_model.safetensors"
LEGACY_WEIGHTS = "adapter_model.bin"
#: peft types loaded and unlearned through the same path as LoRA (verified end to end on the tiny presets:
#: influence and gradient-method requests, generation): tuners whose trainable weights live in, or scale, the base's
#: linear layers. Prompt-learning types (PREFIX_TUNING, PROMPT_TUNING, P_TUNING, …) change the input sequence, which
#: mmerase's batches, padding and losses do not account for (PROMPT_TUNING fails outright); others are unverified.
PEFT_TYPES = ("LORA", "LOHA", "LOKR", "IA3", "VERA", "ADALORA")


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's first line, bounded and escaped (library messages may echo values from a file)."""
    text = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
    return shown(text, limit, quote=False)


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """The adapter folder's ``adapter_config.json`` as a dict.

    A missing file is "not a peft adapter folder"; a folder in its place, text that is not UTF-8, invalid JSON, a key
    given twice, nesting deeper than :data:`mmerase.fileio.MAX_NESTING` or a document that is not a JSON object is
    an :class:`AdapterMismatchError` naming the file.
    """
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.exists():
        raise AdapterMismatchError(f"{adapter_dir} is not a peft adapter folder (no {ADAPTER_CONFIG})")
    try:
        return read_json_object(path, "adapter config")
    except FileFormatError as exc:
        raise AdapterMismatchError(f"adapter config {exc}") from None


def check_peft_type(adapter_dir: str | Path, config: dict[str, Any]) -> str:
    """The adapter's ``peft_type`` if mmerase serves it (:data:`PEFT_TYPES`), else a :class:`ModelLoadError` naming
    the folder and the type."""
    kind = config.get("peft_type")
    if kind is None:
        raise AdapterMismatchError(f"adapter config {Path(adapter_dir) / ADAPTER_CONFIG}: no peft_type")
    if kind not in PEFT_TYPES:
        raise ModelLoadError(
            f"adapter {adapter_dir} is a {shown(kind)} adapter (peft_type in its {ADAPTER_CONFIG}); mmerase unlearns "
            f"LoRA adapters and the weight adapters that work like them ({', '.join(PEFT_TYPES)}), not prompt-"
            "learning or other peft types")
    return kind


def _unreadable_safetensors(path: Path, exc: BaseException) -> AdapterMismatchError:
    return AdapterMismatchError(f"{path} is not a readable safetensors file ({_first_line(exc)}); the adapter is "
                                "damaged or incompletely copied")


def _legacy_state(path: Path) -> dict[str, torch.Tensor]:
    """The name → tensor mapping of a legacy ``adapter_model.bin``, loaded weights-only (no arbitrary objects)."""
    import pickle

    try:
        with warnings.catch_warnings():  # e.g. torch's note on the pickle protocol: the refusal below says enough
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message proposes a load that can run arbitrary code: never repeat it
        raise ModelLoadError(
            f"{path} holds pickled objects other than weights; mmerase only loads adapter weights (an "
            f"{SAFETENSORS_WEIGHTS}, or a weights-only {LEGACY_WEIGHTS} of tensors) and never unpickles code: save "
            "the adapter with safetensors (peft's save_pretrained does by default)") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, TypeError) as exc:  # truncated / not a zip
        detail = _first_line(exc)
        detail = "" if "weights_only" in detail else f" ({detail})"
        raise ModelLoadError(f"{path} is not a readable torch weights file{detail}; the adapter is damaged or "
                             f"incompletely copied") from None
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path} does not hold adapter weights (a mapping of names to tensors), but a "
                             f"{type(state).__name__}")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ModelLoadError(f"{path} does not hold adapter weights only: entry {shown(key)} is a "
                                 f"{type(value).__name__}, not a tensor")
    return state


def _weights_file(adapter_dir: Path) -> Path:
    for name in (SAFETENSORS_WEIGHTS, LEGACY_WEIGHTS):
        if (adapter_dir / name).is_file():
            return adapter_dir / name
    raise AdapterMismatchError(f"adapter folder {adapter_dir} has no {SAFETENSORS_WEIGHTS} (or .bin) weights")


def saved_adapter_shapes(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    """Name → shape of every weight saved in a peft adapter folder (safetensors, or a legacy ``.bin``); a file that
    cannot be read is a :class:`ModelLoadError` naming it."""
    from safetensors import SafetensorError, safe_open

    weights = _weights_file(Path(adapter_dir))
    if weights.name == SAFETENSORS_WEIGHTS:
        try:
            with safe_open(str(weights), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise _unreadable_safetensors(weights, exc) from None
    return {k: tuple(v.shape) for k, v in _legacy_state(weights).items()}


def read_adapter_weights(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every weight saved in a peft adapter folder (CPU tensors); an unreadable file is a :class:`ModelLoadError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = _weights_file(Path(adapter_dir))
    if weights.name == LEGACY_WEIGHTS:
        return _legacy_state(weights)
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise _unreadable_safetensors(weights, exc) from None


def check_finite_weights(adapter_dir: str | Path, state: dict[str, torch.Tensor]) -> None:
    """Raise :class:`ModelLoadError` naming the adapter, its first non-finite weight and how many there are."""
    bad = [(k, int((~torch.isfinite(v)).sum())) for k, v in state.items()
           if v.is_floating_point() or v.is_complex()]
    bad = [(k, n) for k, n in bad if n]
    if bad:
        name, count = bad[0]
        raise ModelLoadError(
            f"adapter {adapter_dir} holds non-finite weights: {len(bad)} of {len(state)} weight(s) contain NaN or "
            f"inf, the first {shown(name, 200)} ({count} value(s)); it cannot be used or unlearned (train it again or "
            "restore a good copy)")


def adapter_fit_problems(saved: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> list[str]:
    """What keeps saved adapter weights from fitting a model's (missing, unexpected, shape differences)."""
    problems = []
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing:
        problems.append(f"{len(missing)} weight(s) this model needs are absent, e.g. {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} saved weight(s) have no place in this model, e.g. "
                        f"{shown(unexpected[0], 200, quote=False)}")
    shape_diffs = [k for k in sorted(set(saved) & set(expected)) if saved[k] != expected[k]]
    if shape_diffs:
        k = shape_diffs[0]
        problems.append(f"{len(shape_diffs)} weight(s) differ in shape, e.g. {k}: saved {list(saved[k])}, "
                        f"this model needs {list(expected[k])}")
    return problems


def load_adapter(base: nn.Module, adapter_dir: str | Path, *, base_name: str = "the base model") -> nn.Module:
    """Load a peft adapter folder onto ``base`` as a trainable adapter, checking first that it fits.

    Raises :class:`AdapterMismatchError` naming the folder and the mismatch (missing/unexpected weights, shape
    differences, target modules absent from the base) instead of torch's size-mismatch traceback, and a
    :class:`ModelLoadError` naming the file or weight for an unreadable config or weights file, a peft type mmerase
    does not serve (:data:`PEFT_TYPES`) or NaN / inf weights.
    """
    from peft import PeftConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    adapter_dir = Path(adapter_dir)
    check_peft_type(adapter_dir, read_adapter_config(adapter_dir))  # also: the file is sound JSON
    try:
        config = PeftConfig.from_pretrained(str(adapter_dir))
    except Exception as exc:
        raise AdapterMismatchError(f"{adapter_dir / ADAPTER_CONFIG} cannot be read: {_first_line(exc)}") from exc
    config.inference_mode = False
    made_for = getattr(config, "base_model_name_or_path", None)
    made_for = shown(made_for, 300, quote=False) if isinstance(made_for, str) and made_for else "another model"
    state = read_adapter_weights(adapter_dir)
    check_finite_weights(adapter_dir, state)
    try:
        with warnings.catch_warnings():  # peft warns that base_model_name_or_path changes: the fit is checked below
            warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*was renamed")
            model = get_peft_model(base, config)
    except ValueError as exc:
        raise AdapterMismatchError(
            f"adapter {adapter_dir} does not fit {base_name}: its target modules are not in this model "
            f"({_first_line(exc)})") from exc
    except (TypeError, KeyError, AttributeError) as exc:  # a config value of the wrong type reaches a layer
        raise AdapterMismatchError(
            f"{adapter_dir / ADAPTER_CONFIG} does not describe an adapter peft can build on {base_name} "
            f"({type(exc).__name__}: {_first_line(exc)})") from exc
    saved = {k: tuple(v.shape) for k, v in state.items()}
    problems = adapter_fit_problems(saved, {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()})
    if problems:
        raise AdapterMismatchError(f"adapter {adapter_dir} (made for {made_for}) does not fit {base_name}: "
                                   + "; ".join(problems))
    upcast_trainable(model)  # before loading, so float32 weights are not rounded through bfloat16
    set_peft_model_state_dict(model, state)
    return model


def keep_checkpointing_in_products(model: nn.Module) -> int:
    """Flag gradient-checkpointed layers ``mmerase_keep_training`` so they stay checkpointed during products.

    transformers checkpoints a layer only while that layer is in training mode, and the influence engine puts the
    model in eval mode for products; the flag keeps the layer itself (not its dropout or attention submodules, which
    stay in eval mode) in training mode, so products save memory too. Returns how many layers were flagged.
    """
    count = 0
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True and hasattr(module, "_gradient_checkpointing_func"):
            module.mmerase_keep_training = True
            count += 1
    return count


HALF_DTYPES = (torch.float16, torch.bfloat16)


def upcast_trainable(model: nn.Module) -> int:
    """Keep trainable parameters in float32 when the base computes in float16/bfloat16.

    peft already creates LoRA weights in float32; a trainable copy of a base module (``modules_to_save``, e.g. a
    projector) would stay in half precision. Such modules get float32 weights, cast their inputs to float32 and
    their output back to the half dtype, so the frozen base around them is unchanged. Returns how many modules.
    """
    count = 0
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad and p.dtype in HALF_DTYPES]
        if not own:
            continue
        half = own[0].dtype
        for p in own:
            p.data = p.data.float()
        module.register_forward_pre_hook(
            lambda _m, args, kwargs: (tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a
                                            for a in args), kwargs), with_kwargs=True)
        module.register_forward_hook(
            lambda _m, _args, out, half=half: out.to(half) if torch.is_tensor(out) and out.is_floating_point()
            else out)
        count += 1
    return count


__all__ = [
    "AdapterMismatchError", "DTYPES", "FamilySpec", "LM_TARGETS", "LoadOptions", "LoraSettings", "ModelLoadError",
    "PEFT_TYPES", "TEXT_TARGETS", "adapter_fit_problems", "attach_lora", "check_finite_weights", "check_peft_type",
    "enable_gradient_checkpointing", "keep_checkpointing_in_products", "load_adapter", "load_base", "load_peft_model",
    "projector_module_names", "read_adapter_config", "read_adapter_weights", "saved_adapter_shapes",
    "upcast_trainable",
]
