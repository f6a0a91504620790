"""mmerase's solvers against kronfluence's EK-FAC (and K-FAC) preconditioned gradient (issue 9, item 4).

Model: an MLP classifier (64 → hidden → 10, tanh) on scikit-learn's digits in float64, trained (full-batch Adam) on
n digits of which k have a wrong label; the edit corrects those k labels, b = −(1/n) Σ [∇L(z_new) − ∇L(z_old)].
Small enough for dense references: the Gauss-Newton matrix G = Σ Jᵀ(diag p − ppᵀ)J / n and the Hessian H of the
mean cross-entropy, both formed with torch.func (independently of mmerase's products), and δ* = (G+λI)⁻¹b
solved directly. EK-FAC approximates G (a Fisher), so G is the reference; the Hessian solve is reported beside it.

kronfluence (optional: ``pip install -e .[bench]``) fits its factors on the training set with a Task written here
(sum of per-sample cross-entropies, labels drawn from the model for the true Fisher, as its EK-FAC expects), then
preconditions the per-sample gradients of the 2k edited samples; δ = −(1/n)(Σ M g_new − Σ M g_old) by linearity.
Damping: ``ScoreArguments(damping_factor=λ)`` adds λ to the EK-FAC eigenvalues, i.e. M = (Ĝ + λI)⁻¹ exactly in the
Kronecker eigenbasis (an orthogonal basis, so that is the same λI as mmerase's). The preconditioned gradients are
read from kronfluence's tracked modules after the query backward, the step its pairwise scores run before their
dot products (``kronfluence.module.utils``; its public API only returns scores).

mmerase: 'cg', 'stochastic' and 'lissa' on exact GGN products, each plain and, where the solver takes one, with an
'ekfac'/'kfac' preconditioner (mmerase.influence.precondition); 'prepared' is the preconditioner's step alone
(δ = αMb), the counterpart of kronfluence's preconditioned gradient. Times include building the preconditioner
(and kronfluence's factor fitting, which writes its factors to a temporary folder).

    python benchmarks/kronfluence_compare.py          # writes benchmarks/kronfluence_compare.{json,md}
    python benchmarks/kronfluence_compare.py --smoke --out /tmp/kc
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from mmerase import Edit, InfluenceEngine, SolverConfig, Task
from mmerase.influence import SolverDivergedError
from mmerase.influence import vectors as V
from mmerase.influence.precondition import PreconditionerConfig, build_preconditioner
from mmerase.record import machine, versions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from product_cost import write_report  # noqa: E402

DT = torch.float64


class MLP(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class CETask(Task):
    """mmerase's task: mean cross-entropy, split into logits and a loss on them (for GGN products)."""

    def outputs(self, model, batch):
        return model(batch[0])

    def loss_from_outputs(self, outputs, batch):
        return nn.functional.cross_entropy(outputs, batch[1])

    def sample_targets(self, outputs, batch, generator):
        return [batch[0], torch.multinomial(torch.softmax(outputs, -1), 1, generator=generator).squeeze(-1)]


def digits_data(n: int, k: int, seed: int) -> tuple[list, list[int], dict[int, int]]:
    """n digits (features / 16) as (x, y) pairs with k labels replaced by a wrong one; returns the corrupted set, the
    corrupted positions and their true labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    order = list(range(len(d.target)))
    rng = random.Random(seed)
    rng.shuffle(order)
    x = torch.tensor(d.data[order[:n]] / 16.0, dtype=DT)
    y = torch.tensor(d.target[order[:n]], dtype=torch.long)
    bad = sorted(rng.sample(range(n), k))
    truth = {i: int(y[i]) for i in bad}
    for i in bad:
        y[i] = (truth[i] + rng.randint(1, 9)) % 10
    return list(zip(x, y)), bad, truth


def train_mlp(data: list, hidden: int, steps: int, seed: int) -> MLP:
    torch.manual_seed(seed)
    model = MLP(hidden).to(DT)
    x, y = torch.stack([s[0] for s in data]), torch.stack([s[1] for s in data])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def dense_matrices(model: MLP, data: list, chunk: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """(GGN, Hessian) of the mean cross-entropy w.r.t. all parameters, flattened in ``named_parameters`` order."""
    names = [n for n, _ in model.named_parameters()]
    like = [p.detach() for p in model.parameters()]
    flat = V.flatten(like)
    ggn = torch.zeros(flat.numel(), flat.numel(), dtype=DT)
    hess = torch.zeros_like(ggn)
    for start in range(0, len(data), chunk):
        x = torch.stack([s[0] for s in data[start:start + chunk]])
        y = torch.stack([s[1] for s in data[start:start + chunk]])

        def logits(f: torch.Tensor) -> torch.Tensor:
            return functional_call(model, dict(zip(names, V.unflatten(f, like))), (x,))

        jac = torch.func.jacrev(logits)(flat)  # [b, 10, P]
        p = torch.softmax(logits(flat).detach(), -1)
        h_out = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
        ggn += torch.einsum("bip,bij,bjq->pq", jac, h_out, jac)
        hess += torch.func.hessian(lambda f: nn.functional.cross_entropy(logits(f), y, reduction="sum"))(flat)
    return ggn / len(data), hess / len(data)


def kronfluence_delta(model: MLP, data: list, edits: list[Edit], n: int, damping: float, strategy: str,
                      batch_size: int, seed: int) -> tuple[V.Vec, dict[str, float]]:
    """δ = −(1/n) Σ_E [M ∇L(z_new) − M ∇L(z_old)] with kronfluence's M = (Ĝ + λI)⁻¹ ('ekfac' or 'kfac')."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.module.utils import (get_tracked_module_names, prepare_modules, set_factors, set_mode,
                                          update_factor_args, update_score_args)
    from kronfluence.task import Task as KTask
    from kronfluence.utils.constants import PRECONDITIONED_GRADIENT_NAME
    from kronfluence.utils.state import State

    class KronTask(KTask):
        """Summed cross-entropy (kronfluence's convention); ``sample`` draws labels from the model (true Fisher)."""

        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits, -1), 1).squeeze(-1)
            return nn.functional.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

    torch.manual_seed(seed)
    task = KronTask()
    kmodel = prepare_model(copy.deepcopy(model), task)
    f64 = dict(activation_covariance_dtype=DT, gradient_covariance_dtype=DT, eigendecomposition_dtype=DT,
               lambda_dtype=DT)
    factor_args = FactorArguments(strategy=strategy, **f64)
    score_args = ScoreArguments(damping_factor=damping, per_sample_gradient_dtype=DT, precondition_dtype=DT,
                                score_dtype=DT)
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer(f"mmerase-{strategy}", kmodel, task, cpu=True, disable_tqdm=True, output_dir=tmp)
        t = time.perf_counter()
        analyzer.fit_all_factors(strategy, data, per_device_batch_size=batch_size, factor_args=factor_args,
                                 overwrite_output_dir=True)
        times["fit_seconds"] = time.perf_counter() - t
        t = time.perf_counter()
        factors = analyzer.load_all_factors(strategy)
        # what kronfluence's pairwise scores do before their dot products: precondition the query gradients
        update_factor_args(kmodel, factor_args)
        update_score_args(kmodel, score_args)
        tracked = get_tracked_module_names(kmodel)
        set_mode(kmodel, mode=_precondition_mode(), tracked_module_names=tracked, release_memory=True)
        for name, f in factors.items():
            set_factors(kmodel, factor_name=name, factors=f, clone=True)
        prepare_modules(kmodel, tracked_module_names=tracked, device=State(cpu=True).device)
        queries = [e.new for e in edits] + [e.old for e in edits]
        sign = torch.tensor([1.0] * len(edits) + [-1.0] * len(edits), dtype=DT)
        kmodel.zero_grad(set_to_none=True)
        task.compute_measurement((torch.stack([q[0] for q in queries]), torch.stack([q[1] for q in queries])),
                                 kmodel).backward()
        delta = {}
        for mod_name, mod in kmodel.named_modules():
            if mod_name in tracked:
                pg = torch.einsum("q,qoi->oi", sign, mod.storage[PRECONDITIONED_GRADIENT_NAME]) * (-1.0 / n)
                delta[f"{mod_name}.weight"] = pg[:, :-1]
                delta[f"{mod_name}.bias"] = pg[:, -1]
        times["query_seconds"] = time.perf_counter() - t
    return [delta[name] for name, _ in model.named_parameters()], times


def _precondition_mode() -> Any:
    from kronfluence.module.tracked_module import ModuleMode

    return ModuleMode.PRECONDITION_GRADIENT


def _compare(x: V.Vec, ref: torch.Tensor) -> dict[str, float]:
    f = V.flatten(x).double()
    return {"rel_err": float((f - ref).norm() / ref.norm()), "cosine": float(f @ ref / (f.norm() * ref.norm())),
            "norm_ratio": float(f.norm() / ref.norm())}


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    data, bad, truth = digits_data(args.n, args.k, args.seed)
    t = time.perf_counter()
    model = train_mlp(data, args.hidden, args.train_steps, args.seed)
    train_s = time.perf_counter() - t
    engine = InfluenceEngine(model, CETask(), data)
    edits = [Edit(old=data[i], new=(data[i][0], torch.tensor(truth[i]))) for i in bad]
    lam = args.damping
    b = V.flatten(engine.edit_gradient(edits, args.batch_size)).double()
    t = time.perf_counter()
    ggn, hess = dense_matrices(model, data)
    dense_s = time.perf_counter() - t
    eye = torch.eye(ggn.shape[0], dtype=DT)
    refs = {"ggn": torch.linalg.solve(ggn + lam * eye, b), "hessian": torch.linalg.solve(hess + lam * eye, b)}
    info = {"n_params": ggn.shape[0], "train_seconds": train_s, "dense_seconds": dense_s,
            "ggn_eig": [float(e) for e in torch.linalg.eigvalsh(ggn)[[0, -1]]],
            "hessian_eig": [float(e) for e in torch.linalg.eigvalsh(hess)[[0, -1]]],
            "grad_norm_at_theta": V.norm(engine.mean_gradient(list(range(engine.n)), args.batch_size)),
            "b_norm": float(b.norm()), "delta_norm": float(refs["ggn"].norm())}
    rows: dict[str, dict[str, Any]] = {}

    def add(name: str, x: V.Vec, seconds: float, **extra: Any) -> None:
        rows[name] = {"seconds": seconds, **{f"{k}_{ref}": v for ref, r in refs.items()
                                             for k, v in _compare(x, r).items()}, **extra}
        print(f"  {name}: rel err {rows[name]['rel_err_ggn']:.2e}, cosine {rows[name]['cosine_ggn']:.4f}, "
              f"{seconds:.2f} s", flush=True)

    try:
        import kronfluence

        info["kronfluence"] = kronfluence.__version__
        for strategy in ("ekfac", "kfac"):
            x, times = kronfluence_delta(model, data, edits, args.n, lam, strategy, args.batch_size, args.seed)
            add(f"kronfluence {strategy} (preconditioned gradient)", x, sum(times.values()), **times)
    except ImportError as e:
        info["kronfluence"] = f"not installed ({e})"

    def solve(name: str, cfg: SolverConfig, kind: str | None) -> None:
        t = time.perf_counter()
        pre = None if kind is None else build_preconditioner(
            engine, "ggn", lam, PreconditionerConfig(kind=kind, batch_size=args.batch_size, seed=args.seed))
        try:
            res = engine.solve(edits, cfg, preconditioner=pre)
        except SolverDivergedError as e:  # refused, not returned: say so in the table
            rows[name] = {"seconds": time.perf_counter() - t, "error": str(e)}
            print(f"  {name}: refused: {e}", flush=True)
            return
        add(name, list(res.delta.values()), time.perf_counter() - t, steps=res.steps, residual=res.residual,
            product_samples=res.product_samples, prepare_seconds=None if pre is None else pre.meta["seconds"])

    for mc in (1, 8):  # the same estimate as kronfluence's: M·b, no scale calibration, no step length
        t = time.perf_counter()
        pre = build_preconditioner(engine, "ggn", lam, PreconditionerConfig(
            kind="ekfac", batch_size=args.batch_size, seed=args.seed, probes=0, mc_samples=mc))
        add(f"mmerase ekfac M·b ({mc} label draw{'s' if mc > 1 else ''} per sample, uncalibrated)",
            pre.apply(engine.edit_gradient(edits, args.batch_size)), time.perf_counter() - t)
    common = dict(curvature="ggn", damping=lam, batch_size=args.batch_size, progress=False, stationarity_check=False,
                  seed=args.seed)
    for kind in ("ekfac", "kfac"):
        solve(f"mmerase prepared + {kind} (preconditioned gradient)", SolverConfig(method="prepared", **common), kind)
    for kind in (None, "ekfac", "kfac"):
        solve("mmerase cg" + (f" + {kind}" if kind else ""),
              SolverConfig(method="cg", tol=args.tol, max_steps=args.max_steps, **common), kind)
    for kind in (None, "ekfac"):
        solve("mmerase stochastic" + (f" + {kind}" if kind else ""),
              SolverConfig(method="stochastic", tol=args.tol, max_steps=args.stochastic_steps, **common), kind)
    solve("mmerase lissa", SolverConfig(method="lissa", tol=args.tol, max_steps=args.stochastic_steps, **common), None)
    return {"config": vars(args), "machine": machine(), "versions": {**versions(), "kronfluence": info["kronfluence"]},
            "date": time.strftime("%Y-%m-%d %H:%M %Z"), "load_avg": os.getloadavg(), "info": info, "rows": rows}


def markdown(rep: dict[str, Any]) -> str:
    c, i, m, v = rep["config"], rep["info"], rep["machine"], rep["versions"]
    lines = ["# mmerase against kronfluence (EK-FAC) on a dense-solvable model (issue 9)", "",
             f"MLP 64 → {c['hidden']} → 10 (tanh, {i['n_params']:,} parameters, float64) trained on {c['n']} digits "
             f"with {c['k']} wrong labels ({c['train_steps']} full-batch Adam steps; ‖∇R(θ̂)‖ = "
             f"{i['grad_norm_at_theta']:.1e}); the edit corrects the {c['k']} labels. λ = {c['damping']}, batch "
             f"{c['batch_size']}, solver tolerance {c['tol']}; seed {c['seed']}. GGN eigenvalues "
             f"[{i['ggn_eig'][0]:.1e}, {i['ggn_eig'][1]:.2f}], Hessian [{i['hessian_eig'][0]:.1e}, "
             f"{i['hessian_eig'][1]:.2f}]. Machine: {m['cpu']} ({m['cores']} cores shared, one thread), torch "
             f"{v['torch']}, kronfluence {v['kronfluence']}; {rep['date']}.", "",
             "Reference δ* = (G + λI)⁻¹b, G the dense Gauss-Newton matrix (what EK-FAC approximates); the last "
             "columns compare with the dense Hessian solve (H + λI)⁻¹b.", "",
             "| method | ‖δ − δ*‖/‖δ*‖ | cosine | ‖δ‖/‖δ*‖ | seconds | steps | residual | ‖δ − δ_H‖/‖δ_H‖ | "
             "cosine (H) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rep["rows"].items():
        if "error" in r:
            lines.append(f"| {name} | refused by the solver: {r['error']} | | | {r['seconds']:.2f} | | | | |")
            continue
        steps = r.get("steps", "")
        res = f"{r['residual']:.1e}" if "residual" in r else ""
        lines.append(f"| {name} | {r['rel_err_ggn']:.2e} | {r['cosine_ggn']:.4f} | {r['norm_ratio_ggn']:.3f} | "
                     f"{r['seconds']:.2f} | {steps} | "
                     f"{res} | {r['rel_err_hessian']:.2e} | {r['cosine_hessian']:.4f} |")
    if not any(k.startswith("kronfluence") for k in rep["rows"]):
        lines += ["", f"kronfluence: {i['kronfluence']} (install the `bench` extra)."]
    lines += ["", "Seconds include building the preconditioner (mmerase) and fitting the factors (kronfluence, which "
              "also writes them to disk).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).parent), help="folder for kronfluence_compare.json/.md")
    p.add_argument("--n", type=int, default=1000, help="training digits")
    p.add_argument("--k", type=int, default=10, help="wrong labels corrected by the edit")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--train-steps", type=int, default=1500)
    p.add_argument("--damping", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument("--max-steps", type=int, default=500)
    p.add_argument("--stochastic-steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    args = p.parse_args(argv)
    if args.smoke:
        args.n, args.k, args.hidden, args.train_steps, args.stochastic_steps = 80, 3, 6, 200, 50
        args.batch_size = 20
    rep = run(args)
    write_report(args.out, "kronfluence_compare", rep, markdown(rep))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
