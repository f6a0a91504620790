"""Preconditioners and preconditioned solvers (issue 7): a prepared solve gives the cold solve's δ to the tolerance in
fewer products, the preconditioners are what they claim to be, and they survive a save/load round trip."""

from __future__ import annotations

import pytest
import torch
from test_engine import DT, CETask, dense_ggn, lora_engine, make_data  # noqa: F401  (shared fixtures)
from lora_points import perturb_lora_b

from mmerase import Edit, InfluenceEngine, SolverConfig
from mmerase.data import Sample, digit_samples, modify_sample
from mmerase.influence import InfluenceError
from mmerase.influence import vectors as V
from mmerase.influence.lanczos import lanczos
from mmerase.influence.precondition import DiagonalPreconditioner, PreconditionerConfig, build_preconditioner
from mmerase.models import LoadOptions, LoraSettings, load_model
from mmerase.prepare import load_preparation, prepare, save_preparation

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _rel(a: dict, b: dict) -> float:
    fa, fb = V.flatten(list(a.values())), V.flatten(list(b.values()))
    return float((fa - fb).norm() / fb.norm())




def _family_engine(family, tiny_llava_dir, tiny_llama_dir):
    path = tiny_llava_dir if family == "llava" else tiny_llama_dir
    bundle = load_model(path, lora=LoraSettings(r=2), options=LoadOptions(dtype="float64", device="cpu"))
    perturb_lora_b(bundle.model)
    if family == "llava":
        samples = digit_samples(range(6))
    else:
        samples = [Sample(f"q{i}", [{"from": "human", "value": f"Spell {i}"}, {"from": "gpt", "value": WORDS[i]}])
                   for i in range(6)]
    cache = bundle.feature_cache()
    loss_fn, collate = (bundle.loss_fn, bundle.collate) if cache is None else (cache.loss_fn, cache.collate)
    engine = InfluenceEngine(bundle.model, loss_fn, samples, collate_fn=collate)
    edits = [Edit(old=samples[0], new=modify_sample(samples[0], response="nine")), Edit(old=samples[1])]
    return engine, edits


@pytest.mark.parametrize("family", ["llava", "text"])
def test_preconditioned_cg_equals_cold_cg_in_fewer_products(family, tiny_llava_dir, tiny_llama_dir):
    engine, edits = _family_engine(family, tiny_llava_dir, tiny_llama_dir)
    cfg = SolverConfig(method="cg", curvature="ggn", damping=3.0, tol=1e-8, max_steps=200, batch_size=16,
                       progress=False, stationarity_check=False)
    cold = engine.solve(edits, cfg)
    pre = build_preconditioner(engine, "ggn", 3.0, PreconditionerConfig(kind="lowrank", rank=24, batch_size=16))
    warm = engine.solve(edits, cfg, preconditioner=pre)
    assert cold.converged and warm.converged and warm.residual < 1e-8
    assert _rel(warm.delta, cold.delta) < 1e-6  # the same δ to the tolerance
    assert warm.product_samples < 0.7 * cold.product_samples and warm.steps < cold.steps
    assert warm.info["preconditioned"] and not cold.info["preconditioned"]


@pytest.fixture(scope="module")
def mlp_problem():
    eng = lora_engine(n=60)
    d = eng.train_set
    edits = [Edit(old=d[0]), Edit(old=d[1], new=(d[1][0], (d[1][1] + 1) % 3))]
    cold = eng.solve(edits, SolverConfig(method="dense", curvature="ggn", damping=0.01, progress=False))
    return eng, edits, cold


@pytest.mark.parametrize("kind", ["diagonal", "kfac", "ekfac", "lowrank"])
def test_every_preconditioner_keeps_cg_exact(mlp_problem, kind):
    eng, edits, ref = mlp_problem
    pre = build_preconditioner(eng, "ggn", 0.01, PreconditionerConfig(kind=kind, rank=8, batch_size=7))
    res = eng.solve(edits, SolverConfig(method="cg", curvature="ggn", damping=0.01, tol=1e-10, max_steps=300,
                                        progress=False), preconditioner=pre)
    assert res.converged and _rel(res.delta, ref.delta) < 1e-7


def test_auto_damping_with_a_preconditioner_takes_its_lambda(mlp_problem):
    eng, edits, ref = mlp_problem
    pre = build_preconditioner(eng, "ggn", 0.01, PreconditionerConfig(kind="lowrank", rank=8, batch_size=7))
    res = eng.solve(edits, SolverConfig(method="prepared", curvature="ggn", progress=False), preconditioner=pre)
    assert res.config["damping"] == 0.01 and res.info["damping"]["rule"] == "the preconditioner's λ"
    assert res.product_samples == eng.n  # the one residual product: no spectrum estimate


def test_full_rank_lanczos_is_the_exact_inverse(mlp_problem):
    """Lanczos run to the parameter count finds every eigenpair: M = (H+λI)⁻¹, PCG needs one step, 'prepared' is
    exact."""
    eng, edits, ref = mlp_problem
    n = sum(p.numel() for p in eng.params)
    pre = build_preconditioner(eng, "ggn", 0.01, PreconditionerConfig(kind="lowrank", rank=n, batch_size=60))
    cfg = SolverConfig(method="cg", curvature="ggn", damping=0.01, tol=1e-8, progress=False)
    assert eng.solve(edits, cfg, preconditioner=pre).steps == 1
    direct = eng.solve(edits, SolverConfig(method="prepared", curvature="ggn", damping=0.01, progress=False),
                       preconditioner=pre)
    assert _rel(direct.delta, ref.delta) < 1e-8 and direct.product_samples == eng.n  # one residual product

    class TenTimes:  # an M that overestimates (H+λI)⁻¹ tenfold: the step α = 1/10 undoes it
        def apply(self, r):
            return V.scale(10.0, pre.apply(r))

    scaled = eng.solve(edits, SolverConfig(method="prepared", curvature="ggn", damping=0.01, progress=False),
                       preconditioner=TenTimes())
    assert _rel(scaled.delta, ref.delta) < 1e-8 and abs(scaled.info["step"] - 0.1) < 1e-9


def test_lanczos_ritz_values_are_eigenvalues():
    eng = lora_engine(n=30)
    h = dense_ggn(eng)
    values, vectors, resid, info = lanczos(lambda v: eng.product(v, "ggn"), eng.params, 6, seed=1)
    for theta, y, r in zip(values, vectors, resid):  # each pair satisfies its residual bound
        assert float((h @ y - theta * y).norm()) <= float(r) + 1e-10
    assert abs(float(values[0]) - float(torch.linalg.eigvalsh(h)[-1])) < 1e-8 * float(values[0])


def test_diagonal_is_the_per_sample_gradient_second_moment():
    """Without drawn targets (a loss that cannot draw them) the diagonal is exactly that of the empirical Fisher."""
    eng = lora_engine(n=40)
    p = sum(t.numel() for t in eng.params)
    eye = torch.eye(p, dtype=DT)
    fisher_diag = torch.stack([V.flatten(eng.product(V.unflatten(eye[i], eng.params), "fisher"))[i]
                               for i in range(p)])
    pre = build_preconditioner(eng, "fisher", 0.1, PreconditionerConfig(kind="diagonal", probes=0, batch_size=7))
    assert torch.allclose(V.flatten(pre.diag), fisher_diag, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kind", ["diagonal", "kfac", "ekfac", "lowrank"])
def test_preparation_round_trip(mlp_problem, kind, tmp_path):
    eng, _, _ = mlp_problem
    solver = SolverConfig(curvature="ggn", damping=0.01)
    prep = prepare(eng, solver, PreconditionerConfig(kind=kind, rank=6, batch_size=7), adapter_sha256="a",
                   data_sha256="d")
    loaded = load_preparation(save_preparation(prep, tmp_path / kind))
    r = [torch.randn(p.shape, dtype=DT, generator=torch.Generator().manual_seed(2)) for p in eng.params]
    before, after = prep.preconditioner.apply(r), loaded.preconditioner.apply(r)
    assert V.norm(V.sub(after, before)) <= 1e-14 * V.norm(before)
    assert loaded.record["kind"] == kind and loaded.damping == 0.01 and loaded.curvature == "ggn"
    assert loaded.record["build"]["product_samples"] == prep.preconditioner.meta["product_samples"]


def test_preconditioned_stochastic_solver_beats_adam_at_equal_products(mlp_problem):
    eng, edits, ref = mlp_problem
    pre = build_preconditioner(eng, "ggn", 0.01, PreconditionerConfig(kind="lowrank", rank=8, batch_size=60))
    cfg = dict(method="stochastic", curvature="ggn", damping=0.01, batch_size=20, max_steps=150, tol=1e-12,
               eval_every=50, progress=False)
    adam = eng.solve(edits, SolverConfig(**cfg))
    pre_sgd = eng.solve(edits, SolverConfig(**cfg), preconditioner=pre)
    assert pre_sgd.product_samples <= adam.product_samples
    assert _rel(pre_sgd.delta, ref.delta) < 0.05 < _rel(adam.delta, ref.delta)


def test_prepared_solver_and_mismatched_preconditioner_are_clear_errors(mlp_problem):
    eng, edits, _ = mlp_problem
    with pytest.raises(InfluenceError, match="solver 'prepared' answers from a preparation"):
        eng.solve(edits, SolverConfig(method="prepared", curvature="ggn", damping=0.01))
    shapes = [list(p.shape) for p in eng.params]
    shapes[0] = [3, 4]  # an adapter of another rank
    pre = DiagonalPreconditioner(eng.names, shapes, 0.01, [torch.ones(s, dtype=DT) for s in shapes])
    with pytest.raises(InfluenceError, match=r"built for '.*lora_A.*' of shape \[3, 4\].*prepare again"):
        eng.solve(edits, SolverConfig(curvature="ggn", damping=0.01), preconditioner=pre)
