"""The sub-sampled quadratic surrogate of the edited objective (SubspaceSurrogate) on a tiny text model in float64,
against a dense GGN built by hand (forward-mode Jacobians) and plain autograd gradients: its Krylov answer is the
dense solve of (H_S + λI)x = g_old − g_new(θ̂), its value is S(x), its steps lower S and reach S's stationary point;
the `surrogate` method built on it returns the dense answer."""

from __future__ import annotations

import contextlib

import pytest
import torch
import dense_refs
from lora_points import perturb_lora_b

from mmerase.data import Sample
from mmerase import methods as M
from mmerase.influence import AnchoredSurrogate, Edit, InfluenceEngine, SubspaceSurrogate
from mmerase.influence import vectors as V
from mmerase.models import LoadOptions, LoraSettings, load_model

#: one LoRA on one projection (r=2, 512 parameters): small enough for dense references
ONE_LORA = LoraSettings(r=2, target_modules=r".*layers\.1\.self_attn\.v_proj")


def _chat(sid: str, q: str, a: str) -> Sample:
    return Sample(sid, [{"from": "human", "value": q}, {"from": "gpt", "value": a}])


TRAIN = [_chat("a", "Say hi", "hi there"), _chat("b", "Count", "one two three four"),
         _chat("c", "Name a colour", "green"), _chat("d", "Spell it", "e f g")]
SUBSET = [0, 1]
CORRECTED = _chat("d", "Spell it", "a b c")


@pytest.fixture(scope="module")
def setup(tiny_llama_dir):
    bundle = load_model(tiny_llama_dir, lora=ONE_LORA, options=LoadOptions(dtype="float64", device="cpu"))
    perturb_lora_b(bundle.model, scale=0.5, draw_dtype=torch.float64)
    engine = InfluenceEngine(bundle.model, bundle.loss_fn, TRAIN, collate_fn=bundle.collate)
    h = dense_refs.dense_ggn(bundle, engine, [TRAIN[i] for i in SUBSET])
    lam = 0.1 * float(torch.linalg.eigvalsh(h)[-1])
    return bundle, engine, h + lam * torch.eye(h.shape[0], dtype=h.dtype), lam


@contextlib.contextmanager
def _at(bundle, engine, x):
    """The model at its current parameters + x (x: flat, or None) in eval mode, restored afterwards."""
    saved = [p.detach().clone() for p in engine.params]
    with torch.no_grad():
        for p, d in zip(engine.params, V.unflatten(x, saved) if x is not None else []):
            p.add_(d)
    bundle.model.eval()
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(engine.params, saved):
                p.copy_(s)


def _grad(bundle, engine, sample, x=None) -> torch.Tensor:
    """∇L(sample) at θ̂ + x by plain autograd on the loss (not the engine's gradient sums)."""
    with _at(bundle, engine, x):
        g = torch.autograd.grad(bundle.loss_fn(bundle.model, engine.collate([sample])), engine.params)
    return V.flatten(list(g))


def _loss(bundle, engine, sample, x) -> float:
    with _at(bundle, engine, x), torch.no_grad():
        return float(bundle.loss_fn(bundle.model, engine.collate([sample])))


def _surrogate_value(h, g_old, bundle, engine, new, x) -> float:
    """S(x) from the dense matrix and plain losses (the model at θ̂)."""
    return float(0.5 * x @ h @ x - g_old @ x) + sum(_loss(bundle, engine, z, x) for z in new) / engine.n


def test_removal_krylov_answer_is_the_dense_solve_and_a_step_keeps_it(setup):
    bundle, engine, h, lam = setup
    sur = SubspaceSurrogate(engine, [Edit(old=TRAIN[3])], SUBSET, lam, batch_size=2)
    x = V.flatten(sur.krylov(60))
    sur.restore()
    want = torch.linalg.solve(h, _grad(bundle, engine, TRAIN[3]) / engine.n)
    assert (x - want).norm() / want.norm() < 1e-8
    # S is exactly quadratic for a removal: its minimiser is a fixed point of the step
    again = V.flatten(sur.step(V.unflatten(x, sur.saved)))
    assert (again - x).norm() / x.norm() < 1e-8
    sur.restore()


def test_correction_steps_lower_the_surrogate_to_its_stationary_point(setup):
    bundle, engine, h, lam = setup
    sur = SubspaceSurrogate(engine, [Edit(old=TRAIN[3], new=CORRECTED)], SUBSET, lam, batch_size=2)
    g_old = _grad(bundle, engine, TRAIN[3]) / engine.n
    rhs = g_old - _grad(bundle, engine, CORRECTED) / engine.n
    x = sur.krylov(60)
    want = torch.linalg.solve(h, rhs)
    assert (V.flatten(x) - want).norm() / want.norm() < 1e-8  # the plain influence update
    mine = sur.value(x)
    sur.restore()  # the surrogate leaves the model at θ̂ + x; the references start from θ̂
    values = [_surrogate_value(h, g_old, bundle, engine, [CORRECTED], V.flatten(x))]
    assert abs(mine - values[0]) < 1e-10 * abs(values[0])
    for _ in range(10):
        x = sur.step(x)
        sur.restore()
        values.append(_surrogate_value(h, g_old, bundle, engine, [CORRECTED], V.flatten(x)))
    assert all(b <= a + 1e-14 for a, b in zip(values, values[1:]))
    f = V.flatten(x)
    stationarity = h @ f - g_old + _grad(bundle, engine, CORRECTED, f) / engine.n
    assert stationarity.norm() / rhs.norm() < 1e-6
    assert values[-1] < values[0]  # the plain update was not already stationary
    sur.restore()


def test_anchored_steps_lower_its_objective_to_its_stationary_point(setup):
    """AnchoredSurrogate with S = {a, b, d} for a correction of d: S_R = {a, b} (d, the old sample, is left out);
    its value is A(x) computed from plain losses, its steps lower A monotonically to a point where A's gradient,
    by plain autograd, vanishes, away from the quadratic surrogate's answer. λ is the GGN's top eigenvalue: the tiny
    model is untrained, so with less A's minimiser lies far from θ̂ (a trained adapter's retained loss holds it)."""
    bundle, engine, _, lam = setup
    lam = 10 * lam  # the setup's λ is 0.1 × the top eigenvalue
    edit = Edit(old=TRAIN[3], new=CORRECTED)
    sur = AnchoredSurrogate(engine, [edit], [0, 1, 3], lam, batch_size=2)
    retained, w, n = TRAIN[:2], 3 / 4, engine.n
    zero = torch.zeros(sum(p.numel() for p in engine.params), dtype=torch.float64)
    g_old = _grad(bundle, engine, TRAIN[3]) / n
    anchor = sum(_loss(bundle, engine, z, zero) for z in retained) / 2
    anchor_grad = sum(_grad(bundle, engine, z) for z in retained) / 2

    def objective(f):
        train = sum(_loss(bundle, engine, z, f) for z in retained) / 2 - anchor - anchor_grad @ f
        return float(w * train + 0.5 * lam * f @ f - g_old @ f) + _loss(bundle, engine, CORRECTED, f) / n

    def gradient(f):
        train = sum(_grad(bundle, engine, z, f) for z in retained) / 2 - anchor_grad
        return w * train + lam * f - g_old + _grad(bundle, engine, CORRECTED, f) / n

    x = sur.krylov(60)
    plain = V.flatten(x)
    mine = sur.value(x)
    sur.restore()
    values = [objective(plain)]
    assert abs(mine - values[0]) < 1e-10 * abs(values[0])
    for _ in range(15):
        x = sur.step(x)
        sur.restore()
        values.append(objective(V.flatten(x)))
    assert all(b <= a + 1e-14 for a, b in zip(values, values[1:]))
    f = V.flatten(x)
    assert gradient(f).norm() / gradient(zero).norm() < 1e-6
    assert (f - plain).norm() / plain.norm() > 1e-3  # the steps moved beyond the quadratic surrogate's answer
    sur.restore()


def test_the_surrogate_method_gives_the_dense_answer_and_leaves_the_adapter_as_found(setup):
    """`unlearn(..., "surrogate")` with S = the whole training set: θ_new − θ̂ is the dense solve (EK-FAC only
    preconditions the directions), counted passes are reported, and apply=False leaves θ̂ in the model."""
    bundle, engine, _, _ = setup
    h = dense_refs.dense_ggn(bundle, engine, TRAIN)
    lam = 0.1 * float(torch.linalg.eigvalsh(h)[-1])
    theta_hat = V.flatten([p.detach().clone() for p in engine.params])
    config = M.SurrogateConfig(samples=0, damping=lam, krylov=60, steps=1, prep_samples=4, batch_size=4,
                               progress=False)
    result = M.unlearn(engine, None, [Edit(old=TRAIN[3])], "surrogate", config, apply=False)
    delta = V.flatten([result.delta[n] for n in engine.names])
    want = torch.linalg.solve(h + lam * torch.eye(h.shape[0], dtype=h.dtype), _grad(bundle, engine, TRAIN[3]) / 4)
    assert (delta - want).norm() / want.norm() < 1e-8
    assert result.info["surrogate_samples"] == 4 and result.accounting.sample_passes > 0
    assert torch.equal(V.flatten(list(engine.params)), theta_hat)
