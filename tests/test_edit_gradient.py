"""b on real tiny models, against an independent computation: per-sample autograd gradients of the documented loss
(the mean cross-entropy over a sample's response tokens, written out here from the model's logits), in float64.

b = −(1/n) Σ_E [∇L(z_new) − ∇L(z_old)]: a sign error, a missing 1/n or a mix-up of the old and new sides in the
engine makes these tests fail (they are the tiny-model tests that pin b down; the solve tests build their reference
b with the engine itself).
"""

from __future__ import annotations

import pytest
import torch
from lora_points import perturb_lora_b

from mmerase import Edit, InfluenceEngine
from mmerase.data import Sample, digit_samples, modify_sample
from mmerase.models import LoadOptions, LoraSettings, load_model

F64 = LoadOptions(dtype="float64", device="cpu")


def _text(i: int, answer: str) -> Sample:
    return Sample(f"t{i}", [{"from": "human", "value": f"Spell {i}"}, {"from": "gpt", "value": answer}])


def _setup(family: str, path):
    bundle = load_model(path, lora=LoraSettings(r=2, seed=1), options=F64)
    perturb_lora_b(bundle.model, seed=3)
    if family == "llava":
        train = digit_samples(range(5))
        new = digit_samples([40])[0]
    else:
        train = [_text(i, w) for i, w in enumerate(["zero", "one", "two", "three", "four"])]
        new = _text(9, "nine")
    edits = [Edit(old=train[0]),                                          # remove
             Edit(old=train[1], new=modify_sample(train[1], response="seven")),  # correct
             Edit(new=new)]                                               # add
    return bundle, train, edits


def _hand_loss(bundle, sample: Sample) -> torch.Tensor:
    """L(z) from the model's logits: mean over response tokens (labels ≠ −100) of −log softmax at the next token."""
    batch = bundle.collate([sample])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    if "pixel_values" in batch:
        inputs["pixel_values"] = batch["pixel_values"].to(torch.float64)
    logits = bundle.model(**inputs).logits[0].to(torch.float64)
    labels = batch["labels"][0]
    total, count = torch.zeros((), dtype=torch.float64), 0
    for t in range(1, labels.shape[0]):
        if int(labels[t]) != -100:
            total = total - torch.log_softmax(logits[t - 1], dim=-1)[int(labels[t])]
            count += 1
    assert count > 0
    return total / count


@pytest.mark.parametrize("family", ["llava", "llama"])
def test_b_equals_per_sample_autograd_gradients(family, tiny_llava_dir, tiny_llama_dir):
    bundle, train, edits = _setup(family, tiny_llava_dir if family == "llava" else tiny_llama_dir)
    bundle.model.eval()
    params = [p for p in bundle.model.parameters() if p.requires_grad]
    engine = InfluenceEngine(bundle.model, bundle.loss_fn, train, collate_fn=bundle.collate)
    b = engine.edit_gradient(edits, batch_size=2)

    expected = [torch.zeros_like(p) for p in params]
    for e in edits:
        for sample, sign in ((e.new, -1.0), (e.old, 1.0)):  # b = −(1/n) Σ [∇L(new) − ∇L(old)]
            if sample is None:
                continue
            grads = torch.autograd.grad(_hand_loss(bundle, sample), params)
            for acc, g in zip(expected, grads):
                acc.add_(g, alpha=sign / len(train))
    num = sum(float((x - y).square().sum()) for x, y in zip(b, expected)) ** 0.5
    den = sum(float(y.square().sum()) for y in expected) ** 0.5
    assert den > 1e-6  # a real, non-degenerate b
    assert num / den < 1e-10
