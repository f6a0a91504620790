"""The checks every vision-language family passes on its tiny preset; each ``tests/test_family_*.py`` subclasses
:class:`FamilyChecks` with its preset name.

One tiny base per family (built once per test class), real digit images (scikit-learn) resized to 28–56 px so images
of one batch differ in size, conversations and ``messages`` records, a two-image sample and a text-only one. The
references are independent of the code under test: a hand-masked cross-entropy, ``torch.autograd.functional.hessian``,
per-sample ``torch.autograd.grad``, the model's own image features.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lora_points import perturb_lora_b
from mmerase.cli import main
from mmerase.data import DIGIT_WORDS, DataError, Sample, digit_images, load_dataset, modify_sample
from mmerase.influence import Edit, InfluenceEngine
from mmerase.models import LoadOptions, LoraSettings, build_preset, load_model
from mmerase.record import sha256_dir

F64 = LoadOptions(dtype="float64", device="cpu")
SIZES = [(28, 28), (56, 28), (28, 48), (40, 40), (36, 56), (48, 32)]  # (width, height)


def digit(i: int, size: tuple[int, int]) -> Image.Image:
    return digit_images(16, 12)[0][i].resize(size, Image.NEAREST)


def chat(sid: str, question: str, answer: str, images: list = (), system: str | None = None) -> Sample:
    turns = ([{"from": "system", "value": system}] if system else []) + [
        {"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return Sample(sid, turns, image=images[0] if images else None, extra_images=tuple(images[1:]))


def mixed_samples() -> list[Sample]:
    """Images of six sizes, a two-image sample, a text-only sample, a system prompt."""
    out = [chat(f"d{i}", "<image>\nWhat digit is this?", DIGIT_WORDS[i], [digit(i, SIZES[i])]) for i in range(4)]
    out.append(chat("pair", "<image>\n<image>\nWhich digit is larger?", "the second", [digit(4, SIZES[4]),
                                                                                       digit(5, SIZES[5])]))
    out.append(chat("text", "Spell 7", "seven"))
    out.append(chat("sys", "<image>\nName it.", "eight", [digit(8, (32, 44))], system="Answer in one word."))
    return out


def write_dataset(folder: Path) -> Path:
    """Eight records on disk: LLaVA conversations, ``messages`` records, a two-image record, a text record."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(6):
        digit(i, SIZES[i]).save(folder / "img" / f"{i}.png")
        if i % 2:
            rows.append({"id": f"d{i}", "messages": [
                {"role": "user", "content": [{"type": "image", "image": f"img/{i}.png"},
                                             {"type": "text", "text": "What digit is this?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": DIGIT_WORDS[i]}]}]})
        else:
            rows.append({"id": f"d{i}", "image": f"img/{i}.png", "conversations": [
                {"from": "human", "value": "<image>\nWhat digit is this?"}, {"from": "gpt", "value": DIGIT_WORDS[i]}]})
    rows.append({"id": "pair", "messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image", "image": "img/0.png"}, {"type": "image", "image": "img/3.png"},
                                     {"type": "text", "text": "Which digit is larger?"}]},
        {"role": "assistant", "content": "the second"}]})
    rows.append({"id": "text", "conversations": [{"from": "human", "value": "Spell 7"},
                                                  {"from": "gpt", "value": "seven"}]})
    path = folder / "train.json"
    path.write_text(json.dumps(rows))
    return path


def hand_loss(bundle, batch, logits, sample: Sample, row: int) -> torch.Tensor:
    """Mean cross-entropy over the answer's tokens and the end-of-turn token, located by searching the row's ids
    for the tokenised answer followed by EOS (no labels used)."""
    target = bundle.tokenizer(sample.response, add_special_tokens=False)["input_ids"] + [bundle.tokenizer.eos_token_id]
    ids = batch["input_ids"][row].tolist()
    starts = [s for s in range(len(ids) - len(target) + 1) if ids[s: s + len(target)] == target]
    assert starts, "answer not found in the encoded sample"
    s = starts[-1]
    logp = torch.log_softmax(logits[row], dim=-1)
    picked = [logp[t - 1, ids[t]] for t in range(s, s + len(target))]  # position t-1 predicts token t
    return -torch.stack(picked).mean()


def rel(a, b) -> float:
    num = sum(float((x - y).norm() ** 2) for x, y in zip(a, b)) ** 0.5
    return num / sum(float(y.norm() ** 2) for y in b) ** 0.5


class FamilyChecks:
    """Subclasses set ``preset`` (a tiny preset name) and ``family`` (its ``model_type``)."""

    preset: str = ""
    family: str = ""
    #: LoRA for the dense-Hessian check: rank 1 on two projections of the last LM layer (224 parameters)
    dense_targets = r".*language_model\.layers\.1\.self_attn\.(q_proj|v_proj)"

    # ---- shared fixtures (one tiny base per family) ----------------------------------------------------------
    @pytest.fixture(scope="class")
    @classmethod
    def base_dir(cls, tmp_path_factory):
        return build_preset(cls.preset, tmp_path_factory.mktemp(cls.preset), seed=0)

    @pytest.fixture(scope="class")
    @classmethod
    def bundle64(cls, base_dir):
        """float64, LoRA rank 2 on the default targets plus the projector, B perturbed off zero."""
        b = load_model(base_dir, lora=LoraSettings(r=2, train_projector=True), options=F64)
        perturb_lora_b(b.model)
        return b

    @pytest.fixture(scope="class")
    @classmethod
    def small64(cls, base_dir):
        """float64, rank-1 LoRA on two projections (the dense Hessian's parameters), B perturbed."""
        b = load_model(base_dir, lora=LoraSettings(r=1, target_modules=cls.dense_targets), options=F64)
        perturb_lora_b(b.model)
        return b

    @pytest.fixture(scope="class")
    @classmethod
    def samples(cls):
        return mixed_samples()

    # ---- loading, LoRA placement ------------------------------------------------------------------------------
    def test_loads_from_a_save_pretrained_folder(self, base_dir, bundle64):
        assert json.loads((base_dir / "config.json").read_text())["model_type"] == self.family
        assert bundle64.family == self.family and bundle64.base_path == str(base_dir)
        base = bundle64.base_model()
        assert base.config._attn_implementation == "mmerase_eager"  # eager, with a float64 softmax
        n = sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n and "modules_to_save" not in n)
        assert n < 300_000
        assert {p.dtype for p in bundle64.model.parameters()} == {torch.float64}

    def test_lora_on_the_language_model_only_and_projector_saved(self, base_dir, bundle64, tmp_path):
        plain = load_model(base_dir, lora=LoraSettings(r=2), options=LoadOptions(device="cpu"))
        names = list(plain.trainable_parameters())
        assert names and all("lora_" in n and ".language_model." in n for n in names)
        with_projector = bundle64.trainable_parameters()
        extra = [n for n in with_projector if "lora_" not in n]
        assert extra and all("modules_to_save" in n for n in extra)
        vision_frozen, projector_frozen = bundle64.vision_frozen()
        assert vision_frozen and not projector_frozen
        assert bundle64.feature_cache() is None  # documented: only LLaVA-1.5 caches under a trainable projector
        saved = load_file(bundle64.save_adapter(tmp_path / "ad") / "adapter_model.safetensors")
        assert any("lora_" not in k for k in saved)  # the projector travels with the adapter
        again = load_model(base_dir, adapter=tmp_path / "ad", options=F64)
        assert all(torch.equal(with_projector[n], p) for n, p in again.trainable_parameters().items())

    # ---- encoding ---------------------------------------------------------------------------------------------
    def test_image_token_counts_match_the_model(self, bundle64, samples):
        """Per image, the widened image tokens equal the number of features the model produces for it (single-
        and multi-image samples, six sizes); a different size gives a different count."""
        inner = bundle64.base_model().model
        counts = {}
        for s in [x for x in samples if x.has_image]:
            image_set = bundle64.image_set(s)
            tensors = {k: v.to(torch.float64) if v.is_floating_point() else v for k, v in image_set.tensors.items()}
            with torch.no_grad():
                feats = inner.get_image_features(**tensors, return_dict=True).pooler_output
            assert [int(f.shape[0]) for f in feats] == image_set.tokens
            batch = bundle64.collate([s])
            assert int((batch["input_ids"] == bundle64.image_token_id).sum()) == sum(image_set.tokens)
            counts[s.id] = image_set.tokens
        assert len({c[0] for c in counts.values()}) > 1

    def test_loss_is_the_per_sample_mean_over_assistant_tokens(self, bundle64, samples):
        batch = bundle64.collate(samples)
        with torch.no_grad():
            logits = bundle64.loss_fn.outputs(bundle64.model, batch)
            per_sample = bundle64.loss_fn.per_sample_losses(bundle64.model, batch)
            batch_loss = bundle64.loss_fn(bundle64.model, batch)
        hand = torch.stack([hand_loss(bundle64, batch, logits, s, i) for i, s in enumerate(samples)])
        assert torch.allclose(per_sample, hand, rtol=1e-12, atol=0)
        assert torch.allclose(batch_loss, hand.mean(), rtol=1e-12, atol=0)
        alone = torch.cat([bundle64.per_sample_losses([s]) for s in samples])  # images of other sizes, padding
        assert torch.allclose(alone, per_sample, rtol=1e-11, atol=0)

    def test_batched_generation_matches_one_by_one(self, bundle64, samples):
        together = bundle64.generate(samples, max_new_tokens=4, batch_size=len(samples))
        assert together == [bundle64.generate([s], max_new_tokens=4)[0] for s in samples]

    # ---- the influence quantities in float64 ------------------------------------------------------------------
    def test_exact_hessian_products_equal_a_dense_autograd_hessian(self, small64, samples):
        samples = [samples[0], samples[4], samples[5]]  # an image, two images of other sizes, text only
        params = dict(small64.trainable_parameters())
        names = list(params)
        shapes = [params[n].shape for n in names]
        sizes = [params[n].numel() for n in names]
        batch = small64.collate(samples)
        base = small64.model

        def loss(flat):
            chunks = [c.view(s) for c, s in zip(torch.split(flat, sizes), shapes)]
            return torch.func.functional_call(base, dict(zip(names, chunks)), args=(), kwargs={
                **small64.loss_fn.model_inputs(base, batch), "use_cache": False}).logits

        def objective(flat):
            from mmerase.models.task import per_sample_losses

            return per_sample_losses(loss(flat), batch["labels"]).mean()

        small64.model.eval()
        flat = torch.cat([params[n].detach().reshape(-1) for n in names])
        dense = torch.autograd.functional.hessian(objective, flat)
        assert dense.shape[0] == sum(sizes) == 224 and torch.allclose(dense, dense.T, rtol=0, atol=1e-12)
        engine = InfluenceEngine(small64.model, small64.loss_fn, samples, collate_fn=small64.collate)
        g = torch.Generator().manual_seed(0)
        for _ in range(2):
            v = torch.randn(flat.shape, generator=g, dtype=flat.dtype)
            hv = engine.product([c.view(s) for c, s in zip(torch.split(v, sizes), shapes)], "hessian", batch_size=2)
            ref = dense @ v
            assert float((torch.cat([h.reshape(-1) for h in hv]) - ref).norm() / ref.norm()) < 1e-10

    def test_b_equals_per_sample_autograd_gradients(self, bundle64, samples):
        n = len(samples)
        new_image = digit(9, (56, 44))
        edits = [Edit(old=samples[0]),  # remove
                 Edit(old=samples[1], new=modify_sample(samples[1], response="nine")),  # correct
                 Edit(old=samples[2], new=modify_sample(samples[2], image=new_image))]  # modify: new image, new size
        assert bundle64.image_set(edits[2].new).tokens != bundle64.image_set(samples[2]).tokens
        engine = InfluenceEngine(bundle64.model, bundle64.loss_fn, samples, collate_fn=bundle64.collate)
        b = engine.edit_gradient(edits, batch_size=2)
        params = list(bundle64.trainable_parameters().values())
        bundle64.model.eval()

        def grad(sample):
            batch = bundle64.collate([sample])
            logits = bundle64.model(**bundle64.loss_fn.model_inputs(bundle64.model, batch), use_cache=False).logits
            return torch.autograd.grad(hand_loss(bundle64, batch, logits, sample, 0), params)

        ref = [torch.zeros_like(p) for p in params]
        for e in edits:
            for sign, s in ((-1.0, e.new), (1.0, e.old)):
                if s is not None:
                    ref = [r + sign * g / n for r, g in zip(ref, grad(s))]
        assert rel(b, ref) < 1e-10 and sum(float(t.norm()) for t in ref) > 0

    def test_cached_features_give_the_same_products(self, base_dir, samples):
        b = load_model(base_dir, lora=LoraSettings(r=2), options=F64)
        perturb_lora_b(b.model)
        cache = b.feature_cache()
        assert cache is not None and cache.level == "projector"
        plain = InfluenceEngine(b.model, b.loss_fn, samples, collate_fn=b.collate)
        cached = InfluenceEngine(b.model, cache.loss_fn, samples, collate_fn=cache.collate)
        g = torch.Generator().manual_seed(1)
        v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in plain.params]
        for curvature in ("hessian", "ggn"):
            ref = plain.product(v, curvature, batch_size=4)
            assert rel(cached.product(v, curvature, batch_size=4), ref) < 1e-10
        n_images = sum(s.image_count for s in samples)
        assert cache.n_images == n_images and cache.misses == n_images and cache.hits == n_images
        z = samples[3]
        edit = Edit(old=z, new=modify_sample(z, image=digit(7, (56, 44))))
        assert rel(cached.edit_gradient([edit]), plain.edit_gradient([edit])) < 1e-10
        assert cache.n_images == n_images + 1

    # ---- NF4, errors ------------------------------------------------------------------------------------------
    def test_nf4_quantizes_the_language_model_only(self, base_dir, samples):
        import bitsandbytes as bnb

        q = load_model(base_dir, options=LoadOptions(quantization="nf4", device="cpu"))
        full = load_model(base_dir, options=LoadOptions(device="cpu"))
        kinds = {n: type(m) for n, m in q.model.named_modules()}
        lm = [n for n, k in kinds.items() if ".language_model." in n and n.endswith("q_proj.base_layer")]
        assert lm and all(kinds[n] is bnb.nn.Linear4bit for n in lm)
        vision, projectors = q.image_modules()
        assert not any(isinstance(m, bnb.nn.Linear4bit) for part in [vision] + projectors for m in part.modules())
        lq, lf = q.per_sample_losses(samples), full.per_sample_losses(samples)
        assert torch.isfinite(lq).all() and float((lq - lf).abs().max()) < 0.3

    def test_unreadable_image_names_sample_and_file(self, bundle64, tmp_path):
        broken = tmp_path / "broken.png"
        good = tmp_path / "good.png"
        digit(1, (40, 40)).save(good)
        broken.write_bytes(good.read_bytes()[:60])  # a PNG header, then nothing
        s = Sample("z9", [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}],
                   image_path=broken)
        with pytest.raises(DataError, match=rf"sample 'z9': field 'image': cannot read image {broken}"):
            bundle64.collate([s])

    # ---- the command line -------------------------------------------------------------------------------------
    def test_cli_finetune_unlearn_generate(self, base_dir, tmp_path, capsys):
        data = write_dataset(tmp_path / "data")
        digit(9, (56, 44)).save(tmp_path / "data" / "img" / "new.png")  # d3's image is 40×40
        edits = tmp_path / "data" / "edits.jsonl"
        edits.write_text("".join(json.dumps(r) + "\n" for r in [
            {"op": "remove", "id": "d1"}, {"op": "correct", "id": "d2", "response": "nine"},
            {"op": "modify", "id": "d3", "image": "img/new.png"}]))
        adapter, out, answers = tmp_path / "adapter", tmp_path / "unlearned", tmp_path / "answers.jsonl"
        assert main([str(a) for a in ["finetune", "--base", base_dir, "--data", data, "--out", adapter, "--epochs",
                                      "2", "--lr", "5e-3", "--lora-r", "2", "--batch-size", "4",
                                      "--no-progress"]]) == 0
        before = sha256_dir(adapter)
        code = main([str(a) for a in ["unlearn", "--base", base_dir, "--adapter", adapter, "--data", data,
                                      "--edits", edits, "--out", out, "--curvature", "ggn", "--damping", "10",
                                      "--tol", "1e-6", "--max-steps", "60", "--dtype", "float64", "--no-progress"]])
        assert code == 0, capsys.readouterr().err
        rec = json.loads((out / "mmerase_record.json").read_text())
        assert rec["ops"] == {"remove": 1, "correct": 1, "modify": 1}
        assert rec["result"]["converged"] and rec["result"]["residual"] < 1e-6
        assert rec["chain"][0]["ids"] == ["d1", "d2", "d3"]
        assert sha256_dir(adapter) == before  # the input adapter is untouched
        assert rec["feature_cache"]["level"] == "projector"
        old, new = load_file(adapter / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
        assert old.keys() == new.keys() and any(not torch.equal(old[k], new[k]) for k in old)
        assert main([str(a) for a in ["generate", "--base", base_dir, "--adapter", out, "--data", data, "--out",
                                      answers, "--batch-size", "3", "--max-new-tokens", "4", "--no-progress"]]) == 0
        rows = [json.loads(line) for line in answers.read_text().splitlines()]
        assert [r["id"] for r in rows] == [s.id for s in load_dataset(data)]
