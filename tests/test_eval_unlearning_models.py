"""`mmerase eval unlearning --base/--adapters/--splits`: records computed through the model adapters, then one table
(issue 5, unlearning metrics wired to real models)."""

import json

import pytest

from mmerase.cli import main
from mmerase.data import Sample, save_dataset
from mmerase.models import LoadOptions, LoraSettings, load_model
from mmerase.training import TrainConfig, train_adapter

CPU = LoadOptions(device="cpu", exact_hvp=False)


def _samples(prefix, n, offset=0):
    return [Sample(f"{prefix}{i}", [{"from": "human", "value": f"Echo {i + offset}"},
                                     {"from": "gpt", "value": str(i + offset)}]) for i in range(n)]


def test_eval_unlearning_scores_adapters_on_splits(tiny_llama_dir, tmp_path, capsys):
    forget, test = _samples("f", 6), _samples("t", 6, offset=50)
    save_dataset(forget, tmp_path / "forget.json")
    save_dataset(test, tmp_path / "test.json")
    cfg = TrainConfig(epochs=3, batch_size=3, lr=1e-2, progress=False)
    for name, data in (("corrupted", forget + test[:2]), ("retrained", test[:2])):
        train_adapter(tiny_llama_dir, data, cfg, lora=LoraSettings(r=4), options=CPU, output_dir=tmp_path / name)
    out = tmp_path / "report"
    code = main(["eval", "unlearning", "--base", tiny_llama_dir, "--adapters", f"corrupted={tmp_path / 'corrupted'}",
                 f"retrained={tmp_path / 'retrained'}", "--splits", f"forget={tmp_path / 'forget.json'}",
                 f"test={tmp_path / 'test.json'}", "--corrupted", "corrupted", "--retrained", "retrained",
                 "--max-new-tokens", "4", "--out", out])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "unlearning_summary.json").read_text())
    rows = [json.loads(x) for x in (out / "unlearning_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 12
    # the losses are the model bundle's own per-sample losses
    bundle = load_model(tiny_llama_dir, adapter=tmp_path / "corrupted", options=CPU)
    expected = bundle.per_sample_losses(forget).tolist()
    got = [r["loss"] for r in rows if r["adapter"] == "corrupted" and r["split"] == "forget"]
    assert got == pytest.approx(expected, rel=1e-12)
    text = json.dumps(summary)
    assert "forget" in text and "test" in text
    assert (out / "unlearning_summary.md").read_text().count("corrupted") >= 1


def test_eval_unlearning_needs_records_or_models(tmp_path, capsys):
    code = main(["eval", "unlearning", "--out", tmp_path / "o"])
    assert code == 2
    assert "missing --records" in capsys.readouterr().err
