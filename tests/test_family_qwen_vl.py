"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (dynamic resolution, M-RoPE, merged 2×2 patches; Qwen3-VL's deepstack
features) on their tiny presets: see :mod:`vlm_family` for the checks."""

import json

import pytest
from vlm_family import FamilyChecks, digit

from mmerase.cli import main
from mmerase.data import DataError, Sample


class QwenChecks(FamilyChecks):
    def test_image_the_processor_cannot_take_names_sample_and_file(self, base_dir, bundle64, tmp_path, capsys):
        """Qwen-VL's resize refuses aspect ratios above 200: a one-line DataError with the sample id and file."""
        path = tmp_path / "strip.png"
        digit(1, (250, 1)).save(path)
        s = Sample("s7", [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}], image_path=path)
        with pytest.raises(DataError) as err:
            bundle64.collate([s])
        msg = str(err.value)
        assert msg.startswith(f"sample 's7': image {path} (250×1) cannot be taken by the {self.family} image "
                              "processor: ") and "aspect ratio" in msg and "\n" not in msg
        data = tmp_path / "d.json"  # through the command line: one line, exit 2, nothing written
        data.write_text(json.dumps([{"id": "s7", "image": "strip.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]}]))
        code = main(["finetune", "--base", str(base_dir), "--data", str(data), "--out", str(tmp_path / "ad"),
                     "--epochs", "1", "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("mmerase finetune: error: sample 's7': image ") and str(path) in err
        assert "\n" not in err and not (tmp_path / "ad").exists()

    def test_positions_are_m_rope_from_the_image_grid(self, bundle64, samples):
        """The batch carries no 1-D position ids: the model derives (time, height, width) positions from
        ``mm_token_type_ids`` and ``image_grid_thw``, so image tokens of one row share a height position."""
        batch = bundle64.collate(samples)
        image_tokens = sum(sum(bundle64.image_set(s).tokens) for s in samples if s.has_image)
        assert "position_ids" not in batch and int(batch["mm_token_type_ids"].sum()) == image_tokens
        inner = bundle64.base_model().model
        pos, _ = inner.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                                      attention_mask=batch["attention_mask"])
        first = batch["mm_token_type_ids"][0].bool()
        grid_w = int(batch["image_grid_thw"][0, 2]) // bundle64.merge
        heights = pos[1, 0, first]
        assert heights[:grid_w].unique().numel() == 1 and heights[grid_w] == heights[0] + 1


class TestQwen2VL(QwenChecks):
    preset, family = "tiny-qwen2-vl", "qwen2_vl"


class TestQwen2_5_VL(QwenChecks):
    preset, family = "tiny-qwen2.5-vl", "qwen2_5_vl"


class TestQwen3VL(QwenChecks):
    preset, family = "tiny-qwen3-vl", "qwen3_vl"

    def test_cache_keeps_the_deepstack_features(self, bundle64, samples):
        tensors = bundle64.image_set(samples[0]).tensors
        tensors = {k: v.double() if v.is_floating_point() else v for k, v in tensors.items()}
        feats = bundle64.image_features(tensors, "projector")
        assert len(feats["deepstack"]) == 1 and feats["deepstack"][0][0].shape == feats["pooler"][0].shape
