"""Fine-tuning: the tiny LLaVA learns real digit images; runs are deterministic; adapters save and reload."""

import sys

import pytest
import torch

from mmerase.data import digit_samples
from mmerase.generation import progress_enabled
from mmerase.models import LoadOptions, LoraSettings, load_model
from mmerase.training import TrainConfig, _lr_factor, finetune, train, train_adapter

CPU = LoadOptions(device="cpu")


def test_tiny_llava_learns_digits_with_lora(tiny_llava_dir, tmp_path):
    """LoRA (LM projections) + trainable projector on 500 scikit-learn digits: held-out answers far above chance.

    Measured on CPU (seeds 0-3): held-out accuracy 0.56-0.62 after 6 epochs (~7 s); chance is 0.1.
    """
    train_set = digit_samples(range(500))
    held_out = digit_samples(range(1500, 1700))
    bundle = load_model(tiny_llava_dir, lora=LoraSettings(r=8, alpha=16, train_projector=True), options=CPU)
    result = finetune(bundle, train_set, TrainConfig(epochs=6, batch_size=16, lr=3e-3, seed=0, progress=False),
                      output_dir=tmp_path / "adapter")
    assert result.steps == 6 * 32 and len(result.epoch_losses) == 6
    assert result.epoch_losses[0] > 1.5 and result.epoch_losses[-1] < 0.2 * result.epoch_losses[0]
    answers = bundle.generate(held_out, max_new_tokens=6, batch_size=50, progress=False)
    accuracy = sum(a == s.response for a, s in zip(answers, held_out)) / len(held_out)
    assert accuracy >= 0.45, (accuracy, answers[:10])
    # the saved adapter is the trained one
    reloaded = load_model(tiny_llava_dir, adapter=result.adapter_dir, options=CPU)
    assert torch.equal(bundle.per_sample_losses(held_out[:8]), reloaded.per_sample_losses(held_out[:8]))


def test_training_is_deterministic_for_a_seed(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    from mmerase.data import Sample

    samples = [Sample(f"s{i}", [{"from": "human", "value": f"Spell {i}"}, {"from": "gpt", "value": str(i) * 3}])
               for i in range(12)]
    lora = LoraSettings(r=4, dropout=0.1, seed=3)  # dropout: the RNG must be seeded too
    cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-2, seed=5, progress=False)
    runs = [train_adapter(tiny_llama_dir, samples, cfg, lora=lora, options=CPU, output_dir=tmp_path / f"r{k}")
            for k in range(2)]
    other = train_adapter(tiny_llama_dir, samples, TrainConfig(epochs=2, batch_size=4, lr=1e-2, seed=6,
                                                               progress=False),
                          lora=lora, options=CPU, output_dir=tmp_path / "r_other")
    files = [load_file(tmp_path / name / "adapter_model.safetensors") for name in ("r0", "r1", "r_other")]
    assert files[0].keys() == files[1].keys() and len(files[0]) == 2 * 2 * 7
    assert all(torch.equal(files[0][k], files[1][k]) for k in files[0])
    assert runs[0][1].step_losses == runs[1][1].step_losses
    assert not all(torch.equal(files[0][k], files[2][k]) for k in files[0])
    assert other[1].step_losses[0] != runs[0][1].step_losses[0]  # a different shuffle
    assert runs[0][1].epoch_losses[-1] < runs[0][1].epoch_losses[0]


def test_train_refuses_a_model_without_trainable_parameters(tiny_llama_dir):
    bundle = load_model(tiny_llama_dir, options=CPU)
    bundle.model.requires_grad_(False)
    with pytest.raises(ValueError, match="the model has no trainable parameters"):
        train(bundle.model, bundle.loss_fn, digit_samples([0]), bundle.collate, TrainConfig(progress=False))


def test_lr_schedules():
    assert _lr_factor("constant", 7, 10, 0) == 1.0
    assert _lr_factor("linear", 5, 10, 0) == 0.5
    assert _lr_factor("cosine", 5, 10, 0) == pytest.approx(0.5)
    assert _lr_factor("cosine", 0, 10, 2) == 0.5  # warm-up: (step+1)/warmup
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        _lr_factor("step", 0, 10, 0)


def test_progress_is_off_when_not_a_terminal():
    assert progress_enabled(None) is sys.stderr.isatty()
    assert progress_enabled(False) is False and progress_enabled(True) is True
