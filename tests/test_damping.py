"""Automatic damping (issue 6): λ from the curvature's spectrum makes H + λI positive definite on a tiny LLaVA adapter
whose exact Hessian is indefinite, CG's negative-curvature certificate raises a λ that missed, and the λ used is
reported — all against dense float64 references."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from lora_points import perturb_lora_b

from mmerase import Edit, InfluenceEngine, SolverConfig
from mmerase.data import digit_samples, modify_sample
from mmerase.influence import NotPositiveDefiniteError
from mmerase.influence import vectors as V
from mmerase.influence.damping import PD_MARGIN
from mmerase.models import LoadOptions, LoraSettings, load_model

#: one rank-1 LoRA on one projection of the language model: 256 parameters, so a dense Hessian is cheap
ONE_LORA = LoraSettings(r=1, target_modules=r".*language_model.*layers\.1\.self_attn\.v_proj")


def dense_matrix(engine: InfluenceEngine, curvature: str) -> torch.Tensor:
    """The curvature as a dense matrix, one product per basis vector (symmetrised against rounding)."""
    like = [p.detach() for p in engine.params]
    n = sum(t.numel() for t in like)
    cols = []
    for i in range(n):
        e = torch.zeros(n, dtype=torch.float64)
        e[i] = 1.0
        cols.append(V.flatten(engine.product(V.unflatten(e, like), curvature, batch_size=8)))
    m = torch.stack(cols, 1)
    return (m + m.T) / 2


@pytest.fixture(scope="module")
def llava_one_lora(tiny_llava_dir):
    bundle = load_model(tiny_llava_dir, lora=ONE_LORA, options=LoadOptions(dtype="float64", device="cpu"))
    perturb_lora_b(bundle.model, seed=3, scale=0.5)  # a generic point has curvature of both signs
    samples = digit_samples(range(6))
    engine = InfluenceEngine(bundle.model, bundle.loss_fn, samples, collate_fn=bundle.collate)
    return engine, dense_matrix(engine, "hessian")


def test_auto_damping_makes_the_indefinite_llava_hessian_positive_definite(llava_one_lora):
    engine, h = llava_one_lora
    eig = torch.linalg.eigvalsh(h)
    assert eig[0] < 0 < eig[-1]  # indefinite: an undamped CG solve is ill-posed here
    lam, info = engine.damping_for(SolverConfig(curvature="hessian", progress=False))
    assert lam == info["value"] and info["lanczos_steps"] == 20
    # extreme Ritz values lie inside the spectrum, and 20 steps pin the top one down
    assert eig[0] - 1e-10 <= info["bottom_ritz_value"] < 0 and info["top_eigenvalue"] <= eig[-1] + 1e-10
    assert info["top_eigenvalue"] == pytest.approx(float(eig[-1]), rel=1e-6)
    assert lam == pytest.approx(max(1e-2 * info["top_eigenvalue"], PD_MARGIN * -info["bottom_ritz_value"]))
    assert float(torch.linalg.eigvalsh(h + lam * torch.eye(len(h), dtype=h.dtype))[0]) > 0


def test_auto_damped_solve_equals_the_dense_solve_and_is_reported(llava_one_lora):
    engine, h = llava_one_lora
    z = engine.train_set[1]
    edits = [Edit(old=z, new=modify_sample(z, response="nine")), Edit(old=engine.train_set[4], new=None)]
    result = engine.solve(edits, SolverConfig(method="cg", curvature="hessian", tol=1e-10, max_steps=300,
                                              batch_size=8, progress=False))
    lam = result.info["damping"]["value"]
    assert result.config["damping"] == lam and result.converged
    b = V.flatten(engine.edit_gradient(edits))
    ref = torch.linalg.solve(h + lam * torch.eye(len(h), dtype=h.dtype), b)
    got = V.flatten([result.delta[n] for n in engine.names])
    assert float((got - ref).norm() / ref.norm()) < 1e-8
    # the Lanczos products are part of the cost the result reports
    assert result.product_samples >= result.info["damping"]["product_samples"] == 20 * engine.n


class _Tanh(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc(x)))


def _ce(model: nn.Module, batch) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def test_cg_raises_a_damping_that_missed_negative_curvature():
    torch.manual_seed(0)
    model = _Tanh().double()
    g = torch.Generator().manual_seed(1)
    data = list(zip(torch.randn(30, 3, generator=g, dtype=torch.float64) * 2, torch.randint(0, 2, (30,), generator=g)))
    engine = InfluenceEngine(model, _ce, data)
    h = dense_matrix(engine, "hessian")
    eig = torch.linalg.eigvalsh(h)
    assert eig[0] < 0
    edits = [Edit(old=data[0], new=None), Edit(old=data[1], new=(data[1][0], 1 - data[1][1]))]
    # one Lanczos step sees a single Rayleigh quotient: the estimate misses the negative eigenvalues
    cfg = SolverConfig(method="cg", curvature="hessian", damping_steps=1, tol=1e-10, max_steps=200, progress=False)
    lam0, _ = engine.damping_for(cfg)
    assert float(torch.linalg.eigvalsh(h + lam0 * torch.eye(len(h), dtype=h.dtype))[0]) < 0
    result = engine.solve(edits, cfg)
    info = result.info["damping"]
    assert info["increases"] and info["increases"][0]["from"] == pytest.approx(lam0)
    for step in info["increases"]:  # each increase is justified by a certified Rayleigh quotient
        assert step["rayleigh"] >= eig[0] - 1e-9 and step["to"] >= PD_MARGIN * -step["rayleigh"]
    lam = info["value"]
    assert lam > -eig[0] and result.config["damping"] == lam
    b = V.flatten(engine.edit_gradient(edits))
    ref = torch.linalg.solve(h + lam * torch.eye(len(h), dtype=h.dtype), b)
    assert float((V.flatten(list(result.delta.values())) - ref).norm() / ref.norm()) < 1e-8
    # a user's λ is never changed: the same indefinite system is refused with the certificate
    with pytest.raises(NotPositiveDefiniteError, match="Increase --damping") as err:
        engine.solve(edits, SolverConfig(method="cg", curvature="hessian", damping=lam0, tol=1e-10,
                                         max_steps=200, progress=False))
    assert err.value.rayleigh < 0


def test_damping_option_values():
    assert SolverConfig().damping == "auto" and SolverConfig(damping="0.5").damping == 0.5
    with pytest.raises(ValueError, match="damping must be a number ≥ 0 or 'auto', got 'big'"):
        SolverConfig(damping="big")
    with pytest.raises(ValueError, match="damping must be ≥ 0 or 'auto', got -1"):
        SolverConfig(damping=-1)


def test_one_lanczos_run_from_b_gives_the_cg_answer_for_every_damping(llava_one_lora):
    from mmerase.influence.lanczos import lanczos, shifted_solutions

    engine, h = llava_one_lora
    z = engine.train_set[2]
    b = engine.edit_gradient([Edit(old=z, new=modify_sample(z, response="seven"))])
    bf = V.flatten(b)
    eye = torch.eye(len(h), dtype=h.dtype)
    for steps in (len(h), 4):  # the whole space (exact), and a short run (CG after 4 steps)
        values, ritz, _, info = lanczos(lambda v: engine.product(v, "hessian", batch_size=8), engine.params, steps,
                                        start=b)
        for lam, (x, resid) in zip((1.0, 5.0), shifted_solutions(ritz, info["tridiagonal"], float(bf.norm()),
                                                                   (1.0, 5.0))):
            true_resid = float(((h + lam * eye) @ x - bf).norm() / bf.norm())
            if steps == len(h):
                ref = torch.linalg.solve(h + lam * eye, bf)
                assert float((x - ref).norm() / ref.norm()) < 1e-8 and true_resid < 1e-8
            else:  # the residual the Lanczos relation predicts is the true one
                assert true_resid == pytest.approx(resid, rel=1e-5) and 1e-6 < resid < 0.5
