"""LLaVA-NeXT (any-resolution tiles) on its tiny preset: see :mod:`vlm_family` for the checks."""

import torch
from vlm_family import FamilyChecks, mixed_samples


class TestLlavaNext(FamilyChecks):
    preset, family = "tiny-llava-next", "llava_next"

    def test_token_counts_match_the_full_processor(self, bundle64):
        """LlavaNextProcessor (no torchvision needed) widens <image> exactly as the bundle does."""
        from transformers import LlavaNextProcessor

        assert isinstance(bundle64.processor, LlavaNextProcessor)
        for s in [x for x in mixed_samples() if x.image_count == 1]:
            image = s.load_image()
            out = bundle64.processor(text="<image>", images=[image], return_tensors="pt")
            expected = int((out["input_ids"] == bundle64.image_token_id).sum())
            assert bundle64.image_set(s).tokens == [expected]
            assert torch.equal(out["pixel_values"], bundle64.image_set(s).tensors["pixel_values"])
