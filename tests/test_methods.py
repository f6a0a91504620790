"""Unlearning methods (finetune, ga, graddiff, npo, kl, influence, surrogate) through the CLI and the API on both tiny presets,
what defines each method against hand-computed float64 references, the one training loop (finetune reproduces
`mmerase finetune` bit for bit), and the compute accounting against passes counted by independent hooks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lora_points import perturb_lora_b
from safetensors.torch import load_file

from mmerase import methods as M
from mmerase.cli import main
from mmerase.data import Sample, digit_samples, modify_sample
from mmerase.influence import Edit, SolverConfig
from mmerase.models import LoadOptions, LoraSettings, load_model
from mmerase.training import TrainConfig

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
GRADIENT = ("finetune", "ga", "graddiff", "npo", "kl")
ASCENT = ("ga", "graddiff", "npo", "kl")
#: a few steps of every method (the CLI flags, and the same as API configs)
FLAGS = {"finetune": ["--edited-weight", "2"], "ga": [], "graddiff": ["--retain-weight", "0.5"],
         "npo": ["--beta", "0.5", "--npo-retain"], "kl": ["--retain-weight", "2"],
         "influence": ["--curvature", "ggn", "--damping", "1.0", "--max-steps", "80", "--no-stationarity-check"],
         "surrogate": ["--surrogate-samples", "6", "--surrogate-damping", "0.5", "--surrogate-krylov", "8",
                       "--surrogate-steps", "2", "--surrogate-prep-samples", "6", "--surrogate-batch-size", "4"]}
COMMON = {"lr": 1e-2, "batch_size": 3, "progress": False}
CONFIGS = {"finetune": M.FinetuneConfig(edited_weight=2.0, **COMMON), "ga": M.GAConfig(**COMMON),
           "graddiff": M.GradDiffConfig(retain_weight=0.5, **COMMON),
           "npo": M.NPOConfig(beta=0.5, npo_retain=True, **COMMON), "kl": M.KLConfig(retain_weight=2.0, **COMMON),
           "influence": SolverConfig(curvature="ggn", damping=1.0, max_steps=80, stationarity_check=False,
                                     progress=False),
           "surrogate": M.SurrogateConfig(samples=6, damping=0.5, krylov=8, steps=2, prep_samples=6, batch_size=4)}
#: the methods that spend no budget (their settings decide their cost)
UNBUDGETED = ("influence", "surrogate")
BUDGET = "40%"  # of one retraining (2 epochs × 12 samples = 24 sample passes): 9.6 sample passes
CPU = LoadOptions(device="cpu")


def _text(i: int, answer: str | None = None) -> Sample:
    return Sample(f"q{i}", [{"from": "human", "value": f"Spell {i}"},
                            {"from": "gpt", "value": answer or WORDS[i % 10]}])


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _edit_rows(image: str | None) -> list[dict]:
    """remove, correct, modify (a new image when given, else a new question), then add."""
    modify = {"op": "modify", "id": "q3", **({"image": image} if image else {"query": "Spell three"})}
    added = {"id": "new", "conversations": [{"from": "human", "value": "Spell 42"},
                                            {"from": "gpt", "value": "forty-two"}]}
    return [{"op": "remove", "id": "q1"}, {"op": "correct", "id": "q2", "response": "TWO"}, modify,
            {"op": "add", "sample": added}]


def _scenario(root: Path, base: str, images: bool) -> dict:
    """12 training samples (digit images for tiny-llava), an adapter from `mmerase finetune` (2 epochs), and two
    edits files: every op the ascent family serves, and the same plus an `add`."""
    root.mkdir(parents=True, exist_ok=True)
    if images:
        samples = digit_samples(range(12), prefix="q")
        (root / "img").mkdir()
        for s in samples:
            s.image.save(root / "img" / f"{s.id}.png")
        rows = [{"id": s.id, "image": f"img/{s.id}.png", "conversations": s.conversations} for s in samples]
        digit_samples([20])[0].image.save(root / "img" / "new.png")
    else:
        rows = [{"id": s.id, "conversations": s.conversations} for s in (_text(i) for i in range(12))]
    data = _write_jsonl(root / "train.jsonl", rows)
    edits = _edit_rows("img/new.png" if images else None)
    adapter = root / "adapter"
    assert main(["finetune", "--base", base, "--data", data, "--out", adapter, "--epochs", "2", "--lr", "5e-3",
                 "--lora-r", "4", "--batch-size", "4", "--no-progress"]) == 0
    return {"root": root, "base": base, "data": data, "adapter": adapter,
            "edits": _write_jsonl(root / "edits.jsonl", edits[:3]),
            "edits_add": _write_jsonl(root / "edits_add.jsonl", edits)}


@pytest.fixture(scope="module")
def scenarios(tiny_llama_dir, tiny_llava_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    return {"tiny-llama": _scenario(root / "llama", str(tiny_llama_dir), images=False),
            "tiny-llava": _scenario(root / "llava", str(tiny_llava_dir), images=True)}


def _edits_file(sc: dict, method: str) -> Path:
    return sc["edits"] if method in ASCENT else sc["edits_add"]


def _run_cli(sc: dict, method: str, out: Path, *extra, capsys=None) -> tuple[int, str, str]:
    args = ["unlearn", "--base", sc["base"], "--adapter", sc["adapter"], "--data", sc["data"], "--edits",
            _edits_file(sc, method), "--out", out, "--method", method, "--no-progress", *FLAGS[method], *extra]
    if method not in UNBUDGETED:
        args += ["--budget", BUDGET, "--method-lr", "1e-2", "--method-batch-size", "3"]
    code = main([str(a) for a in args])
    out_err = capsys.readouterr() if capsys is not None else ("", "")
    return code, out_err[0], out_err[1]


@pytest.fixture(scope="module")
def cli_runs(scenarios, tmp_path_factory):
    """Every method on both presets through `mmerase unlearn` (each with every op it serves)."""
    root = tmp_path_factory.mktemp("cli-runs")
    runs = {}
    for model, sc in scenarios.items():
        for method in (*GRADIENT, *UNBUDGETED):
            out = root / f"{model}-{method}"
            code, _, _ = _run_cli(sc, method, out)
            runs[model, method] = {"code": code, "out": out}
    return runs


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-llava"])
@pytest.mark.parametrize("method", [*GRADIENT, *UNBUDGETED])
def test_every_method_through_the_cli_and_the_api(scenarios, cli_runs, model, method):
    """The CLI writes a new adapter with a run record (method, config, budget, steps, losses, accounting within the
    budget); the API on the same request gives the same adapter (the workflow is a thin layer over it)."""
    sc, run = scenarios[model], cli_runs[model, method]
    assert run["code"] == 0
    rec = json.loads((run["out"] / "mmerase_record.json").read_text())
    ops = {"remove": 1, "correct": 1, "modify": 1} | ({} if method in ASCENT else {"add": 1})
    assert rec["ops"] == ops and rec["method"]["name"] == method and rec["chain"][-1]["method"] == method
    acc = rec["accounting"]
    assert rec["retraining"] == {"passes": 24, "source": "adapter run record"}
    assert acc["retraining_fraction"] == pytest.approx(acc["sample_passes"] / 24)
    assert acc["forward_passes"] > 0 and acc["backward_passes"] > 0 and acc["cpu_s"] > 0
    if method == "surrogate":
        assert rec["result"]["surrogate_samples"] == 6 and rec["result"]["damping"] == 0.5
        assert 8 <= rec["result"]["directions"] <= 10 and rec["method"]["config"]["krylov"] == 8
    elif method != "influence":
        assert rec["method"]["budget"] == {"requested": "40%", "sample_passes": pytest.approx(9.6)}
        assert acc["within_budget"] and acc["sample_passes"] == pytest.approx(rec["result"]["planned_sample_passes"])
        assert rec["result"]["steps"] >= 1 and len(rec["result"]["step_losses"]) == rec["result"]["steps"]
        assert rec["method"]["config"]["lr"] == 1e-2 and rec["method"]["config"]["batch_size"] == 3
    else:
        assert rec["result"]["converged"] and acc["product_samples"] > 0 and acc["product_cost_gradients"] > 0
    # the same request through the API
    from mmerase.data import load_dataset
    from mmerase.editfile import parse_edits

    train = load_dataset(sc["data"])
    edits = [r.edit for r in parse_edits(_edits_file(sc, method), train)]
    bundle = load_model(sc["base"], adapter=sc["adapter"], options=CPU)
    result = M.unlearn(bundle, train, edits, method, CONFIGS[method], None if method in UNBUDGETED else 9.6)
    before = load_file(sc["adapter"] / "adapter_model.safetensors")
    after = load_file(run["out"] / "adapter_model.safetensors")
    api = {k: v for k, v in bundle.model.state_dict().items() if "lora_" in k}
    for key, value in after.items():  # influence on LLaVA: the workflow caches image features (exact to rounding)
        mine = next(v for k, v in api.items() if k.replace(".default", "") == key)
        assert torch.equal(mine, value) if method not in UNBUDGETED else torch.allclose(mine, value, rtol=1e-4,
                                                                                        atol=1e-6), key
    moved = sum(float((after[k] - before[k]).norm()) for k in after)
    assert moved > 1e-4
    assert result.accounting.sample_passes == pytest.approx(acc["sample_passes"])
    names = list(result.parameters)
    assert all(torch.equal(result.parameters[n], p) for n, p in zip(names, bundle.trainable_parameters().values()))


# ---- refusals, before any work -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ASCENT)
def test_an_op_the_method_cannot_serve_is_refused_before_any_work(scenarios, tmp_path, capsys, method):
    sc = dict(scenarios["tiny-llama"], base=str(tmp_path / "no-such-base"))  # loading it would fail differently
    args = ["unlearn", "--base", sc["base"], "--adapter", sc["adapter"], "--data", sc["data"], "--edits",
            sc["edits_add"], "--out", tmp_path / "out", "--method", method, "--budget", "10"]
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"mmerase unlearn: error: method '{method}' cannot serve 'add' edits (edits file line 4); "
                   "use --method influence or finetune or surrogate")
    assert not (tmp_path / "out").exists()
    # the API: refused before any pass through the model
    bundle = load_model(scenarios["tiny-llama"]["base"], lora=LoraSettings(r=4), options=CPU)
    calls = []
    bundle.model.register_forward_pre_hook(lambda *a: calls.append(1))
    train = [_text(i) for i in range(4)]
    with pytest.raises(M.MethodError, match=rf"^method '{method}' cannot serve 'add' edits \(edit #2\)"):
        M.unlearn(bundle, train, [Edit(old=train[0]), Edit(new=_text(9))], method, budget=10)
    assert calls == []


@pytest.mark.parametrize("budget", ["0", "-5", "0%"])
def test_a_budget_not_above_zero_is_refused(scenarios, tmp_path, capsys, budget):
    sc = scenarios["tiny-llama"]
    args = ["unlearn", "--base", tmp_path / "no-such-base", "--adapter", sc["adapter"], "--data", sc["data"],
            "--edits", sc["edits"], "--out", tmp_path / "out", "--method", "ga", "--budget", budget]
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmerase unlearn: error: budget must be > 0") and "(option --budget)" in err
    assert "\n" not in err
    with pytest.raises(M.MethodError, match="budget must be > 0"):
        M.Budget.parse(budget)


def test_budget_errors_name_what_to_do(scenarios, tmp_path, capsys):
    sc = scenarios["tiny-llama"]
    train = [_text(i) for i in range(4)]
    bundle = load_model(sc["base"], lora=LoraSettings(r=4), options=CPU)
    with pytest.raises(M.MethodError, match="needs a compute budget"):
        M.unlearn(bundle, train, [Edit(old=train[0])], "ga")
    with pytest.raises(M.MethodError, match="give --retrain-passes N or a budget in sample passes"):
        M.unlearn(bundle, train, [Edit(old=train[0])], "ga", budget="10%")
    with pytest.raises(M.MethodError, match="does not cover one step of 'ga'"):
        M.unlearn(bundle, train, [Edit(old=train[0])], "ga", M.GAConfig(batch_size=1), budget=0.5)
    args = ["unlearn", "--base", sc["base"], "--adapter", sc["adapter"], "--data", sc["data"], "--edits",
            sc["edits"], "--out", tmp_path / "out", "--method", "ga", "--budget", "5", "--beta", "0.3"]
    assert main([str(a) for a in args]) == 2
    assert capsys.readouterr().err.strip() == ("mmerase unlearn: error: --beta does not apply to --method ga (it is "
                                               "an option of --method npo)")


# ---- what defines each method (float64, hand-computed references) --------------------------------------------------

@pytest.fixture(scope="module")
def f64(tiny_llama_dir):
    """A float64 tiny-llama with a generic LoRA point, 8 training samples, a remove and a correct edit."""
    bundle = load_model(tiny_llama_dir, lora=LoraSettings(r=4), options=LoadOptions(device="cpu", dtype="float64"))
    perturb_lora_b(bundle.model)
    train = [_text(i) for i in range(8)]
    edits = [Edit(old=train[1]), Edit(old=train[2], new=modify_sample(train[2], response="TWO"))]
    return bundle, train, edits


def _job(f64, method: str, **config):
    bundle, train, edits = f64
    spec, job, _ = M.run.make_job(bundle, train, edits, method, M.CONFIGS[method](batch_size=64, **config), 1e6,
                                  None, None)
    sets = M.gradient.EditSets.split(train, edits)
    return spec, job, sets


def _objective_gradient(spec, job, sets) -> tuple[float, list[torch.Tensor]]:
    """The value and gradient of a method's step objective with every stream's batch = its whole set."""
    streams = spec.streams(job, sets)
    batches = {s.name: list(s.samples) for s in streams}
    value, grad = 0.0, [torch.zeros_like(p) for p in job.engine.params]
    for _, term in spec.terms(job, batches):  # each term's graph used before the next is built, as the loop does
        value += float(term.detach())
        grad = [g + t for g, t in zip(grad, torch.autograd.grad(term, job.engine.params))]
    return value, grad


def _hand_logits(bundle, samples) -> tuple[torch.Tensor, torch.Tensor]:
    batch = bundle.collate(samples)
    out = bundle.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], use_cache=False).logits
    return out.double(), batch["labels"]


def _hand_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    m = logits.max(dim=-1, keepdim=True).values.detach()
    return logits - (m + torch.log(torch.exp(logits - m).sum(dim=-1, keepdim=True)))


def _hand_response(logits, labels):
    """log-probabilities over the vocabulary at each position predicting a response token, and those tokens."""
    lp = _hand_log_softmax(logits[:, :-1])
    target = labels[:, 1:]
    mask = target != -100
    return lp, target, mask


def _hand_mean_losses(bundle, samples) -> torch.Tensor:
    logits, labels = _hand_logits(bundle, samples)
    lp, target, mask = _hand_response(logits, labels)
    tok = lp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return -(tok * mask).sum(1) / mask.sum(1)


def _per_sample_mean_gradient(bundle, samples, params) -> list[torch.Tensor]:
    """mean over samples of ∇ℓ(z), each sample's gradient on its own (per-sample autograd)."""
    total = [torch.zeros_like(p) for p in params]
    for s in samples:
        g = torch.autograd.grad(_hand_mean_losses(bundle, [s])[0], params)
        total = [t + gi / len(samples) for t, gi in zip(total, g)]
    return total


def _rel(a, b) -> float:
    num = sum(float((x - y).norm() ** 2) for x, y in zip(a, b)) ** 0.5
    return num / sum(float(y.norm() ** 2) for y in b) ** 0.5


def test_ga_and_graddiff_gradients_are_per_sample_references(f64):
    """ga's objective gradient = −mean_F ∇ℓ + mean_N ∇ℓ; graddiff's = ga's + w·mean_R ∇ℓ (per-sample autograd)."""
    bundle, train, edits = f64
    spec, job, sets = _job(f64, "ga")
    params = job.engine.params
    value, ga = _objective_gradient(spec, job, sets)
    forget = _per_sample_mean_gradient(bundle, sets.forget, params)
    new = _per_sample_mean_gradient(bundle, sets.new, params)
    assert _rel(ga, [n - f for n, f in zip(new, forget)]) < 1e-10
    assert value == pytest.approx(float(_hand_mean_losses(bundle, sets.new).mean()
                                        - _hand_mean_losses(bundle, sets.forget).mean()), rel=1e-12)
    spec, job, sets = _job(f64, "graddiff", retain_weight=0.7)
    _, graddiff = _objective_gradient(spec, job, sets)
    retain = _per_sample_mean_gradient(bundle, [s for s in train if s.id not in ("q1", "q2")], params)
    assert _rel(graddiff, [g + 0.7 * r for g, r in zip(ga, retain)]) < 1e-10


def test_npo_loss_and_gradient_equal_a_hand_computed_reference(f64):
    """(2/β)·mean_F log(1 + (π_θ/π_θ̂)^β) with π the response's sequence probability, from logits by hand."""
    bundle, train, edits = f64
    spec, job, sets = _job(f64, "npo", beta=0.7)
    params = job.engine.params

    def seq_logp(samples):
        logits, labels = _hand_logits(bundle, samples)
        lp, target, mask = _hand_response(logits, labels)
        return (lp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask).sum(1)

    with torch.no_grad():
        reference = seq_logp(sets.forget)
    spec.prepare(job, sets)  # the method's reference log π_θ̂, at θ̂
    perturb_lora_b(bundle.model, seed=7, scale=0.05)  # θ ≠ θ̂: the ratio is not 1
    try:
        value, grad = _objective_gradient(spec, job, sets)
        ratio = torch.exp(seq_logp(sets.forget) - reference)
        hand = (2 / 0.7) * torch.log(1 + ratio ** 0.7).mean() + _hand_mean_losses(bundle, sets.new).mean()
        hand_grad = torch.autograd.grad(hand, params)
    finally:
        perturb_lora_b(bundle.model)
    assert value == pytest.approx(float(hand), rel=1e-12)
    assert _rel(grad, hand_grad) < 1e-10
    assert float(ratio.min()) != pytest.approx(1.0, abs=1e-3)


def test_kl_term_equals_a_hand_computed_kl(f64):
    """mean_R over samples of the mean over response positions of KL(π_θ̂ ‖ π_θ), from logits by hand."""
    bundle, train, edits = f64
    spec, job, sets = _job(f64, "kl", retain_weight=1.0)
    params = job.engine.params
    with torch.no_grad():
        logits_hat, labels = _hand_logits(bundle, sets.retain)
    spec.prepare(job, sets)  # θ̂
    perturb_lora_b(bundle.model, seed=8, scale=0.05)
    try:
        streams = spec.streams(job, sets)
        (name, term), = list(spec.retain_terms(job, list(next(s for s in streams if s.name == "retain").samples)))
        grad = torch.autograd.grad(term, params)
        logits, _ = _hand_logits(bundle, sets.retain)
        log_p, _, mask = _hand_response(logits_hat, labels)
        log_q, _, _ = _hand_response(logits, labels)
        kl = (torch.exp(log_p) * (log_p - log_q)).sum(-1)
        hand = ((kl * mask).sum(1) / mask.sum(1)).mean()
        hand_grad = torch.autograd.grad(hand, params)
    finally:
        perturb_lora_b(bundle.model)
    assert name == "kl" and float(term) == pytest.approx(float(hand), rel=1e-10) and float(hand) > 1e-4
    assert _rel(grad, hand_grad) < 1e-9


def test_ga_raises_the_forgotten_samples_loss(f64, tiny_llama_dir):
    bundle = load_model(tiny_llama_dir, lora=LoraSettings(r=4), options=LoadOptions(device="cpu", dtype="float64"))
    perturb_lora_b(bundle.model)
    train = [_text(i) for i in range(8)]
    forget = [train[1], train[4]]
    with torch.no_grad():
        before = _hand_mean_losses(bundle, forget)
    result = M.unlearn(bundle, train, [Edit(old=s) for s in forget], "ga", M.GAConfig(lr=1e-2, batch_size=2),
                       budget=8)
    with torch.no_grad():
        after = _hand_mean_losses(bundle, forget)
    assert result.info["steps"] == 4
    assert bool((after > before + 1.0).all()), (before, after)


# ---- the one training loop ----------------------------------------------------------------------------------------

def test_finetune_from_the_lora_init_with_the_retraining_recipe_is_mmerase_finetune(scenarios, tmp_path):
    """`mmerase finetune` on the edited data (written here: q1 dropped, q2 corrected in place, q3's new question,
    the added sample last) and the finetune method on the original data + edits, started from the same LoRA
    initialisation with the same recipe and a budget of epochs × n′: bit-identical adapters."""
    sc = scenarios["tiny-llama"]
    rows = [{"id": s.id, "conversations": s.conversations} for s in (_text(i) for i in range(12))]
    rows = [r for r in rows if r["id"] != "q1"]
    rows[1]["conversations"] = [rows[1]["conversations"][0], {"from": "gpt", "value": "TWO"}]
    rows[2]["conversations"] = [{"from": "human", "value": "Spell three"}, rows[2]["conversations"][1]]
    rows.append({"id": "new", "conversations": [{"from": "human", "value": "Spell 42"},
                                                {"from": "gpt", "value": "forty-two"}]})
    edited = _write_jsonl(tmp_path / "edited.jsonl", rows)
    recipe = TrainConfig(epochs=2, batch_size=5, lr=3e-3, l2=1e-3, schedule="cosine", warmup_steps=2, seed=4,
                         progress=False)
    lora = LoraSettings(r=4, dropout=0.1, seed=4)  # dropout: the loop's RNG must match too
    assert main(["finetune", "--base", sc["base"], "--data", str(edited), "--out", str(tmp_path / "retrained"),
                 "--epochs", "2", "--batch-size", "5", "--lr", "3e-3", "--l2", "1e-3", "--schedule", "cosine",
                 "--warmup-steps", "2", "--seed", "4", "--lora-r", "4", "--lora-dropout", "0.1",
                 "--no-progress"]) == 0
    from mmerase.data import load_dataset
    from mmerase.editfile import parse_edits

    train = load_dataset(sc["data"])
    edits = [r.edit for r in parse_edits(sc["edits_add"], train)]
    bundle = load_model(sc["base"], lora=lora, options=CPU)
    result = M.unlearn(bundle, train, edits, "finetune", M.FinetuneConfig.from_train_config(recipe),
                       budget=2 * len(rows))
    bundle.save_adapter(tmp_path / "method")
    want = load_file(tmp_path / "retrained" / "adapter_model.safetensors")
    got = load_file(tmp_path / "method" / "adapter_model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    rec = json.loads((tmp_path / "retrained" / "mmerase_record.json").read_text())
    assert result.info["steps"] == rec["result"]["steps"] == 2 * 3
    assert result.accounting.sample_passes == 2 * len(rows)


def test_checkpoints_at_nested_budgets_equal_separate_runs(tiny_llama_dir):
    """With the constant schedule a checkpoint at budget B in a longer run holds exactly a run with budget B."""
    bundle = load_model(tiny_llama_dir, lora=LoraSettings(r=4), options=LoadOptions(device="cpu", dtype="float64"))
    perturb_lora_b(bundle.model)
    train = [_text(i) for i in range(8)]
    edits = [Edit(old=train[1]), Edit(old=train[2], new=modify_sample(train[2], response="TWO"))]
    seen = {}

    def keep(info):
        seen[info.step] = (info, [p.detach().clone() for p in bundle.trainable_parameters().values()])

    cfg = M.GradDiffConfig(lr=1e-2, batch_size=2)
    M.unlearn(bundle, train, edits, "graddiff", cfg, budget=30, checkpoints=M.Checkpoints(keep, at=(12, "50%")),
              retrain_passes=40, apply=False)
    assert sorted(seen) == [2, 4]  # a step costs 2 + 1 + 2 = 5 sample passes: 2 fit in 12, 4 in 20 (50% of 40)
    assert seen[4][0].sample_passes == 20 and seen[4][0].budget == 20 and seen[2][0].budget == 12
    short = M.unlearn(bundle, train, edits, "graddiff", cfg, budget=12)
    assert short.info["steps"] == 2
    assert all(torch.equal(a, b) for a, b in zip(short.parameters.values(), seen[2][1]))


# ---- the accounting -----------------------------------------------------------------------------------------------

class _IndependentCounter:
    """Passes counted away from the accounting's hooks: rows entering the embedding layer (forward pre-hook), and
    gradient sweeps through the last decoder layer (a module backward hook, and for a double backward a hook on the
    gradient it saw)."""

    def __init__(self, model):
        base = model.get_base_model().model
        self.forward = self.backward = 0
        self.handles = [base.embed_tokens.register_forward_pre_hook(self._rows),
                        base.layers[-1].register_full_backward_hook(self._backward)]

    def _rows(self, _m, args):
        self.forward += args[0].shape[0]

    def _sweep(self, rows):
        def hook(g):
            self.backward += rows
            if g.requires_grad:
                g.register_hook(self._sweep(rows))
        return hook

    def _backward(self, _m, _grad_in, grad_out):
        self._sweep(grad_out[0].shape[0])(grad_out[0])

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("method", [*GRADIENT, "influence"])
def test_accounting_counts_the_passes_actually_made(tiny_llama_dir, method):
    """Every pass of a request — for influence with an exact Hessian: b, the damping estimate, CG, a refinement
    step with its line search and the stationarity check — counted by independent hooks equals the accounting."""
    bundle = load_model(tiny_llama_dir, lora=LoraSettings(r=4), options=CPU)
    perturb_lora_b(bundle.model)
    train = [_text(i) for i in range(7)]
    edits = [Edit(old=train[1]), Edit(old=train[2], new=modify_sample(train[2], response="TWO"))]
    if method in ("finetune", "influence"):
        edits.append(Edit(new=_text(20)))
    config = SolverConfig(damping="auto", damping_steps=3, max_steps=5, refine_steps=1, refine_damping="step",
                          batch_size=3, progress=False) if method == "influence" else M.CONFIGS[method](
        lr=1e-3, batch_size=2, progress=False, **({"npo_retain": True} if method == "npo" else {}))
    counter = _IndependentCounter(bundle.model)
    seen = []
    try:
        result = M.unlearn(bundle, train, edits, method, config, budget=20,
                           checkpoints=M.Checkpoints(seen.append, every=1))
    finally:
        counter.close()
    acc = result.accounting
    assert (acc.forward_passes, acc.backward_passes) == (counter.forward, counter.backward)
    # checkpoints: every step (every Newton step for influence), with the passes spent so far
    assert [c.step for c in seen] == list(range(1, len(seen) + 1)) and len(seen) >= 1
    passes = [c.sample_passes for c in seen]
    assert passes == sorted(passes) and passes[-1] <= acc.sample_passes + 1e-9
    assert acc.forward_passes > 0 and acc.backward_passes > 0
    if method == "influence":
        assert acc.backward_passes > acc.forward_passes  # double backwards
        assert acc.within_budget is False and acc.product_samples > 0
    else:
        assert acc.sample_passes == pytest.approx(result.info["planned_sample_passes"]) and acc.within_budget
        assert len(seen) == result.info["steps"] and passes[-1] == pytest.approx(acc.sample_passes)
    if method == "ga":  # the two old versions and the corrected one's new version
        assert acc.samples_touched == 3


def test_estimate_prints_the_cost_and_writes_nothing(scenarios, tmp_path, capsys):
    sc = scenarios["tiny-llama"]
    out = tmp_path / "out"
    code, stdout, _ = _run_cli(sc, "kl", out, "--estimate", capsys=capsys)
    assert code == 0 and not out.exists() and not list(tmp_path.iterdir())
    code2, _, _ = _run_cli(sc, "kl", out, capsys=capsys)
    rec = json.loads((out / "mmerase_record.json").read_text())
    passes = rec["accounting"]["sample_passes"]
    assert f"{rec['result']['steps']} steps, {passes:.0f} sample passes ({passes / 24:.3g} of a retraining)" in stdout
    assert stdout.strip().endswith("nothing was written")
    code, stdout, _ = _run_cli(sc, "influence", tmp_path / "inf", "--estimate", capsys=capsys)
    assert code == 0 and "at most" in stdout and not (tmp_path / "inf").exists()
    # the surrogate's estimate is approximate: within a factor 2 of the passes its run counts, anchored or not
    for name, extra in (("sur", ()), ("anchored", ("--surrogate-anchored",))):
        code, stdout, _ = _run_cli(sc, "surrogate", tmp_path / name, "--estimate", *extra, capsys=capsys)
        assert code == 0 and not (tmp_path / name).exists()
        estimated = float(stdout.split(" sample passes")[0].split()[-1])
        assert _run_cli(sc, "surrogate", tmp_path / name, *extra)[0] == 0
        rec = json.loads((tmp_path / name / "mmerase_record.json").read_text())
        assert rec["result"]["anchored"] == bool(extra)
        counted = rec["accounting"]["sample_passes"]
        assert counted / 2 <= estimated <= 2 * counted, (name, estimated, counted)


def test_nf4_base_gradients_equal_those_of_the_dequantized_linear(tiny_llava_dir):
    """The ascent objectives through bitsandbytes' Linear4bit (CPU) equal those through nn.Linear layers holding the
    dequantized weights, and a run on the NF4 base spends its budget."""
    bnb = pytest.importorskip("bitsandbytes")
    from mmerase.models.quant import dequantized_copy

    def dequantize_all(model) -> int:
        swapped = [(module, name, child) for module in list(model.modules())
                   for name, child in module.named_children() if isinstance(child, bnb.nn.Linear4bit)]
        for module, name, child in swapped:
            setattr(module, name, dequantized_copy(child))
        return len(swapped)

    samples = digit_samples(range(4)) + [_text(1)]
    edits = [Edit(old=samples[1]), Edit(old=samples[4], new=modify_sample(samples[4], response="ONE"))]
    bundles = []
    for dequantize in (False, True):
        b = load_model(tiny_llava_dir, lora=LoraSettings(r=4), options=LoadOptions(quantization="nf4", device="cpu"))
        perturb_lora_b(b.model)
        if dequantize:
            assert dequantize_all(b.model) == 14
        bundles.append(b)
    for method in ("graddiff", "npo", "kl"):
        grads = []
        for b in bundles:
            spec, job, _ = M.run.make_job(b, samples, edits, method, M.CONFIGS[method](batch_size=8), 1e6, None, None)
            sets = M.gradient.EditSets.split(samples, edits)
            spec.prepare(job, sets)
            grads.append(_objective_gradient(spec, job, sets)[1])
        assert _rel(grads[0], grads[1]) < 1e-5, method
    result = M.unlearn(bundles[0], samples, edits, "npo", M.NPOConfig(lr=1e-2, batch_size=2), budget=12)
    assert result.info["steps"] >= 1 and result.accounting.within_budget
