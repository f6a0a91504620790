"""Batched greedy answer generation for any :class:`~mmerase.models.base.ModelBundle`."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from mmerase.data import Sample
from mmerase.utils import model_device


def progress_enabled(progress: bool | None) -> bool:
    """``None`` → show progress only when stderr is a terminal."""
    return sys.stderr.isatty() if progress is None else bool(progress)


@torch.no_grad()
def generate_answers(bundle: Any, samples: Sequence[Sample], *, max_new_tokens: int = 16, batch_size: int = 8,
                     progress: bool | None = None) -> list[str]:
    """Greedy answers to each sample's last user turn (earlier turns are context), one string per sample.

    Prompts are left-padded so that every row's new tokens start at the same column; the attention mask and
    position ids make each answer independent of its batch-mates. Special tokens are stripped from the answers.
    """
    if int(batch_size) < 1 or int(max_new_tokens) < 1:  # a batch size < 1 would answer nothing, silently
        raise ValueError(f"batch_size and max_new_tokens must be ≥ 1, got {batch_size} and {max_new_tokens}")
    model = bundle.model
    was_training = model.training
    model.eval()
    tok = bundle.tokenizer
    answers: list[str] = []
    device = model_device(model)
    chunks = bundle.batches(list(samples), batch_size)
    try:
        for chunk in tqdm(chunks, desc="generate", unit="batch", disable=not progress_enabled(progress)):
            batch = bundle.collate(chunk, for_generation=True)
            inputs = bundle.loss_fn.model_inputs(model, batch)
            inputs.pop("position_ids", None)  # generate() derives them from the attention mask at every step
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 eos_token_id=tok.eos_token_id, pad_token_id=bundle.pad_token_id)
            new = out[:, batch["input_ids"].shape[1]:].to(device)
            answers += [a.strip() for a in tok.batch_decode(new, skip_special_tokens=True)]
    finally:
        model.train(was_training)
    return answers
