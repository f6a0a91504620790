"""Taylor error of the influence update as the edit grows (issue 6): ‖δ_influence − δ_ref‖ / ‖δ_ref‖ against the
edited fraction of the training set (0.1% to 30%), for the plain update and 1 or 2 Newton refinement steps.

(a) Convex: L2-regularised logistic regression in float64 on scikit-learn digits (64 pixel features, "digit ≥ 5"),
    n training samples. Edits are label flips and, as a second series, removals of a random nested subset.
    δ_retrain is exact retraining (L-BFGS + Newton polish to ‖∇‖ < 1e-10); since θ̂ is an exact optimum and the
    objective is strictly convex, it is also the minimiser that refinement targets. Exact Hessian, λ = 0 (the model's
    own L2 term is its only regulariser), CG to 1e-12.
(b) Tiny LLaVA LoRA adapter on digits, response correction (the demo's RC scenario with 30% wrong answers; an edit
    corrects the first k of them). GGN curvature, fixed damping λ ∈ {0.01, 0.1}, CG, float64. Two references:
    δ_opt  — the minimiser of R̃_E(θ) + (λ/2)‖θ − θ̂‖² (the objective the refinement targets), by full-batch L-BFGS
             from θ̂ to a small gradient: the distance to it is the Taylor (and GGN-vs-Hessian) error alone;
    δ_retrain — the adapter retrained from scratch on the edited data with the same recipe, minus θ̂: what a user
             compares against (includes the non-convex training path and θ̂ not being a training optimum).

    python benchmarks/taylor_error.py                 # ≈30 min on one core; writes taylor_error.{json,md,png}
    python benchmarks/taylor_error.py --smoke --out /tmp/te   # tiny sizes, seconds (tests/test_bench_taylor.py)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from mmerase import Edit, InfluenceEngine, SolverConfig  # noqa: E402
from mmerase.scenarios import evaluate_bundle  # noqa: E402
from mmerase.influence import vectors as V  # noqa: E402
from mmerase.record import machine, versions  # noqa: E402

DT = torch.float64
FRACTIONS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3)
LLAVA_FRACTIONS = (0.003, 0.03, 0.1, 0.3)  # n = 300: 1, 9, 30 and 90 corrected answers
SMOKE_FRACTIONS = (0.01, 0.05, 0.3)


def _log(*args: Any) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


def _counts(n: int, fractions: tuple[float, ...]) -> list[int]:
    """Edit counts max(1, round(f·n)), without repeats (small n maps several fractions to one sample)."""
    return sorted({max(1, round(f * n)) for f in fractions})


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).norm() / ref.norm())


# ----------------------------------------------------------------------------- recording refinement iterates
def refinement_iterates(engine: InfluenceEngine, edits: list[Edit], config: SolverConfig,
                        preconditioner: Any = None) -> tuple[list[torch.Tensor], list[float], Any]:
    """Flattened δ after 0..K refinement steps and their stationarity gaps, from one K-step solve
    (``solve(callback=)`` sees every accepted Newton step). When refinement stops early (no decrease, or a step
    that raised the gap and was undone) the later K keep the last accepted δ, as a K-step solve returns it."""
    seen: list[tuple[torch.Tensor, float]] = []
    res = engine.solve(edits, config, preconditioner=preconditioner,
                       callback=lambda k, delta, rec: seen.append(
                           (V.flatten([delta[n] for n in engine.names]), rec["stationarity_gap"])))
    while len(seen) < config.refine_steps + 1:
        seen.append(seen[-1])
    return [d for d, _ in seen], [g for _, g in seen], res


# ----------------------------------------------------------------------------- (a) convex model
class LogReg(nn.Module):
    """Binary logistic regression, one logit."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, 1, dtype=DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).squeeze(-1)


class L2Logistic:
    """Per-sample loss: logistic loss + (reg/2)‖(w, b)‖²; called on a batch it returns the mean."""

    def __init__(self, reg: float) -> None:
        self.reg = reg

    def __call__(self, model: LogReg, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return self.flat(torch.cat([model.lin.weight.reshape(-1), model.lin.bias]), x, y)

    def flat(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ce = nn.functional.binary_cross_entropy_with_logits(x @ theta[:-1] + theta[-1], y)
        return ce + 0.5 * self.reg * theta.square().sum()


def digits_binary(n_train: int, seed: int) -> tuple[list, list]:
    """scikit-learn digits as (x ∈ [0,1]^64, y = digit ≥ 5) float64 pairs: n_train training samples, the rest
    held out."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=DT)
    y = torch.tensor(d.target >= 5, dtype=DT)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).tolist()
    data = [(x[i], y[i]) for i in order]
    if n_train >= len(data):
        raise ValueError(f"n_train must be below {len(data)} (the digits scikit-learn ships)")
    return data[:n_train], data[n_train:]


def _stack(data: list) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([s[0] for s in data]), torch.stack([s[1] for s in data])


def fit_exact(theta0: torch.Tensor, data: list, loss: L2Logistic) -> torch.Tensor:
    """The unique minimiser of the mean loss over ``data``: L-BFGS from ``theta0``, then Newton steps with
    backtracking until ‖∇‖ < 1e-10."""
    x, y = _stack(data)
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=500, tolerance_grad=1e-13, tolerance_change=0,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        f = loss.flat(theta, x, y)
        f.backward()
        return f

    opt.step(closure)
    theta = theta.detach()

    def f(t: torch.Tensor) -> torch.Tensor:
        return loss.flat(t, x, y)

    for _ in range(20):
        g = torch.autograd.functional.jacobian(f, theta)
        if float(g.norm()) < 1e-10:
            return theta
        step = torch.linalg.solve(torch.autograd.functional.hessian(f, theta), g)
        t, f0 = 1.0, float(f(theta))
        while t > 1e-4 and float(f(theta - t * step)) > f0 + 1e-15 * abs(f0):
            t /= 2
        theta = theta - t * step
    g = torch.autograd.functional.jacobian(f, theta)
    raise RuntimeError(f"exact retraining did not reach ‖∇‖ < 1e-10 (‖∇‖ = {float(g.norm()):.2e})")


def _accuracy(theta: torch.Tensor, data: list) -> float:
    x, y = _stack(data)
    return float(((x @ theta[:-1] + theta[-1] > 0).to(DT) == y).to(DT).mean())


def run_convex(args: argparse.Namespace) -> dict[str, Any]:
    """Label-flip and removal series on the logistic model; every K solved separately, and once through the
    recording engine as a check of the iterate reconstruction used for the LLaVA adapter."""
    train, test = digits_binary(args.convex_n, args.seed)
    loss = L2Logistic(args.convex_reg)
    n, d = len(train), train[0][0].numel()
    theta_hat = fit_exact(torch.zeros(d + 1, dtype=DT), train, loss)
    model = LogReg(d)
    with torch.no_grad():
        model.lin.weight.copy_(theta_hat[:-1].view(1, -1))
        model.lin.bias.copy_(theta_hat[-1:])
    engine = InfluenceEngine(model, loss, train)
    base = dict(method="cg", curvature="hessian", damping=0.0, tol=1e-12, max_steps=500, batch_size=n,
                progress=False)
    rows, recon = [], 0.0
    counts = _counts(n, args.fractions)
    for draw in range(args.draws):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed + 100 + draw)).tolist()
        for kind in ("flip", "remove"):
            for k in counts:
                chosen = set(order[:k])
                if kind == "flip":
                    edited = [(s[0], 1 - s[1]) if i in chosen else s for i, s in enumerate(train)]
                    edits = [Edit(old=train[i], new=edited[i]) for i in sorted(chosen)]
                else:
                    edited = [s for i, s in enumerate(train) if i not in chosen]
                    edits = [Edit(old=train[i]) for i in sorted(chosen)]
                theta_new = fit_exact(theta_hat, edited, loss)
                ref = theta_new - theta_hat
                iterates, _, _ = refinement_iterates(engine, edits, SolverConfig(**base, refine_steps=args.refine))
                for steps in range(args.refine + 1):
                    res = engine.solve(edits, SolverConfig(**base, refine_steps=steps))
                    delta = V.flatten([res.delta[nm] for nm in engine.names])
                    recon = max(recon, _rel(iterates[steps], delta) if float(delta.norm()) else 0.0)
                    rows.append({"model": "logreg", "edit": kind, "draw": draw, "k": k, "fraction": k / n,
                                 "refine_steps": steps, "rel_error_retrain": _rel(delta, ref),
                                 "stationarity_gap": res.info["stationarity_gap"], "cg_steps": res.steps,
                                 "residual": res.residual, "delta_norm": float(delta.norm()),
                                 "retrain_norm": float(ref.norm()),
                                 "test_acc": _accuracy(theta_hat + delta, test),
                                 "retrain_test_acc": _accuracy(theta_new, test)})
                _log(f"convex {kind} draw {draw} k={k}: error K=0..{args.refine}",
                     [f"{r['rel_error_retrain']:.2e}" for r in rows[-args.refine - 1:]])
    return {"n_train": n, "n_test": len(test), "features": d, "reg": args.convex_reg, "damping": 0.0,
            "curvature": "hessian", "solver": base, "counts": counts, "draws": args.draws,
            "theta_hat_test_acc": _accuracy(theta_hat, test), "reconstruction_max_rel_diff": recon, "rows": rows}


# ----------------------------------------------------------------------------- (b) tiny LLaVA adapter
class EditedObjective:
    """f(x) = R̃_E(θ̂ + x) + (λ/2)‖x‖² and its gradient, over the whole training set, for an optimiser:
    R(θ̂+x) − ∇R(θ̂)ᵀx + (1/n) Σ_E [L(z_new) − L(z_old)] + (λ/2)‖x‖² (the objective the engine's refinement
    descends), computed here from the loss alone."""

    def __init__(self, engine: InfluenceEngine, edits: list[Edit], damping: float, g_hat: torch.Tensor,
                 batch_size: int) -> None:
        self.engine, self.edits, self.damping, self.g_hat, self.bs = engine, edits, damping, g_hat, batch_size
        self.theta_hat = [p.detach().clone() for p in engine.params]
        self.evals = 0

    def _weighted(self, samples: list, weight: float) -> tuple[float, list[torch.Tensor]]:
        f, grads = 0.0, [torch.zeros_like(p) for p in self.engine.params]
        for start in range(0, len(samples), self.bs):
            chunk = [samples[i] for i in range(start, min(start + self.bs, len(samples)))]
            loss = self.engine.loss_fn(self.engine.model, self.engine.collate(chunk)) * (weight * len(chunk))
            for acc, g in zip(grads, torch.autograd.grad(loss, self.engine.params)):
                acc.add_(g)
            f += float(loss.detach())
        return f, grads

    def __call__(self, x: torch.Tensor) -> tuple[float, torch.Tensor]:
        eng = self.engine
        eng.set_parameters(self.theta_hat, V.unflatten(x, self.theta_hat))
        eng.model.eval()
        n = eng.n
        f, g = self._weighted(list(eng.train_set), 1.0 / n)
        for side, sign in (("new", 1.0), ("old", -1.0)):
            samples = [getattr(e, side) for e in self.edits if getattr(e, side) is not None]
            if samples:
                fs, gs = self._weighted(samples, sign / n)
                f, g = f + fs, V.add(g, gs)
        self.evals += 1
        flat = V.flatten(g) - self.g_hat + self.damping * x
        return f - float(self.g_hat @ x) + 0.5 * self.damping * float(x @ x), flat

    def restore(self) -> None:
        self.engine.set_parameters(self.theta_hat)


def minimise(obj: EditedObjective, x0: torch.Tensor, b_norm: float, tol: float, max_iter: int
             ) -> tuple[torch.Tensor, float, int]:
    """L-BFGS (strong Wolfe) on ``obj`` from ``x0`` until ‖∇f‖/‖b‖ < tol or max_iter iterations; returns
    (x, final relative gradient, iterations)."""
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1, max_iter=10, max_eval=25, tolerance_grad=0.0, tolerance_change=0.0,
                            history_size=30, line_search_fn="strong_wolfe")
    last = {"gap": math.inf}

    def closure() -> torch.Tensor:
        f, g = obj(x.detach())
        x.grad = g
        last["gap"] = float(g.norm()) / b_norm
        return torch.tensor(f, dtype=x.dtype)

    iters = 0
    try:
        while iters < max_iter:
            opt.step(closure)
            iters = opt.state[x]["n_iter"]
            if last["gap"] < tol:
                break
            if opt.state[x].get("d") is not None and float(opt.state[x]["d"].norm()) == 0.0:
                break
        _, g = obj(x.detach())
        return x.detach(), float(g.norm()) / b_norm, iters
    finally:
        obj.restore()


class LlavaScenario:
    """The demo's RC set-up: base pre-trained on other digits, LoRA adapter fine-tuned on n pairs of which a
    fraction has wrong answers; the first k wrong answers corrected make the edit of size k."""

    def __init__(self, args: argparse.Namespace) -> None:
        from mmerase.data import DIGIT_WORDS, digit_images, digit_samples, modify_sample
        from mmerase.scenarios import ScenarioConfig, digit_split, pretrain_base

        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.cfg = ScenarioConfig(tasks=("rc",), seed=args.seed, n_pretrain=args.llava_pretrain, n_train=args.llava_n,
                              n_test=args.llava_test, pretrain_epochs=args.llava_pretrain_epochs,
                              epochs=args.llava_epochs, progress=False)
        pre, train_idx, test_idx = digit_split(self.cfg)
        _, targets = digit_images()
        n = len(train_idx)
        self.counts = _counts(n, args.llava_fractions)
        rng = random.Random(args.seed + 1)
        self.bad = rng.sample(range(n), max(self.counts))  # in correction order
        wrong = {k: (targets[train_idx[k]] + rng.randint(1, 9)) % 10 for k in self.bad}
        self.clean = digit_samples(train_idx)
        self.corrupted = [modify_sample(s, response=DIGIT_WORDS[wrong[k]]) if k in wrong else s
                          for k, s in enumerate(self.clean)]
        self.truth = {k: targets[train_idx[k]] for k in self.bad}
        self.test = digit_samples(test_idx, prefix="test-")
        self.test_labels = [targets[i] for i in test_idx]
        t = time.perf_counter()
        self.base = self.work / "base"
        if self.base.exists():
            shutil.rmtree(self.base)
        pretrain_base(self.base, digit_samples(pre, prefix="pre-"), self.cfg)
        self.pretrain_s = time.perf_counter() - t

    def data(self, fixed: int) -> list:
        fix = set(self.bad[:fixed])
        return [self.clean[i] if i in fix else s for i, s in enumerate(self.corrupted)]

    def edits(self, k: int) -> list[Edit]:
        return [Edit(old=self.corrupted[i], new=self.clean[i]) for i in self.bad[:k]]

    def adapter(self, fixed: int) -> tuple[Path, float]:
        """Train (from scratch, the demo's recipe and seed) on the data with ``fixed`` answers corrected."""
        from mmerase.scenarios import train_scenario_adapter

        out = self.work / f"adapter-fixed{fixed}"
        if out.exists():
            shutil.rmtree(out)
        return out, train_scenario_adapter(self.base, self.data(fixed), out, self.cfg)


def curvature_check(engine: InfluenceEngine, steps: int, batch_size: int) -> dict[str, Any]:
    """Extreme Ritz values of the exact Hessian and of the GGN of R at θ̂ (Lanczos, ``steps`` products each).
    The smallest Hessian Ritz value bounds λ_min(H) from above: below −λ, R̃_E + (λ/2)‖θ−θ̂‖² is not convex at θ̂."""
    from mmerase.influence.lanczos import lanczos

    out: dict[str, Any] = {"steps": steps}
    for curv in ("hessian", "ggn"):
        t = time.perf_counter()
        ritz, _, _, _ = lanczos(lambda v: engine.product(v, curv, None, batch_size), engine.params, steps, seed=0,
                                progress=False)
        out[curv] = {"max": float(ritz.max()), "min": float(ritz.min()), "seconds": time.perf_counter() - t}
    return out


def _load_flat(scen: LlavaScenario, folder: Path, names: list[str]) -> torch.Tensor:
    from mmerase.models import LoadOptions, load_model

    bundle = load_model(scen.base, adapter=folder, options=LoadOptions(device="cpu", dtype="float64"))
    params = dict(bundle.model.named_parameters())
    return V.flatten([params[n].detach() for n in names])


def run_llava(args: argparse.Namespace, checkpoint: Any = None) -> dict[str, Any]:
    """Influence iterates (K = 0..refine), δ_opt and δ_retrain for each edit size and damping."""
    from mmerase.influence.precondition import PreconditionerConfig, build_preconditioner
    from mmerase.models import LoadOptions, load_model

    scen = LlavaScenario(args)
    _log(f"llava base ready ({scen.pretrain_s:.0f} s)")
    hat_dir, train_s = scen.adapter(0)
    bundle = load_model(scen.base, adapter=hat_dir, options=LoadOptions(device="cpu", dtype="float64"))
    cache = bundle.feature_cache()
    train = scen.data(0)
    engine = InfluenceEngine(bundle.model, cache.loss_fn, train, collate_fn=cache.collate)
    n, bs = engine.n, args.batch_size
    theta_hat = [p.detach().clone() for p in engine.params]

    def evaluate(delta: torch.Tensor | None, k: int) -> dict[str, float]:
        """Held-out accuracy, and accuracy and mean loss on the k corrected samples, at θ̂ + δ."""
        if delta is not None:
            engine.set_parameters(theta_hat, V.unflatten(delta, theta_hat))
        try:
            fixed = [scen.clean[i] for i in scen.bad[:k]]
            labels = [scen.truth[i] for i in scen.bad[:k]]
            return evaluate_bundle(bundle, {"test": (scen.test, scen.test_labels), "edited": (fixed, labels)}, False)
        finally:
            engine.set_parameters(theta_hat)

    g_hat = V.flatten(engine.mean_gradient(list(range(n)), bs))
    report: dict[str, Any] = {"n_train": n, "n_test": len(scen.test), "n_pretrain": args.llava_pretrain,
                              "lora_r": scen.cfg.lora_r, "epochs": scen.cfg.epochs, "counts": scen.counts,
                              "corrupted": max(scen.counts), "params": int(g_hat.numel()),
                              "pretrain_s": scen.pretrain_s, "train_s": train_s,
                              "grad_norm_at_theta_hat": float(g_hat.norm()), "dampings": args.dampings,
                              "tol": args.tol, "opt_tol": args.opt_tol, "opt_max_iter": args.opt_max_iter,
                              "precondition_rank": args.rank, "rows": [], "references": []}
    theta_hat_eval = {k: evaluate(None, k) for k in scen.counts}
    retrain = {}
    for k in scen.counts:
        folder, secs = scen.adapter(k)
        retrain[k] = {"delta": _load_flat(scen, folder, engine.names) - V.flatten(theta_hat), "seconds": secs}
        retrain[k]["eval"] = evaluate(retrain[k]["delta"], k)
        _log(f"retrained k={k} in {secs:.1f} s: {retrain[k]['eval']}")
    if args.lanczos:
        report["curvature"] = curvature_check(engine, args.lanczos, bs)
        _log(f"curvature at θ̂: {report['curvature']}")
    for lam in args.dampings:
        pre = None
        if args.rank:
            t = time.perf_counter()
            pre = build_preconditioner(engine, "ggn", lam, PreconditionerConfig(kind="lowrank", rank=args.rank,
                                                                               batch_size=bs))
            _log(f"λ={lam}: low-rank preconditioner in {time.perf_counter() - t:.0f} s")
        cfg = SolverConfig(method="cg", curvature="ggn", damping=lam, tol=args.tol, max_steps=300, batch_size=bs,
                           refine_steps=args.refine, progress=False, seed=args.seed)
        for k in scen.counts:
            edits = scen.edits(k)
            t = time.perf_counter()
            iterates, gaps, res = refinement_iterates(engine, edits, cfg, pre)
            solve_s = time.perf_counter() - t
            obj = EditedObjective(engine, edits, lam, g_hat, bs)
            t = time.perf_counter()
            start = torch.zeros_like(g_hat) if args.opt_start == "theta_hat" else iterates[-1]
            x_opt, opt_gap, opt_iters = minimise(obj, start, res.b_norm, args.opt_tol, args.opt_max_iter)
            opt_s = time.perf_counter() - t
            ref_r = retrain[k]["delta"]
            check = None
            if lam == max(args.dampings) and k in scen.counts[::-1][:args.opt_check]:
                t = time.perf_counter()
                other = EditedObjective(engine, edits, lam, g_hat, bs)
                x_other, gap_other, it_other = minimise(other, torch.zeros_like(g_hat), res.b_norm, args.opt_tol,
                                                        args.opt_max_iter)
                check = {"start": "theta_hat" if args.opt_start == "refined" else "refined", "gap": gap_other,
                         "iters": it_other, "seconds": time.perf_counter() - t,
                         "rel_diff": _rel(x_other, x_opt), "norm": float(x_other.norm())}
                _log(f"δ_opt from the other start: {check}")
            report["references"].append({
                "opt_check": check, "opt_start": args.opt_start,
                "damping": lam, "k": k, "fraction": k / n, "opt_gap": opt_gap, "opt_iters": opt_iters,
                "opt_evals": obj.evals, "opt_seconds": opt_s, "opt_norm": float(x_opt.norm()),
                "retrain_norm": float(ref_r.norm()), "opt_vs_retrain": _rel(x_opt, ref_r),
                "retrain_seconds": retrain[k]["seconds"], "solve_seconds": solve_s, "cg_steps": res.steps,
                "b_norm": res.b_norm, "opt_eval": evaluate(x_opt, k), "retrain_eval": retrain[k]["eval"],
                "theta_hat_eval": theta_hat_eval[k]})
            for steps, (delta, gap) in enumerate(zip(iterates, gaps)):
                rows = {"model": "llava", "edit": "correct", "damping": lam, "k": k, "fraction": k / n,
                        "refine_steps": steps, "rel_error_opt": _rel(delta, x_opt),
                        "rel_error_retrain": _rel(delta, ref_r), "stationarity_gap": gap,
                        "delta_norm": float(delta.norm()), **evaluate(delta, k)}
                report["rows"].append(rows)
            if checkpoint is not None:
                checkpoint(report)
            _log(f"λ={lam} k={k}: solve {solve_s:.0f} s ({res.steps} CG steps), L-BFGS {opt_s:.0f} s "
                 f"({opt_iters} it, gap {opt_gap:.1e}); vs opt",
                 [round(r["rel_error_opt"], 4) for r in report["rows"][-len(iterates):]], "vs retrain",
                 [round(r["rel_error_retrain"], 3) for r in report["rows"][-len(iterates):]])
    return report


# ----------------------------------------------------------------------------- report
def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def convex_table(rep: dict[str, Any]) -> list[dict[str, Any]]:
    """Mean over draws of each (edit, k, refine_steps) cell."""
    out = []
    rows = rep["rows"]
    for kind in ("flip", "remove"):
        for k in rep["counts"]:
            cell = {"edit": kind, "k": k, "fraction": k / rep["n_train"]}
            for s in sorted({r["refine_steps"] for r in rows}):
                sel = [r for r in rows if r["edit"] == kind and r["k"] == k and r["refine_steps"] == s]
                cell[f"err{s}"] = _mean([r["rel_error_retrain"] for r in sel])
                cell[f"gap{s}"] = _mean([r["stationarity_gap"] for r in sel])
                cell[f"acc{s}"] = _mean([r["test_acc"] for r in sel])
            cell["retrain_acc"] = _mean([r["retrain_test_acc"] for r in rows if r["edit"] == kind and r["k"] == k])
            out.append(cell)
    return out


def _e(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.2e}" if x < 1e-3 else f"{x:.4f}" if x < 1 else f"{x:.3f}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def markdown(rep: dict[str, Any]) -> str:
    m, c = rep["machine"], rep["convex"]
    steps = list(range(rep["config"]["refine"] + 1))
    lines = ["# Taylor error of the influence update against the edited fraction (issue 6)", "",
             f"Machine: {m['cpu']} ({m['cores']} cores, one thread); torch {rep['versions']['torch']}, "
             f"transformers {rep['versions']['transformers']}, peft {rep['versions']['peft']}; seed "
             f"{rep['config']['seed']}; {rep['date']}; total {rep['seconds']:.0f} s.", "",
             "Relative error ‖δ_K − δ_ref‖/‖δ_ref‖, K = Newton refinement steps after the plain influence update "
             "(K = 0 is the plain update).", "",
             f"## (a) L2 logistic regression (float64, digits ≥ 5, n = {c['n_train']}, {c['features']} features + "
             f"bias, L2 {c['reg']:g} per sample), exact Hessian, λ = 0, CG to 1e-12", "",
             f"δ_ref = exact retraining (‖∇‖ < 1e-10) = the minimiser refinement targets. Mean over {c['draws']} "
             f"random nested edit sets; θ̂ held-out accuracy {_pct(c['theta_hat_test_acc'])} on {c['n_test']}.", "",
             "| edit | k | fraction | " + " | ".join(f"err K={s}" for s in steps) + " | "
             + " | ".join(f"gap K={s}" for s in steps) + " | test acc K=0 / retrained |",
             "|---|---|---|" + "---|" * (2 * len(steps) + 1)]
    for cell in convex_table(c):
        lines.append(f"| {cell['edit']} | {cell['k']} | {100 * cell['fraction']:.2f}% | "
                     + " | ".join(_e(cell[f"err{s}"]) for s in steps) + " | "
                     + " | ".join(_e(cell[f"gap{s}"]) for s in steps)
                     + f" | {_pct(cell['acc0'])} / {_pct(cell['retrain_acc'])} |")
    if "llava" in rep:
        lv = rep["llava"]
        lines += ["", f"## (b) Tiny LLaVA LoRA adapter (r={lv['lora_r']}, {lv['params']} parameters, float64), "
                  f"digits RC, n = {lv['n_train']} with {lv['corrupted']} wrong answers; GGN, CG to "
                  f"{lv['tol']:g}", "",
                  "δ_opt: L-BFGS (at most "
                  f"{rep['config']['opt_max_iter']} iterations, stop at ‖∇‖/‖b‖ < {rep['config']['opt_tol']:g}) on "
                  "R̃_E(θ) + (λ/2)‖θ−θ̂‖², started "
                  + ("at θ̂" if rep["config"]["opt_start"] == "theta_hat" else
                     f"at θ̂ + δ_{rep['config']['refine']} (the engine's Newton-CG steps from θ̂)")
                  + "; 'opt gap' = the ‖∇‖/‖b‖ it reached (1 at θ̂ + 0). "
                  f"δ_retrain: retrained from scratch ({lv['epochs']} epochs, same seed) minus θ̂. "
                  f"‖∇R(θ̂)‖ = {lv['grad_norm_at_theta_hat']:.3g} (θ̂ is not a training optimum). Accuracies on "
                  f"{lv['n_test']} held-out digits.", ""]
        if "curvature" in lv:
            cv = lv["curvature"]
            lines += [f"Spectrum of R at θ̂ ({cv['steps']} Lanczos steps, extreme Ritz values): exact Hessian "
                      f"[{cv['hessian']['min']:.3g}, {cv['hessian']['max']:.3g}], GGN [{cv['ggn']['min']:.3g}, "
                      f"{cv['ggn']['max']:.3g}].", ""]
        for lam in lv["dampings"]:
            done = [r["k"] for r in lv["references"] if r["damping"] == lam]
            missing = [k for k in lv["counts"] if k not in done]
            lines += [f"### λ = {lam:g}", ""]
            if missing:
                lines += [f"(Run stopped before k = {', '.join(map(str, missing))}: see 'stopped' in the JSON.)", ""]
            lines += [
                      "| k | fraction | " + " | ".join(f"vs opt K={s}" for s in steps) + " | "
                      + " | ".join(f"vs retrain K={s}" for s in steps) + " | "
                      + " | ".join(f"gap K={s}" for s in steps)
                      + " | opt gap | ‖δ_opt−δ_retrain‖/‖δ_retrain‖ | test acc θ̂ / K=0 / K=2 / opt / retrained "
                      "| edited acc θ̂ / K=0 / K=2 / opt / retrained |",
                      "|---|---|" + "---|" * (3 * len(steps) + 4)]
            for ref in [r for r in lv["references"] if r["damping"] == lam]:
                rs = {r["refine_steps"]: r for r in lv["rows"] if r["damping"] == lam and r["k"] == ref["k"]}
                last = rs[max(rs)]
                acc = " / ".join(_pct(x) for x in (ref["theta_hat_eval"]["test_acc"], rs[0]["test_acc"],
                                                     last["test_acc"], ref["opt_eval"]["test_acc"],
                                                     ref["retrain_eval"]["test_acc"]))
                eacc = " / ".join(_pct(x) for x in (ref["theta_hat_eval"]["edited_acc"], rs[0]["edited_acc"],
                                                      last["edited_acc"], ref["opt_eval"]["edited_acc"],
                                                      ref["retrain_eval"]["edited_acc"]))
                lines.append(f"| {ref['k']} | {100 * ref['fraction']:.2f}% | "
                             + " | ".join(_e(rs[s]["rel_error_opt"]) if s in rs else "n/a" for s in steps) + " | "
                             + " | ".join(_e(rs[s]["rel_error_retrain"]) if s in rs else "n/a" for s in steps)
                             + " | " + " | ".join(_e(rs[s]["stationarity_gap"]) if s in rs else "n/a"
                                                  for s in steps)
                             + f" | {_e(ref['opt_gap'])} | {_e(ref['opt_vs_retrain'])} | {acc} | {eacc} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def plot(rep: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(range(rep["config"]["refine"] + 1))
    colors = {0: "tab:red", 1: "tab:orange", 2: "tab:green", 3: "tab:blue"}
    panels = [("(a) logistic regression vs exact retraining", "convex")]
    if "llava" in rep:
        panels += [("(b) LLaVA LoRA vs δ_opt (min. of R̃_E + prox)", "rel_error_opt"),
                   ("(b) LLaVA LoRA vs δ_retrain (retrained from scratch)", "rel_error_retrain")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    for ax, (title, key) in zip(axes[0], panels):
        if key == "convex":
            table = convex_table(rep["convex"])
            for kind, style in (("flip", "-o"), ("remove", "--s")):
                cells = [c for c in table if c["edit"] == kind]
                for s in steps:
                    ax.loglog([c["fraction"] for c in cells], [max(c[f"err{s}"], 1e-16) for c in cells], style,
                              color=colors[s], ms=4, label=f"label flip, K={s}" if kind == "flip" else
                              f"removal, K={s}")
        else:
            lv = rep["llava"]
            for lam, style in zip(lv["dampings"], ("-o", "--s", ":^")):
                for s in steps:
                    rows = sorted((r for r in lv["rows"] if r["damping"] == lam and r["refine_steps"] == s),
                                  key=lambda r: r["k"])
                    ax.loglog([r["fraction"] for r in rows], [max(r[key], 1e-16) for r in rows], style,
                              color=colors[s], ms=4, label=f"λ={lam:g}, K={s}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("edited fraction of the training set")
        ax.set_ylabel("‖δ_K − δ_ref‖ / ‖δ_ref‖")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Taylor error of the influence update (K = Newton refinement steps)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).parent), help="folder for taylor_error.{json,md,png}")
    p.add_argument("--work", default="/tmp/mmerase-taylor-error", help="scratch folder (base, adapters)")
    p.add_argument("--smoke", action="store_true", help="the convex model only, small (seconds), for CI")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--refine", type=int, default=2, help="refinement steps K = 0..this")
    p.add_argument("--convex-n", type=int, default=1000)
    p.add_argument("--convex-reg", type=float, default=1e-3)
    p.add_argument("--draws", type=int, default=3, help="random nested edit sets of the convex model")
    p.add_argument("--no-llava", action="store_true")
    p.add_argument("--llava-n", type=int, default=300)
    p.add_argument("--llava-test", type=int, default=200)
    p.add_argument("--llava-pretrain", type=int, default=500)
    p.add_argument("--llava-pretrain-epochs", type=int, default=5)
    p.add_argument("--llava-epochs", type=int, default=6)
    p.add_argument("--dampings", default="0.1,0.01")
    p.add_argument("--tol", type=float, default=1e-3, help="CG tolerance of the LLaVA solves")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--rank", type=int, default=32, help="low-rank PCG preconditioner per λ (0: plain CG)")
    p.add_argument("--lanczos", type=int, default=20, help="Lanczos steps for the Hessian/GGN spectrum at θ̂ (0: skip)")
    p.add_argument("--opt-tol", type=float, default=1e-4, help="δ_opt: stop at ‖∇‖/‖b‖ below this")
    p.add_argument("--opt-max-iter", type=int, default=30)
    p.add_argument("--opt-start", choices=("theta_hat", "refined"), default="refined",
                   help="start δ_opt's L-BFGS at θ̂ or at θ̂ + the K-step influence result (the engine's Newton-CG "
                        "steps from θ̂, then L-BFGS; the default, far cheaper)")
    p.add_argument("--opt-check", type=int, default=1,
                   help="also run L-BFGS from θ̂ for this many edit sizes at the largest λ (the largest sizes first), "
                        "to check that both starts reach the same δ_opt")
    args = p.parse_args(argv)
    args.fractions, args.llava_fractions = FRACTIONS, LLAVA_FRACTIONS
    if args.smoke:
        args.fractions, args.convex_n, args.draws, args.no_llava = SMOKE_FRACTIONS, 300, 1, True
    args.dampings = [float(x) for x in str(args.dampings).split(",")]
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"config": {k: v for k, v in vars(args).items()}, "machine": machine(),
                              "versions": versions(), "date": time.strftime("%Y-%m-%d"), "load_avg_start":
                              os.getloadavg()}
    _log("convex model")
    report["convex"] = run_convex(args)
    if not args.no_llava:
        _log("tiny LLaVA adapter")
        partial = out / "taylor_error.partial.json"
        report["llava"] = run_llava(args, lambda r: partial.write_text(json.dumps({**report, "llava": r}, indent=1,
                                                                                  default=float) + "\n"))
        partial.unlink(missing_ok=True)
    report["seconds"] = time.perf_counter() - t0
    report["load_avg_end"] = os.getloadavg()
    (out / "taylor_error.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    text = markdown(report)
    (out / "taylor_error.md").write_text(text)
    plot(report, out / "taylor_error.png")
    print(text)
    _log(f"wrote {out / 'taylor_error'}.json/.md/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
