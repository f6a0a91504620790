"""The one interface every model family implements, so the influence engine never knows which family it serves.

A :class:`ModelBundle` holds a peft model (base frozen, adapter trainable) plus what turns :class:`~mmerase.data.Sample`
objects into batches and answers:

- ``bundle.model``: the ``PeftModel`` (the engine's ``model``; trainable parameters = the adapter),
- ``bundle.collate(samples) -> batch``: the engine's ``collate_fn``,
- ``bundle.loss_fn``: a :class:`CausalLMTask` (the engine's ``loss_fn``; mean over samples of each sample's mean
  response-token cross-entropy),
- ``bundle.generate(samples)``: batched greedy answers, ``bundle.save_adapter(dir)``: peft adapter folder.

Families differ only in how a conversation is rendered and how images enter the batch (:mod:`.llava`, :mod:`.text`).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mmerase.data import IMAGE_PLACEHOLDER, DataError, Sample
from mmerase.influence.task import Task
from mmerase.options import option
from mmerase.models.exact import keep_norms_in_dtype, register_exact_attention, supports_exact_float64
from mmerase.utils import model_device, move_to

IGNORE_INDEX = -100

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Used when a checkpoint has no chat template (e.g. a base LM): LLaVA-1.5 style "USER: ... ASSISTANT: ...".
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] if m['content'] is string else m['content'][0]['text'] }}\n"
    "{% else %}{{ m['role'].upper() }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>\n{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


class ModelLoadError(ValueError):
    """A base model or adapter cannot be loaded as asked (bad path, unsupported family, bad option)."""


class AdapterMismatchError(ModelLoadError):
    """An adapter folder does not fit the base model it is being loaded onto."""


class TemplateError(ValueError):
    """The checkpoint's chat template cannot be used to locate assistant turns."""


@dataclass
class LoraSettings:
    """A new LoRA adapter (peft ``LoraConfig`` fields plus what mmerase adds).

    ``target_modules=None`` means the family's default: the language model's attention and MLP projections only
    (never the vision tower). ``train_projector`` makes a LLaVA projector trainable (peft ``modules_to_save``).
    ``seed`` fixes the adapter's initialisation.
    """

    r: int = option(8, flag="--lora-r", help="LoRA rank")
    alpha: float = option(16.0, flag="--lora-alpha", help="LoRA alpha (the update is scaled by alpha / r)")
    dropout: float = option(0.0, flag="--lora-dropout", help="LoRA dropout")
    target_modules: list[str] | str | None = option(None, flag="--lora-targets", parse=str, help=(
        "regex of modules to adapt (default: the language model's projections, never the vision tower)"))
    train_projector: bool = option(False, help="also train the multimodal projector (peft modules_to_save)")
    modules_to_save: list[str] | None = option(None, cli=False, help="other modules trained in full")
    seed: int = option(0, help="seed of the adapter's initialisation and of the data order")


@dataclass
class LoadOptions:
    """How to load a base model.

    ``exact_hvp`` forces eager attention (SDPA/flash kernels have no double backward, so exact Hessian-vector
    products need eager; asking for another kernel with ``exact_hvp`` is an error, and the engine refuses exact
    products on a model loaded with one); the workflows set it from the solve's plan. ``gradient_checkpointing`` is
    non-reentrant (double backward works through it) and stays active during the engine's products (the
    checkpointed layers keep training mode there, see :func:`keep_checkpointing_in_products`).
    ``quantization="nf4"`` loads the base's linear layers 4-bit through bitsandbytes (compute in ``dtype``), made
    product-ready by :func:`mmerase.models.quant.prepare_4bit`. ``device=None`` picks the current CUDA device when
    available.
    """

    dtype: str = option("float32", choices=tuple(DTYPES), help="dtype of the model and adapter")
    quantization: str | None = option(None, choices=("nf4",), alias=("--load-in-4bit", "nf4"), help=(
        "load the base quantized: nf4 (4-bit, bitsandbytes; needs a CUDA device or bitsandbytes' CPU backend); "
        "the adapter stays in --dtype"))
    exact_hvp: bool = option(True, cli=False, help="eager attention, for products that need a double backward")
    attn_implementation: str | None = option(None, cli=False, help="the attention kernel transformers loads")
    device: str | None = option(None, help="cpu, cuda, cuda:1 … (default: cuda when available)")
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


def _response_targets(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits predicting each next token, upcast from half precision; the next tokens; where they are response
    tokens). Refuses a sample without response tokens."""
    logits = logits[:, :-1]
    target = labels[:, 1:].to(logits.device)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    mask = target != IGNORE_INDEX
    if bool((mask.sum(dim=1) == 0).any()):
        raise ValueError("a sample in the batch has no response tokens to score (all labels are -100)")
    return logits, target, mask


def _token_nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="none").view(target.shape)


def per_sample_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sample's L(z): the mean cross-entropy over its response tokens (labels != -100), shape ``[batch]``.

    Logits at position t predict the label at t+1. Half-precision logits are upcast to float32 for the loss.
    """
    logits, target, mask = _response_targets(logits, labels)
    nll = _token_nll(logits, target)
    return nll.sum(dim=1) / mask.sum(dim=1).to(nll.dtype)


def sequence_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sample's log π(y|x): the sum of its response tokens' log-probabilities, shape ``[batch]``."""
    logits, target, _ = _response_targets(logits, labels)
    return -_token_nll(logits, target).sum(dim=1)


def per_sample_kl(reference: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sample's mean over its response positions of KL(softmax(reference) ‖ softmax(logits)), shape
    ``[batch]``: how far the next-token distributions moved from the reference's where the answer is predicted."""
    logits, _, mask = _response_targets(logits, labels)
    ref = reference[:, :-1].to(logits.dtype)
    log_q = torch.log_softmax(logits, dim=-1)
    log_p = torch.log_softmax(ref, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    m = mask.to(kl.dtype)
    return (kl * m).sum(dim=1) / m.sum(dim=1)


class CausalLMTask(Task):
    """The loss for every family: ``outputs`` = logits, ``loss_from_outputs`` = mean over samples of L(z).

    The batch loss is the **mean over samples of each sample's mean response-token cross-entropy**, not the mean
    over all response tokens pooled across the batch: a batch of a 2-token and a 10-token answer weighs both samples
    equally, so R(θ) = (1/n) Σ L(z_i) whatever the batching (DESIGN.md §1).
    """

    def __init__(self, pixel_dtype: torch.dtype | None = None) -> None:
        self.pixel_dtype = pixel_dtype

    def model_inputs(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = move_to(batch, model_device(model))
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        if batch.get("pixel_values") is not None:
            pv = batch["pixel_values"]
            inputs["pixel_values"] = pv if self.pixel_dtype is None else pv.to(self.pixel_dtype)
        return inputs

    def outputs(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**self.model_inputs(model, batch), use_cache=False).logits

    def loss_from_outputs(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return per_sample_losses(outputs, batch["labels"]).mean()

    def per_sample_losses(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """L(z) for each sample of ``batch``, shape ``[batch]``."""
        return per_sample_losses(self.outputs(model, batch), batch["labels"])

    def sequence_log_probs(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """log π(y|x) of each sample's response (sum over its tokens), shape ``[batch]``."""
        return sequence_log_probs(outputs, batch["labels"])

    def per_sample_kl(self, reference: torch.Tensor, outputs: torch.Tensor, batch: dict[str, torch.Tensor]
                      ) -> torch.Tensor:
        """Each sample's mean response-position KL(reference ‖ outputs) of the next-token distributions."""
        return per_sample_kl(reference, outputs, batch["labels"])

    def label_count(self, batch: dict[str, torch.Tensor]) -> int:
        """The response tokens of a one-sample batch: the independent targets its mean loss averages (see
        :meth:`Task.label_count`)."""
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def sample_targets(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor],
                       generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """Copy of ``batch`` whose response tokens are drawn from the model's softmax (sampled-label Fisher)."""
        labels = batch["labels"]
        logits = outputs[:, :-1].detach().float()
        probs = torch.softmax(logits, dim=-1).reshape(-1, logits.shape[-1])
        draws = torch.multinomial(probs.cpu(), 1, generator=generator).view(logits.shape[:2]).to(labels.device)
        new = labels.clone()
        mask = labels[:, 1:] != IGNORE_INDEX
        new[:, 1:] = torch.where(mask, draws, labels[:, 1:])
        return {**batch, "labels": new}


@dataclass
class Encoded:
    """One tokenised sample before padding."""

    input_ids: list[int]
    labels: list[int]
    image: Any = None
    n_images: int = 0


class ModelBundle:
    """A loaded base + peft adapter and everything needed to feed it samples (see module docstring).

    Subclasses set :attr:`family`, :meth:`_auto_model_class`, :meth:`_to_messages`, and for images
    :meth:`_pixel_values` / :attr:`image_token_id`.
    """

    family: ClassVar[str] = "base"
    #: peft regex matching the language model's projections (default LoRA targets)
    default_target_modules: ClassVar[str] = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    projector_modules: ClassVar[list[str]] = []
    quant_skip_modules: ClassVar[list[str]] = ["lm_head"]
    supports_images: ClassVar[bool] = False

    def __init__(self, model: nn.Module, tokenizer: Any, processor: Any = None, *, base_path: str | Path = "",
                 options: LoadOptions | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor
        self.base_path = str(base_path)
        self.options = options or LoadOptions()
        self.compute_dtype = self.options.torch_dtype()
        self.loss_fn = CausalLMTask(pixel_dtype=self.compute_dtype if self.supports_images else None)
        self.pad_token_id = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
        self._template = self._chat_template()
        self._adds_bos = self._tokenizer_adds_bos()
        self._cache: dict[tuple, Encoded] = {}

    # ---- loading ----------------------------------------------------------------------------------------------

    @classmethod
    def _auto_model_class(cls) -> Any:
        raise NotImplementedError

    @classmethod
    def _load_processor(cls, path: str, options: LoadOptions) -> tuple[Any, Any]:
        """(tokenizer, processor-or-None) of the checkpoint."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, local_files_only=options.local_files_only)
        return tok, None

    @classmethod
    def load(cls, path: str | Path, *, adapter: str | Path | None = None, lora: LoraSettings | None = None,
             options: LoadOptions | None = None) -> "ModelBundle":
        """Load the base at ``path``, then load the peft ``adapter`` folder or attach a new LoRA (``lora``)."""
        options = options or LoadOptions()
        if adapter is not None and lora is not None:
            raise ModelLoadError("give either an adapter folder to load or LoRA settings for a new adapter, not both")
        path = str(path)
        tokenizer, processor = cls._load_processor(path, options)
        base = cls._load_base(path, options)
        dtype = options.torch_dtype()
        if adapter is not None:
            model = load_adapter(base, adapter, base_name=path)
        else:
            model = cls._attach_lora(base, lora or LoraSettings())
            upcast_trainable(model)
        if dtype == torch.float64:  # peft creates adapters in float32; keep everything float64 for exact checks
            model.to(torch.float64)
        if options.gradient_checkpointing:  # non-reentrant: the only kind that supports double backward
            base = model.get_base_model()
            if hasattr(base, "activation_checkpointing_enable"):  # transformers ≥ 5.2x name
                base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
            keep_checkpointing_in_products(model)
        return cls(model, tokenizer, processor, base_path=path, options=options)

    @classmethod
    def _load_base(cls, path: str, options: LoadOptions) -> nn.Module:
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
            if options.quantization != "nf4":
                raise ModelLoadError(f"unknown quantization {options.quantization!r}; the supported one is 'nf4'")
            if dtype == torch.float64:
                raise ModelLoadError("nf4 quantization computes in float32/bfloat16; use dtype='float32' or 'bfloat16'")
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                llm_int8_skip_modules=list(cls.quant_skip_modules))
            kwargs["device_map"] = {"": device.index if device.type == "cuda" and device.index is not None
                                    else str(device)}
        try:
            model = cls._auto_model_class().from_pretrained(path, **kwargs)
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

    @classmethod
    def _attach_lora(cls, base: nn.Module, lora: LoraSettings) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        modules_to_save = list(lora.modules_to_save or [])
        if lora.train_projector:
            if not cls.projector_modules:
                raise ModelLoadError(f"model family {cls.family!r} has no projector to train")
            modules_to_save += [m for m in cls.projector_modules if m not in modules_to_save]
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=lora.target_modules or cls.default_target_modules,
                            modules_to_save=modules_to_save or None, task_type="CAUSAL_LM", bias="none")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(lora.seed)
            try:
                return get_peft_model(base, config)
            except ValueError as exc:
                raise ModelLoadError(f"cannot attach LoRA (target_modules={config.target_modules!r}): {exc}") from exc

    # ---- encoding ---------------------------------------------------------------------------------------------

    def _chat_template(self) -> str:
        for owner in (self.processor, self.tokenizer):
            tmpl = getattr(owner, "chat_template", None) if owner is not None else None
            if isinstance(tmpl, str) and tmpl:
                return tmpl
        return FALLBACK_CHAT_TEMPLATE

    def _tokenizer_adds_bos(self) -> bool:
        bos = self.tokenizer.bos_token_id
        if bos is None:
            return False
        ids = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        return bool(ids) and ids[0] == bos

    def _to_messages(self, sample: Sample) -> list[dict[str, Any]]:
        """The sample as chat-template messages (``role``/``content``)."""
        raise NotImplementedError

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self._template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def encode(self, sample: Sample, for_generation: bool = False) -> Encoded:
        """Token ids and labels of one sample (labels: the assistant turns' tokens, -100 elsewhere).

        Every assistant turn is trained on. The template is rendered once per turn boundary and assistant spans are
        located by character offsets, so the ids are exactly what the checkpoint's template + tokenizer give for the
        whole conversation. An EOS token is added after an assistant turn whose template does not end it with one,
        so that the model learns to stop. ``for_generation`` encodes the prompt up to the last assistant turn.
        """
        if sample.has_image and not self.supports_images:
            raise DataError(f"sample '{sample.id}' has an image but model family {self.family!r} is text-only")
        key = (tuple((t["from"], t["value"]) for t in sample.conversations), sample.has_image, for_generation)
        enc = self._cache.get(key)
        if enc is None:
            enc = self._encode_text(sample, for_generation)
            self._cache[key] = enc
        image = sample.load_image() if sample.has_image else None
        return Encoded(enc.input_ids, enc.labels, image, enc.n_images)

    def _encode_text(self, sample: Sample, for_generation: bool) -> Encoded:
        messages = self._to_messages(sample)
        roles = [m["role"] for m in messages]
        assistant_turns = [i for i, r in enumerate(roles) if r == "assistant"]
        eos = self.tokenizer.eos_token
        if for_generation:
            text = self._render(messages[: assistant_turns[-1]], add_generation_prompt=True)
            spans: list[tuple[int, int]] = []
        else:
            text = self._render(messages, add_generation_prompt=False)
            spans = []
            for i in assistant_turns:
                prefix = self._render(messages[:i], add_generation_prompt=True)
                upto = self._render(messages[: i + 1], add_generation_prompt=False)
                if not (upto.startswith(prefix) and text.startswith(upto)):
                    raise TemplateError(
                        f"the chat template of {self.base_path!r} renders conversation prefixes inconsistently "
                        f"(sample '{sample.id}', turn {i}), so assistant turns cannot be located; pass a template "
                        "whose rendering of a prefix of a conversation is a prefix of the whole")
                spans.append((len(prefix), len(upto)))
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        out_ids: list[int] = []
        labels: list[int] = []
        if self._adds_bos and (not ids or ids[0] != self.tokenizer.bos_token_id):
            out_ids.append(self.tokenizer.bos_token_id)
            labels.append(IGNORE_INDEX)
        span_idx = 0
        for tok, (start, end) in zip(ids, offsets):
            while span_idx < len(spans) and start >= spans[span_idx][1]:
                self._close_span(text, spans[span_idx], out_ids, labels, eos)
                span_idx += 1
            inside = span_idx < len(spans) and spans[span_idx][0] <= start < spans[span_idx][1]
            out_ids.append(tok)
            labels.append(tok if inside else IGNORE_INDEX)
        while span_idx < len(spans):
            self._close_span(text, spans[span_idx], out_ids, labels, eos)
            span_idx += 1
        n_images = 0
        if self.supports_images:
            n_images = sum(1 for t in out_ids if t == self.image_token_id)
            if n_images != (1 if sample.has_image else 0):
                raise TemplateError(
                    f"sample '{sample.id}': the chat template produced {n_images} image token(s) "
                    f"for {int(sample.has_image)} image; it must emit {IMAGE_PLACEHOLDER} once per image part")
        return Encoded(out_ids, labels, None, n_images)

    def _close_span(self, text: str, span: tuple[int, int], ids: list[int], labels: list[int], eos: str | None) -> None:
        """Append EOS (trained) after an assistant span whose rendered text does not end the turn with EOS."""
        if eos is None or eos in text[span[0]: span[1]]:
            return
        ids.append(self.tokenizer.eos_token_id)
        labels.append(self.tokenizer.eos_token_id)

    # images (overridden by families that take images)
    image_token_id: int | None = None

    def _pixel_values(self, images: list[Any]) -> torch.Tensor:
        raise NotImplementedError

    def _expand_image_tokens(self, ids: list[int], labels: list[int], pixel_values: torch.Tensor | None,
                             ) -> tuple[list[int], list[int]]:
        return ids, labels

    # ---- batches ----------------------------------------------------------------------------------------------

    def collate(self, samples: Sequence[Sample], *, for_generation: bool = False) -> dict[str, torch.Tensor]:
        """Samples → padded batch dict (``input_ids``, ``attention_mask``, ``position_ids``, ``labels`` and, when
        some sample has an image, ``pixel_values`` for those samples in order).

        Training batches are right-padded, generation prompts left-padded; ``position_ids`` count real tokens only,
        so padding never changes a sample's loss or answer.
        """
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        encoded = [self.encode(s, for_generation) for s in samples]
        images = [e.image for e in encoded if e.image is not None]
        pixel_values = self._pixel_values(images) if images else None
        rows = [self._expand_image_tokens(e.input_ids, e.labels, pixel_values) for e in encoded]
        length = max(len(ids) for ids, _ in rows)
        b = len(rows)
        input_ids = torch.full((b, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((b, length), dtype=torch.long)
        for i, (ids, lab) in enumerate(rows):
            n = len(ids)
            sl = slice(length - n, length) if for_generation else slice(0, n)
            input_ids[i, sl] = torch.tensor(ids, dtype=torch.long)
            labels[i, sl] = torch.tensor(lab, dtype=torch.long)
            attention[i, sl] = 1
        position_ids = (attention.cumsum(dim=1) - 1).clamp_min(0)
        batch = {"input_ids": input_ids, "attention_mask": attention, "position_ids": position_ids, "labels": labels}
        if pixel_values is not None:
            batch["pixel_values"] = pixel_values.to(self.compute_dtype)
        return batch

    def batches(self, samples: Sequence[Sample], batch_size: int) -> list[list[Sample]]:
        return [list(samples[i: i + batch_size]) for i in range(0, len(samples), batch_size)]

    # ---- conveniences -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def per_sample_losses(self, samples: Sequence[Sample], batch_size: int = 8) -> torch.Tensor:
        """L(z) of each sample under the current adapter (float64 CPU tensor, one entry per sample)."""
        was_training = self.model.training
        self.model.eval()
        try:
            out = [self.loss_fn.per_sample_losses(self.model, self.collate(chunk)).double().cpu()
                   for chunk in self.batches(samples, batch_size)]
        finally:
            self.model.train(was_training)
        return torch.cat(out)

    def feature_cache(self) -> Any:
        """A cache of frozen features for the influence engine (``.collate``/``.loss_fn`` replace the bundle's), or
        ``None`` when the family has nothing frozen worth caching (text models; see :mod:`.feature_cache`)."""
        return None

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The adapter (what the engine edits): ``{name: parameter}`` with ``requires_grad=True``."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def generate(self, samples: Sequence[Sample], *, max_new_tokens: int = 16, batch_size: int = 8,
                 progress: bool | None = None) -> list[str]:
        """Greedy answers to each sample's last user turn (batched, left-padded), special tokens stripped."""
        from mmerase.generation import generate_answers

        return generate_answers(self, samples, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                progress=progress)

    def save_adapter(self, out_dir: str | Path) -> Path:
        """Write the adapter as a peft folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(out_dir), safe_serialization=True)
        return out_dir


# ---- adapters ---------------------------------------------------------------------------------------------------

def _saved_adapter_shapes(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    weights = adapter_dir / "adapter_model.safetensors"
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    legacy = adapter_dir / "adapter_model.bin"
    if legacy.is_file():
        state = torch.load(legacy, map_location="cpu", weights_only=True)
        return {k: tuple(v.shape) for k, v in state.items()}
    raise AdapterMismatchError(f"adapter folder {adapter_dir} has no adapter_model.safetensors (or .bin) weights")


def load_adapter(base: nn.Module, adapter_dir: str | Path, *, base_name: str = "the base model") -> nn.Module:
    """Load a peft adapter folder onto ``base`` as a trainable adapter, checking first that it fits.

    Raises :class:`AdapterMismatchError` naming the folder and the mismatch (missing/unexpected weights, shape
    differences, target modules absent from the base) instead of torch's size-mismatch traceback.
    """
    from peft import PeftConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise AdapterMismatchError(f"{adapter_dir} is not a peft adapter folder (no adapter_config.json)")
    try:
        config = PeftConfig.from_pretrained(str(adapter_dir))
    except Exception as exc:
        raise AdapterMismatchError(f"{adapter_dir}/adapter_config.json cannot be read: {exc}") from exc
    config.inference_mode = False
    made_for = getattr(config, "base_model_name_or_path", None) or "another model"
    saved = _saved_adapter_shapes(adapter_dir)
    try:
        with warnings.catch_warnings():  # peft warns that base_model_name_or_path changes: the fit is checked below
            warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*was renamed")
            model = get_peft_model(base, config)
    except ValueError as exc:
        raise AdapterMismatchError(
            f"adapter {adapter_dir} does not fit {base_name}: its target modules are not in this model ({exc})"
        ) from exc
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    problems = []
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing:
        problems.append(f"{len(missing)} weight(s) this model needs are absent, e.g. {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} saved weight(s) have no place in this model, e.g. {unexpected[0]}")
    shape_diffs = [k for k in sorted(set(saved) & set(expected)) if saved[k] != expected[k]]
    if shape_diffs:
        k = shape_diffs[0]
        problems.append(f"{len(shape_diffs)} weight(s) differ in shape, e.g. {k}: saved {list(saved[k])}, "
                        f"this model needs {list(expected[k])}")
    if problems:
        raise AdapterMismatchError(f"adapter {adapter_dir} (made for {made_for}) does not fit {base_name}: "
                                   + "; ".join(problems))
    from safetensors.torch import load_file

    weights = adapter_dir / "adapter_model.safetensors"
    state = load_file(str(weights)) if weights.is_file() else torch.load(
        adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True)
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


_HALF = (torch.float16, torch.bfloat16)


def upcast_trainable(model: nn.Module) -> int:
    """Keep trainable parameters in float32 when the base computes in float16/bfloat16.

    peft already creates LoRA weights in float32; a trainable copy of a base module (``modules_to_save``, e.g. the
    LLaVA projector) would stay in half precision. Such modules get float32 weights, cast their inputs to float32
    and their output back to the half dtype, so the frozen base around them is unchanged. Returns how many modules.
    """
    count = 0
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad and p.dtype in _HALF]
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


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """The adapter folder's ``adapter_config.json`` as a dict."""
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterMismatchError(f"{adapter_dir} is not a peft adapter folder (no adapter_config.json)") from None


__all__ = [
    "AdapterMismatchError", "CausalLMTask", "Encoded", "IGNORE_INDEX", "LoadOptions", "LoraSettings", "ModelBundle",
    "ModelLoadError", "TemplateError", "load_adapter", "per_sample_kl", "per_sample_losses", "read_adapter_config",
    "sequence_log_probs",
]
