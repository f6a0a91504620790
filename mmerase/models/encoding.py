"""Conversations → token ids and labels with the checkpoint's own chat template, and padded batches.

Every assistant turn is trained on: the template is rendered once per turn boundary and assistant spans are located
by character offsets, so the ids are exactly what the checkpoint's template and tokenizer give for the whole
conversation, and the labels are those ids inside assistant turns, through the turn's EOS token (-100 elsewhere;
an EOS is added where a template ends a turn without one). Image families render each image
as a typed ``{"type": "image"}`` content part, where the template writes its image token once; the family then
widens that token to the image's number of vision tokens (see :mod:`mmerase.models.vision`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmerase.data import IMAGE_PLACEHOLDER, Sample
from mmerase.fileio import shown
from mmerase.models.task import IGNORE_INDEX

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


class TemplateError(ValueError):
    """The checkpoint's chat template cannot be used to locate assistant turns (or image positions)."""


@dataclass
class Encoded:
    """One tokenised sample before padding (image tokens not yet widened)."""

    input_ids: list[int]
    labels: list[int]
    n_images: int = 0


def typed_parts(text: str) -> list[dict[str, Any]]:
    """A turn's text as chat-template content parts: each ``<image>`` placeholder becomes an image part where it
    stood; the whitespace that separates a placeholder from the text around it is dropped."""
    pieces = text.split(IMAGE_PLACEHOLDER)
    parts: list[dict[str, Any]] = []
    for k, piece in enumerate(pieces):
        if k > 0:
            parts.append({"type": "image"})
        if k > 0:
            piece = piece.lstrip()
        if k < len(pieces) - 1:
            piece = piece.rstrip()
        if piece or len(pieces) == 1:
            parts.append({"type": "text", "text": piece})
    return parts


def chat_template_of(*owners: Any) -> str:
    """The first chat template among ``owners`` (processor, tokenizer), else :data:`FALLBACK_CHAT_TEMPLATE`."""
    for owner in owners:
        tmpl = getattr(owner, "chat_template", None) if owner is not None else None
        if isinstance(tmpl, str) and tmpl:
            return tmpl
    return FALLBACK_CHAT_TEMPLATE


class ChatEncoder:
    """Encodes samples with one tokenizer and chat template; caches the text encoding of each conversation.

    ``image_token_id`` (image families) is the token the template writes once per image part; the encoder checks
    that each sample gets exactly one per image. ``typed`` renders content as typed parts (text and image entries),
    otherwise as plain strings (text-only templates).
    """

    def __init__(self, tokenizer: Any, template: str, *, image_token_id: int | None = None, typed: bool = True,
                 name: str = "") -> None:
        self.tokenizer, self.template, self.name = tokenizer, template, name
        self.image_token_id, self.typed = image_token_id, typed
        bos = tokenizer.bos_token_id
        ids = tokenizer("a", add_special_tokens=True)["input_ids"] if bos is not None else []
        self.adds_bos = bool(ids) and ids[0] == bos
        self._cache: dict[tuple, Encoded] = {}

    def messages(self, sample: Sample) -> list[dict[str, Any]]:
        """The sample as chat-template messages (``role``/``content``)."""
        if self.typed:
            return [{"role": role, "content": typed_parts(text)} for role, text in sample.messages]
        return [{"role": role, "content": text} for role, text in sample.messages]

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def encode(self, sample: Sample, for_generation: bool = False) -> Encoded:
        """Token ids and labels of one sample (labels: the assistant turns' tokens, -100 elsewhere).

        An EOS token is added after an assistant turn whose template does not end it with one, so that the model
        learns to stop. ``for_generation`` encodes the prompt up to the last assistant turn.
        """
        key = (tuple((t["from"], t["value"]) for t in sample.conversations), for_generation)
        enc = self._cache.get(key)
        if enc is None:
            enc = self._encode(sample, for_generation)
            self._cache[key] = enc
        return enc

    def assistant_spans(self, sample: Sample, messages: list[dict[str, Any]], text: str) -> list[tuple[int, int]]:
        """Character spans of the assistant turns in the rendered ``text``."""
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1], add_generation_prompt=False)
            if not (upto.startswith(prefix) and text.startswith(upto)):
                raise TemplateError(
                    f"the chat template of {self.name!r} renders conversation prefixes inconsistently "
                    f"(sample {shown(sample.id)}, turn {i}), so assistant turns cannot be located; pass a template "
                    "whose rendering of a prefix of a conversation is a prefix of the whole")
            spans.append((len(prefix), self.turn_end(text, len(prefix), len(upto))))
        return spans

    def turn_end(self, text: str, start: int, end: int) -> int:
        """Where an assistant turn's trained text ends: right after its last EOS (the template's end-of-turn
        token) when it has one, so a separator the template writes after EOS is not trained on."""
        eos = self.tokenizer.eos_token
        cut = text.rfind(eos, start, end) if eos else -1
        return end if cut < 0 else cut + len(eos)

    def _encode(self, sample: Sample, for_generation: bool) -> Encoded:
        messages = self.messages(sample)
        if for_generation:
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            text, spans = self.render(messages[:last], add_generation_prompt=True), []
        else:
            text = self.render(messages, add_generation_prompt=False)
            spans = self.assistant_spans(sample, messages, text)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, labels = self._label(text, enc["input_ids"], enc["offset_mapping"], spans)
        n_images = 0 if self.image_token_id is None else sum(1 for t in ids if t == self.image_token_id)
        if self.image_token_id is not None and n_images != sample.image_count:
            raise TemplateError(
                f"sample {shown(sample.id)}: the chat template produced {n_images} image token(s) for "
                f"{sample.image_count} image(s); it must emit the image token once per image part")
        return Encoded(ids, labels, n_images)

    def _label(self, text: str, ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]],
               ) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        out_ids: list[int] = []
        labels: list[int] = []
        if self.adds_bos and (not ids or ids[0] != tok.bos_token_id):
            out_ids.append(tok.bos_token_id)
            labels.append(IGNORE_INDEX)
        span_idx = 0
        for t, (start, _end) in zip(ids, offsets):
            while span_idx < len(spans) and start >= spans[span_idx][1]:
                self._close_span(text, spans[span_idx], out_ids, labels)
                span_idx += 1
            inside = span_idx < len(spans) and spans[span_idx][0] <= start < spans[span_idx][1]
            out_ids.append(t)
            labels.append(t if inside else IGNORE_INDEX)
        while span_idx < len(spans):
            self._close_span(text, spans[span_idx], out_ids, labels)
            span_idx += 1
        return out_ids, labels

    def _close_span(self, text: str, span: tuple[int, int], ids: list[int], labels: list[int]) -> None:
        """Append EOS (trained) after an assistant span whose rendered text does not end the turn with EOS."""
        eos = self.tokenizer.eos_token
        if eos is None or eos in text[span[0]: span[1]]:
            return
        ids.append(self.tokenizer.eos_token_id)
        labels.append(self.tokenizer.eos_token_id)


def pad_rows(rows: Sequence[tuple[list[int], list[int]]], pad_token_id: int, *, left: bool = False,
             ) -> dict[str, torch.Tensor]:
    """(ids, labels) rows → ``input_ids``, ``attention_mask``, ``labels`` padded to the longest row (CPU tensors).

    Training batches are right-padded, generation prompts left-padded (``left``).
    """
    length = max(len(ids) for ids, _ in rows)
    b = len(rows)
    input_ids = torch.full((b, length), pad_token_id, dtype=torch.long)
    labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((b, length), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        n = len(ids)
        sl = slice(length - n, length) if left else slice(0, n)
        input_ids[i, sl] = torch.tensor(ids, dtype=torch.long)
        labels[i, sl] = torch.tensor(lab, dtype=torch.long)
        attention[i, sl] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


__all__ = ["ChatEncoder", "Encoded", "FALLBACK_CHAT_TEMPLATE", "TemplateError", "chat_template_of", "pad_rows",
           "typed_parts"]
