"""Model families behind one interface: presets, collation/labels, the per-sample loss, padding, LoRA targets,
adapters (round trip and mismatch errors), generation, NF4, and the influence engine on both families."""

import json
import re

import pytest
import torch
from PIL import Image
from lora_points import perturb_lora_b

from mmerase.data import DataError, Sample, digit_images, digit_samples, modify_sample
from mmerase.models import (AdapterMismatchError, LlavaBundle, LoadOptions, LoraSettings, ModelLoadError, TextBundle,
                            build_byte_tokenizer, load_model)
from mmerase.models.base import per_sample_losses

F64 = LoadOptions(dtype="float64", device="cpu")


def _chat(*turns, image=None, sid="t"):
    roles = ["human", "gpt"] * len(turns)
    return Sample(sid, [{"from": r, "value": v} for r, v in zip(roles, turns)], image=image)




@pytest.fixture(scope="module")
def llava64(tiny_llava_dir):
    b = load_model(tiny_llava_dir, lora=LoraSettings(r=4, train_projector=True), options=F64)
    perturb_lora_b(b.model)
    return b


@pytest.fixture(scope="module")
def llama64(tiny_llama_dir):
    b = load_model(tiny_llama_dir, lora=LoraSettings(r=4), options=F64)
    perturb_lora_b(b.model)
    return b


@pytest.fixture(scope="module")
def mixed_samples():
    imgs = digit_samples(range(5))
    text = [_chat("Say hi", "hi", sid="x1"),
            _chat("Count to three, in words please", "one two three", "And back?", "three two one", sid="x2")]
    return imgs[:3] + text + imgs[3:]


# ---- presets and loading ------------------------------------------------------------------------------------

def test_presets_load_through_checkpoint_path(tiny_llava_dir, tiny_llama_dir, llava64, llama64):
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    assert json.loads((tiny_llava_dir / "config.json").read_text())["model_type"] == "llava"
    assert type(llava64) is LlavaBundle and type(llama64) is TextBundle
    assert isinstance(llava64.processor, LlavaProcessor)
    base = llava64.model.get_base_model()
    assert isinstance(base, LlavaForConditionalGeneration)
    # exact HVPs need eager attention; in float64 the variant whose softmax stays float64 (mmerase.models.exact)
    assert base.config._attn_implementation == "mmerase_eager"
    n_llava = sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n and "modules_to_save" not in n)
    n_llama = sum(p.numel() for n, p in llama64.model.get_base_model().named_parameters() if "lora_" not in n)
    assert (n_llava, n_llama) == (492_160, 395_904)
    assert {p.dtype for p in llava64.model.parameters()} == {torch.float64}
    assert llava64.num_image_tokens(16, 16) == 16


def test_preset_by_name_builds_once_into_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMERASE_CACHE", str(tmp_path))
    b = load_model("tiny-llama", options=LoadOptions(device="cpu"))
    folder = tmp_path / "presets" / "tiny-llama-seed0"
    assert b.base_path == str(folder) and (folder / "config.json").is_file()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    load_model("tiny-llama", options=LoadOptions(device="cpu"))
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_byte_tokenizer_encodes_any_utf8():
    tok = build_byte_tokenizer()
    text = "héllo 世界 🤖\t\x00 «ok»"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    assert len(tok) == 264 and tok.convert_tokens_to_ids("<image>") == 259


def test_load_errors_are_actionable(tiny_llava_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="has no double backward; exact Hessian products need 'eager'"):
        load_model(tiny_llava_dir, options=LoadOptions(attn_implementation="sdpa"))
    with pytest.raises(ModelLoadError, match=r"unknown dtype 'float8'; choose one of"):
        load_model(tiny_llava_dir, options=LoadOptions(dtype="float8"))
    with pytest.raises(ModelLoadError, match="is not a model checkpoint folder"):
        load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="nf4 quantization computes in float32/bfloat16"):
        load_model(tiny_llava_dir, options=LoadOptions(dtype="float64", quantization="nf4"))


def test_unsupported_model_type_lists_what_is_served(tmp_path, capsys):
    from transformers import CLIPConfig

    from mmerase.cli import main

    CLIPConfig().save_pretrained(tmp_path / "clip")
    served = ("mmerase serves llava, llava_next, llava_onevision, qwen2_5_vl, qwen2_vl, qwen3_vl and text causal LMs "
              "(AutoModelForCausalLM)")
    with pytest.raises(ModelLoadError, match=rf"^unsupported model_type 'clip': {re.escape(served)}$"):
        load_model(tmp_path / "clip")
    (tmp_path / "d.jsonl").write_text(json.dumps({"id": "1", "conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}) + "\n")
    code = main(["generate", "--base", str(tmp_path / "clip"), "--data", str(tmp_path / "d.jsonl"), "--out",
                 str(tmp_path / "a.jsonl")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"mmerase generate: error: unsupported model_type 'clip': {served}"


# ---- LoRA placement -----------------------------------------------------------------------------------------

def test_default_lora_targets_language_model_only(tiny_llava_dir, llava64):
    lora_modules = {n.rsplit(".lora_A", 1)[0] for n, _ in llava64.model.named_parameters() if ".lora_A." in n}
    assert len(lora_modules) == 2 * 7  # q,k,v,o,gate,up,down in each of 2 LM layers
    assert all(".language_model.layers." in n for n in lora_modules)
    assert not any("vision_tower" in n for n, _ in llava64.model.named_parameters() if "lora_" in n)
    trainable = llava64.trainable_parameters()
    assert all(("lora_" in n and "language_model" in n) or "multi_modal_projector.modules_to_save" in n
               for n in trainable)
    assert sum("multi_modal_projector" in n for n in trainable) == 4
    # why the default is anchored: a bare "q_proj" also lands in the CLIP vision tower
    bare = load_model(tiny_llava_dir, lora=LoraSettings(target_modules=["q_proj"]), options=LoadOptions(device="cpu"))
    assert any("vision_tower" in n and "lora_A" in n for n, _ in bare.model.named_parameters())
    plain = load_model(tiny_llava_dir, lora=LoraSettings(), options=LoadOptions(device="cpu"))
    assert not any("multi_modal_projector" in n for n in plain.trainable_parameters())


# ---- collation and the loss ---------------------------------------------------------------------------------

def test_labels_cover_exactly_the_assistant_turns(llava64):
    img = digit_images(16, 1)[0][0]
    s = Sample("m", [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "<image>\nColour?"},
                     {"from": "gpt", "value": "blue"}, {"from": "human", "value": "Sure?"},
                     {"from": "gpt", "value": "yes, ü"}], image=img)
    batch = llava64.collate([s, _chat("Say hi", "hi")])
    tok = llava64.tokenizer
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert tok.decode(labels[labels != -100]) == "blue</s>yes, ü</s>"
    assert tok.decode(ids[ids != 259]) == ("<s><|system|>Be brief.<|end|><|user|>\nColour?<|end|><|assistant|>blue"
                                           "</s><|user|>Sure?<|end|><|assistant|>yes, ü</s>")
    assert int((ids == 259).sum()) == 16 and bool((labels[ids == 259] == -100).all())
    assert batch["pixel_values"].shape == (1, 3, 16, 16)  # only the image sample contributes pixels
    assert tok.decode(batch["labels"][1][batch["labels"][1] != -100]) == "hi</s>"
    assert batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()  # right-padded
    assert batch["position_ids"][0].tolist() == list(range(batch["input_ids"].shape[1]))


def test_batch_loss_is_mean_of_sample_losses_not_token_mean(llava64, mixed_samples):
    a, b = mixed_samples[0], mixed_samples[4]  # "zero" (5 scored tokens) vs a two-turn answer (28)
    with torch.no_grad():
        la = llava64.loss_fn(llava64.model, llava64.collate([a]))
        lb = llava64.loss_fn(llava64.model, llava64.collate([b]))
        batch = llava64.collate([a, b])
        lab = llava64.loss_fn(llava64.model, batch)
        logits = llava64.loss_fn.outputs(llava64.model, batch)
    assert lab.dtype == torch.float64
    assert torch.allclose(lab, (la + lb) / 2, rtol=1e-13, atol=0)
    token_mean = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                   batch["labels"][:, 1:].reshape(-1))
    assert abs(float(token_mean - lab)) > 1e-3  # the pooled token mean would weigh b's 28 tokens more


@pytest.mark.parametrize("family", ["llava", "text"])
def test_padding_does_not_change_a_sample_loss(family, llava64, llama64, mixed_samples):
    bundle = llava64 if family == "llava" else llama64
    short, long_ = mixed_samples[3], mixed_samples[4]
    others = [long_] + ([mixed_samples[0]] if family == "llava" else [])
    with torch.no_grad():
        alone = bundle.loss_fn.per_sample_losses(bundle.model, bundle.collate([short]))
        batch = bundle.collate([short] + others)
        together = bundle.loss_fn.per_sample_losses(bundle.model, batch)
    assert int(batch["attention_mask"][0].sum()) < batch["input_ids"].shape[1]  # it really was padded
    assert torch.allclose(alone[0], together[0], rtol=1e-13, atol=0)


def test_per_sample_losses_requires_scored_tokens():
    with pytest.raises(ValueError, match="has no response tokens to score"):
        per_sample_losses(torch.zeros(1, 3, 5), torch.full((1, 3), -100))


def test_text_family_rejects_image_samples(llama64):
    with pytest.raises(DataError, match="sample 'digit-0' has an image but model family 'text' is text-only"):
        llama64.collate(digit_samples([0]))


def test_batched_generation_matches_one_by_one(llava64, mixed_samples):
    samples = mixed_samples[:5]
    together = llava64.generate(samples, max_new_tokens=6, batch_size=5)
    alone = [llava64.generate([s], max_new_tokens=6)[0] for s in samples]
    assert together == alone and len(set(together)) > 1


# ---- adapters -----------------------------------------------------------------------------------------------

def test_adapter_round_trip_is_bit_exact(tiny_llava_dir, llava64, tmp_path, mixed_samples):
    from safetensors.torch import load_file

    out = llava64.save_adapter(tmp_path / "ad")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    again = load_model(tiny_llava_dir, adapter=out, options=F64)
    before, after = llava64.trainable_parameters(), again.trainable_parameters()
    assert list(before) == list(after)
    assert all(torch.equal(before[n], after[n]) and after[n].requires_grad for n in before)
    again.save_adapter(tmp_path / "ad2")
    f1, f2 = load_file(out / "adapter_model.safetensors"), load_file(tmp_path / "ad2" / "adapter_model.safetensors")
    assert f1.keys() == f2.keys() and all(torch.equal(f1[k], f2[k]) for k in f1)
    assert torch.equal(llava64.per_sample_losses(mixed_samples), again.per_sample_losses(mixed_samples))


def test_adapter_on_wrong_base_is_a_clear_error(tiny_llava_dir, tiny_llama_dir, llava64, tmp_path):
    from mmerase.models import build_preset

    ad = llava64.save_adapter(tmp_path / "ad")
    with pytest.raises(AdapterMismatchError) as err:
        load_model(tiny_llama_dir, adapter=ad, options=F64)
    assert f"adapter {ad} " in str(err.value) and "target modules are not in this model" in str(err.value)
    narrow = build_preset("tiny-llava", tmp_path / "narrow", seed=0, hidden_size=64)
    with pytest.raises(AdapterMismatchError) as err:
        load_model(narrow, adapter=ad, options=F64)
    msg = str(err.value)
    assert msg.startswith(f"adapter {ad} (made for {tiny_llava_dir}) does not fit {narrow}: ")
    assert "weight(s) differ in shape, e.g. " in msg and "lora_B.weight: saved [128, 4], this model needs [64, 4]" in msg
    with pytest.raises(AdapterMismatchError, match=r"is not a peft adapter folder \(no adapter_config.json\)"):
        load_model(tiny_llava_dir, adapter=tmp_path, options=F64)


_OTHER_PEFT = {  # the peft types besides LoRA that loading.PEFT_TYPES accepts, each as a small config
    "LOHA": lambda peft, t: peft.LoHaConfig(r=4, target_modules=t, init_weights=False),
    "LOKR": lambda peft, t: peft.LoKrConfig(r=4, target_modules=t, init_weights=False),
    "IA3": lambda peft, t: peft.IA3Config(target_modules=t, feedforward_modules=["down_proj"]),
    "VERA": lambda peft, t: peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    "ADALORA": lambda peft, t: peft.AdaLoraConfig(init_r=4, target_modules=t, total_step=10),
}


@pytest.mark.parametrize("kind", sorted(_OTHER_PEFT))
def test_weight_adapters_of_other_peft_types_load_like_peft_does(kind, tiny_llama_dir, tmp_path, mixed_samples):
    """The weight adapters accepted besides LoRA load through the same path: the same logits as the peft model that
    saved them, every saved weight trainable (the unlearning paths themselves were run on each by hand)."""
    import peft
    from transformers import AutoModelForCausalLM

    from mmerase.models.loading import PEFT_TYPES

    assert set(_OTHER_PEFT) == set(PEFT_TYPES) - {"LORA"}
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float64)
    torch.manual_seed(0)
    made = peft.get_peft_model(base, _OTHER_PEFT[kind](peft, ["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():  # away from the identity initialisation, so the adapter changes the logits
        for p in made.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    made.save_pretrained(tmp_path / kind)
    assert json.loads((tmp_path / kind / "adapter_config.json").read_text())["peft_type"] == kind
    bundle = load_model(tiny_llama_dir, adapter=tmp_path / kind, options=F64)
    batch = bundle.collate([s for s in mixed_samples if not s.has_image])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    made.eval(), bundle.model.eval()
    with torch.no_grad():
        ours, theirs = bundle.model(**inputs).logits, made(**inputs).logits
        with made.disable_adapter():
            plain = made(**inputs).logits
    # transformers' own float64 eager softmax runs in float32 (mmerase's is float64: see models.exact), hence 1e-5
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert (theirs - plain).abs().max() > 1e-2
    assert bundle.trainable_parameters() and all(p.requires_grad for p in bundle.trainable_parameters().values())


def test_adapters_peft_type_and_weights_are_checked(tiny_llama_dir, llama64, tmp_path):
    """A peft type mmerase does not serve, NaN weights and a damaged weights file name the folder / file / weight."""
    from safetensors.torch import load_file, save_file

    ad = llama64.save_adapter(tmp_path / "ad")
    config = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "PROMPT_TUNING"}))
    with pytest.raises(ModelLoadError, match=rf"^adapter {re.escape(str(ad))} is a 'PROMPT_TUNING' adapter .*"
                                             "mmerase unlearns LoRA adapters"):
        load_model(tiny_llama_dir, adapter=ad, options=F64)
    (ad / "adapter_config.json").write_text(json.dumps(config))
    weights = load_file(ad / "adapter_model.safetensors")
    name = sorted(weights)[2]
    weights[name][0, :3] = float("nan")
    save_file(weights, ad / "adapter_model.safetensors")
    with pytest.raises(ModelLoadError, match=rf"holds non-finite weights: 1 of {len(weights)} .* the first "
                                             rf"'{re.escape(name)}' \(3 value\(s\)\)"):
        load_model(tiny_llama_dir, adapter=ad, options=F64)
    (ad / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AdapterMismatchError, match=r"adapter_model.safetensors is not a readable safetensors file"):
        load_model(tiny_llama_dir, adapter=ad, options=F64)


def test_nf4_quantizes_only_the_language_model(tiny_llava_dir, mixed_samples):
    import bitsandbytes as bnb

    q = load_model(tiny_llava_dir, options=LoadOptions(quantization="nf4", device="cpu"))
    full = load_model(tiny_llava_dir, options=LoadOptions(device="cpu"))
    kinds = {n: type(m) for n, m in q.model.named_modules()}
    assert kinds["base_model.model.model.language_model.layers.0.self_attn.q_proj.base_layer"] is bnb.nn.Linear4bit
    assert kinds["base_model.model.model.vision_tower.encoder.layers.0.self_attn.q_proj"] is torch.nn.Linear
    assert kinds["base_model.model.model.multi_modal_projector.linear_1"] is torch.nn.Linear
    assert kinds["base_model.model.lm_head"] is torch.nn.Linear
    lq, lf = q.per_sample_losses(mixed_samples[:3]), full.per_sample_losses(mixed_samples[:3])
    assert torch.isfinite(lq).all() and float((lq - lf).abs().max()) < 0.3


# ---- the influence engine on both families ------------------------------------------------------------------

def _engine(bundle, samples):
    from mmerase.influence import InfluenceEngine

    return InfluenceEngine(bundle.model, bundle.loss_fn, samples, collate_fn=bundle.collate)


def _rand_like(engine, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in engine.params]


def _rel(a, b):
    num = sum(float((x - y).norm() ** 2) for x, y in zip(a, b)) ** 0.5
    return num / sum(float(y.norm() ** 2) for y in b) ** 0.5


@pytest.mark.parametrize("family", ["llava", "text"])
def test_exact_hessian_products_match_finite_differences(family, llava64, llama64, mixed_samples):
    bundle, samples = (llava64, mixed_samples) if family == "llava" else (llama64, mixed_samples[3:5])
    engine = _engine(bundle, samples)
    v = _rand_like(engine, 1)
    hv = engine.product(v, "hessian", batch_size=4)
    fv = engine.product(v, "fd-hessian", batch_size=4)
    assert _rel(fv, hv) < 1e-4
    assert sum(float(h.norm()) for h in hv) > 0


def test_hvp_of_two_samples_is_mean_of_single_hvps(llava64, mixed_samples):
    engine = _engine(llava64, mixed_samples)
    v = _rand_like(engine, 2)
    pair = engine.product(v, "hessian", indices=[0, 4], batch_size=2)  # one padded batch: image + two-turn text
    one, two = (engine.product(v, "hessian", indices=[i], batch_size=1) for i in (0, 4))
    assert _rel(pair, [(a + b) / 2 for a, b in zip(one, two)]) < 1e-12


def test_edit_gradient_image_only_edit_and_identical_edit(llava64, mixed_samples):
    from mmerase.influence import Edit

    engine = _engine(llava64, mixed_samples)
    z = mixed_samples[0]
    new_image = modify_sample(z, image=Image.new("RGB", (16, 16), (255, 255, 255)))
    b = engine.edit_gradient([Edit(old=z, new=new_image)])
    assert new_image.conversations == z.conversations
    lora_part = sum(float(t.norm()) for n, t in zip(engine.names, b) if "lora_" in n)
    projector_part = sum(float(t.norm()) for n, t in zip(engine.names, b) if "multi_modal_projector" in n)
    assert lora_part > 1e-6 and projector_part > 1e-6
    same = engine.edit_gradient([Edit(old=z, new=modify_sample(z))])
    assert all(int(torch.count_nonzero(t)) == 0 for t in same)


@pytest.mark.parametrize("family", ["llava", "text"])
def test_same_engine_solve_serves_both_families(family, llava64, llama64, mixed_samples):
    from mmerase.influence import Edit, SolverConfig

    bundle, samples = (llava64, mixed_samples) if family == "llava" else (llama64, mixed_samples[3:5] + [
        _chat("Name a colour", "red", sid="c1"), _chat("Name a fruit", "pear", sid="c2")])
    engine = _engine(bundle, samples)
    edit = Edit(old=samples[3], new=modify_sample(samples[3], response="no"))
    # ggn: a PSD curvature built on the Task split (logits, then the per-sample-mean loss on them); the exact
    # Hessian of these random tiny models is indefinite, which CG rightly refuses. A large λ keeps CG to ~30 steps.
    result = engine.solve([edit], SolverConfig(method="cg", curvature="ggn", damping=100.0, tol=1e-8,
                                               max_steps=60, batch_size=8, progress=False))
    assert result.residual < 1e-8 and result.converged and result.steps < 60
    assert list(result.delta) == list(bundle.trainable_parameters())
    assert all(torch.isfinite(t).all() for t in result.delta.values())


def test_gradient_checkpointing_keeps_exact_hvps(tiny_llava_dir, mixed_samples):
    """Non-reentrant checkpointing (active in train mode) gives the same double-backward HVP as without it."""
    hvps = []
    for ckpt in (False, True):
        b = load_model(tiny_llava_dir, lora=LoraSettings(r=4), options=LoadOptions(
            dtype="float64", device="cpu", gradient_checkpointing=ckpt))
        perturb_lora_b(b.model)
        b.model.train()
        params = list(b.trainable_parameters().values())
        g = torch.Generator().manual_seed(3)
        v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
        grads = torch.autograd.grad(b.loss_fn(b.model, b.collate(mixed_samples[:4])), params, create_graph=True)
        hvps.append(torch.autograd.grad(sum((gr * t).sum() for gr, t in zip(grads, v)), params))
        assert b.model.get_base_model().model.language_model.gradient_checkpointing is ckpt
    assert _rel(hvps[1], hvps[0]) < 1e-12


def test_bfloat16_base_keeps_trainable_parameters_float32(tiny_llava_dir, tmp_path, mixed_samples):
    b = load_model(tiny_llava_dir, lora=LoraSettings(r=4, train_projector=True),
                   options=LoadOptions(dtype="bfloat16", device="cpu"))
    base = b.model.get_base_model()
    assert base.model.language_model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    assert {p.dtype for p in b.trainable_parameters().values()} == {torch.float32}
    perturb_lora_b(b.model)
    with torch.no_grad():
        for n, p in b.trainable_parameters().items():
            if "multi_modal_projector" in n:
                p.add_(1e-4)  # not representable in bfloat16 around these values
    again = load_model(tiny_llava_dir, adapter=b.save_adapter(tmp_path / "ad"),
                       options=LoadOptions(dtype="bfloat16", device="cpu"))
    before, after = b.trainable_parameters(), again.trainable_parameters()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert torch.equal(b.per_sample_losses(mixed_samples), again.per_sample_losses(mixed_samples))
