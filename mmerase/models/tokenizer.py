"""The tiny presets' byte-level tokenizer and chat templates (built locally, nothing downloaded).

One token per UTF-8 byte (256) plus special tokens, so any text encodes. The LLaVA-style presets use role markers
and an ``<image>`` token; the Qwen-VL presets use a ChatML-style layout (``<|im_start|>role … <|im_end|>``) in which an
image part is written ``<|vision_start|><|image_pad|><|vision_end|>``, the layout Qwen-VL checkpoints use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<image>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

#: role markers are special tokens; an assistant turn ends with EOS, other turns with <|end|>
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>\n{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

#: the Qwen-VL presets' special tokens (after the 256 bytes, in this order)
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"]

#: ChatML-style turns; each image part is <|vision_start|><|image_pad|><|vision_end|>, assistant turns end with
#: <|im_end|> (the EOS)
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_byte_tokenizer(chat_template: str = TINY_CHAT_TEMPLATE, special_tokens: Sequence[str] = SPECIAL_TOKENS,
                         *, bos: str | None = "<s>", eos: str = "</s>", pad: str = "<pad>",
                         extra: dict[str, str] | None = None) -> Any:
    """A byte-level ``PreTrainedTokenizerFast``: one token per UTF-8 byte (256) plus ``special_tokens``.

    The defaults give the LLaVA-style presets' tokenizer (``<image>`` is its image token); ``extra`` names further
    special tokens (e.g. ``{"image_token": "<|image_pad|>"}``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=ord)
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(special_tokens))
    named = {"bos_token": bos, "eos_token": eos, "pad_token": pad}
    return PreTrainedTokenizerFast(tokenizer_object=core, **{k: v for k, v in named.items() if v is not None},
                                   extra_special_tokens=extra if extra is not None else {"image_token": "<image>"},
                                   chat_template=chat_template)


def build_qwen_tokenizer() -> Any:
    """The Qwen-VL presets' byte-level tokenizer (no BOS; EOS ``<|im_end|>``; image token ``<|image_pad|>``)."""
    return build_byte_tokenizer(QWEN_CHAT_TEMPLATE, QWEN_SPECIAL_TOKENS, bos=None, eos="<|im_end|>",
                                pad="<|endoftext|>", extra={"image_token": "<|image_pad|>",
                                                            "video_token": "<|video_pad|>",
                                                            "vision_bos_token": "<|vision_start|>",
                                                            "vision_eos_token": "<|vision_end|>"})


__all__ = ["QWEN_CHAT_TEMPLATE", "QWEN_SPECIAL_TOKENS", "SPECIAL_TOKENS", "TINY_CHAT_TEMPLATE",
           "build_byte_tokenizer", "build_qwen_tokenizer"]
