"""LLaVA-OneVision (any-resolution tiles capped at anyres_max_N; base crop only for multi-image samples) on its tiny
preset: see :mod:`vlm_family` for the checks."""

from vlm_family import FamilyChecks, mixed_samples


class TestLlavaOnevision(FamilyChecks):
    preset, family = "tiny-llava-onevision", "llava_onevision"

    def test_multi_image_samples_use_the_base_crop(self, bundle64):
        """In a two-image sample each image fills side² + 1 (newline) tokens whatever its size; alone, the same
        image is tiled and fills more."""
        pair = next(s for s in mixed_samples() if s.image_count == 2)
        side = bundle64.side
        assert bundle64.image_set(pair).tokens == [side * side + 1] * 2
        alone = pair.__class__("one", [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}],
                               image=pair.load_images()[0])
        assert bundle64.image_set(alone).tokens[0] > side * side + 1
