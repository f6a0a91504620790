"""Sequential deletion requests against one adapter (issue 7): what a preparation costs, what each later request
costs, exact (preconditioned CG) and approximate (the preparation's step alone), against retraining from scratch.

Scenario: the digits response-correction (RC) set-up of ``mmerase demo`` (tiny LLaVA pre-trained on other digits,
LoRA r=8 fine-tuned on "<image> What digit is this?" pairs of which 20 have a wrong answer), the GGN curvature and
the demo's damping. A request corrects k of the 20 wrong answers; its reference is an adapter retrained from
scratch (same recipe and seed) on the data with those k answers corrected. Recovery = (metric(unlearned) −
metric(corrupted)) / (metric(retrained) − metric(corrupted)) on the k corrected samples (loss, greedy accuracy) and
on 300 held-out digits (accuracy).

Also measured: products per second with and without the frozen-feature cache, the effect of a curvature sub-sample
on δ and on recovery, and how request time grows with the number of edits and with the training-set size.

    python benchmarks/request_reuse.py                 # ~40 min on 2 busy CPU cores; writes request_reuse.{json,md}
    python benchmarks/request_reuse.py --quick --out /tmp/rr   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mmerase import Edit, InfluenceEngine, SolverConfig
from mmerase.data import DIGIT_WORDS, digit_images, digit_samples, modify_sample
from mmerase.scenarios import ScenarioConfig, digit_split, pretrain_base, train_scenario_adapter
from mmerase.influence import vectors as V
from mmerase.influence.precondition import PreconditionerConfig, build_preconditioner
from mmerase.metrics import recovery_ratio
from mmerase.models import LoadOptions, load_model
from mmerase.record import machine, versions

N_BAD = 20


def _log(*args: Any) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


class Scenario:
    """Base, data, corrupted adapters per training-set size, and retrained references per request."""

    def __init__(self, work: Path, sizes: list[int], seed: int = 0, quick: bool = False,
                 bad_within: int | None = None) -> None:
        self.work, self.sizes, self.seed = work, sizes, seed
        self.cfg = ScenarioConfig(tasks=("rc",), seed=seed, n_pretrain=200 if quick else 500, n_train=max(sizes),
                              n_test=100 if quick else 300, pretrain_epochs=3 if quick else 5, progress=False)
        pre, self.train_idx, test_idx = digit_split(self.cfg)
        images, targets = digit_images()
        rng = random.Random(seed + 1)
        # the corrupted positions lie in every size's prefix
        self.bad = sorted(rng.sample(range(min(sizes) if bad_within is None else bad_within), N_BAD))
        self.wrong = {k: (targets[self.train_idx[k]] + rng.randint(1, 9)) % 10 for k in self.bad}
        self.clean = digit_samples(self.train_idx)
        self.corrupted = [modify_sample(s, response=DIGIT_WORDS[self.wrong[k]]) if k in self.wrong else s
                          for k, s in enumerate(self.clean)]
        self.test = digit_samples(test_idx, prefix="test-")
        self.test_labels = [targets[i] for i in test_idx]
        self.truth = {k: targets[self.train_idx[k]] for k in self.bad}
        t = time.perf_counter()
        self.base = work / "base"
        if not (self.base / "config.json").is_file():
            pretrain_base(self.base, digit_samples(pre, prefix="pre-"), self.cfg)
        self.pretrain_s = time.perf_counter() - t

    def data(self, n: int, fixed: int = 0) -> list:
        """The first n training samples with the first ``fixed`` corrupted answers corrected."""
        fix = set(self.bad[:fixed])
        return [self.clean[k] if k in fix else s for k, s in enumerate(self.corrupted[:n])]

    def adapter(self, n: int, fixed: int = 0, timed: bool = True) -> tuple[Path, float | None]:
        """The adapter trained on ``data(n, fixed)`` (seeded: the same weights every time) and, with ``timed``, the
        seconds it takes to train, measured now, so that every ratio to retraining comes from one run."""
        out = self.work / f"adapter-n{n}-fixed{fixed}"
        if not timed and (out / "adapter_model.safetensors").is_file():
            return out, None
        if out.exists():
            shutil.rmtree(out)
        return out, train_scenario_adapter(self.base, self.data(n, fixed), out, self.cfg)

    def edits(self, k: int) -> list[Edit]:
        return [Edit(old=self.corrupted[i], new=self.clean[i]) for i in self.bad[:k]]


class Evaluator:
    """Loss and greedy accuracy of the current adapter (θ̂ + δ) on the corrected samples and held-out digits."""

    def __init__(self, bundle: Any, engine: InfluenceEngine, scen: Scenario) -> None:
        self.bundle, self.engine, self.scen = bundle, engine, scen

    def __call__(self, delta: dict | None, k: int) -> dict[str, float]:
        if delta is not None:
            self.engine.apply(delta)
        try:
            fixed = [self.scen.clean[i] for i in self.scen.bad[:k]]
            labels = [self.scen.truth[i] for i in self.scen.bad[:k]]
            answers = self.bundle.generate(fixed, max_new_tokens=8, batch_size=64, progress=False)
            test_answers = self.bundle.generate(self.scen.test, max_new_tokens=8, batch_size=64, progress=False)
            return {"edited_loss": float(self.bundle.per_sample_losses(fixed, batch_size=64).mean()),
                    "edited_acc": sum(a == DIGIT_WORDS[y] for a, y in zip(answers, labels)) / len(labels),
                    "test_acc": sum(a == DIGIT_WORDS[y] for a, y in zip(test_answers, self.scen.test_labels))
                    / len(self.scen.test_labels)}
        finally:
            if delta is not None:
                self.engine.apply(delta, alpha=-1.0)


def _recovery(row: dict, corrupted: dict, retrained: dict) -> dict[str, float | None]:
    """Recovery ratio of each metric (None when there is no gap)."""
    return {key: recovery_ratio(row[key], corrupted[key], retrained[key])
            for key in ("edited_loss", "edited_acc", "test_acc")}


def _rel(a: dict, b: dict) -> float:
    fa, fb = V.flatten(list(a.values())), V.flatten(list(b.values()))
    return float((fa - fb).norm() / fb.norm())


def _solve(engine: InfluenceEngine, edits: list[Edit], cfg: SolverConfig, pre: Any = None) -> tuple[Any, float]:
    t = time.perf_counter()
    res = engine.solve(edits, cfg, preconditioner=pre)
    return res, time.perf_counter() - t


def _summary(res: Any, seconds: float) -> dict[str, Any]:
    return {"seconds": seconds, "steps": res.steps, "product_samples": res.product_samples,
            "residual": res.residual, "converged": res.converged, "delta_norm": res.delta_norm}


def product_rate(bundle: Any, samples: list, reps: int, batch_size: int) -> dict[str, float]:
    """Samples per second through GGN products, recomputing image features vs the frozen-feature cache."""
    out = {}
    cache = bundle.feature_cache()
    for name, (loss_fn, collate) in {"recompute": (bundle.loss_fn, bundle.collate),
                                     "cached": (cache.loss_fn, cache.collate)}.items():
        engine = InfluenceEngine(bundle.model, loss_fn, samples, collate_fn=collate)
        v = [torch.randn(p.shape, generator=torch.Generator().manual_seed(0), dtype=p.dtype) for p in engine.params]
        engine.product(v, "ggn", batch_size=batch_size)  # warm-up (fills the cache)
        t = time.perf_counter()
        for _ in range(reps):
            engine.product(v, "ggn", batch_size=batch_size)
        out[name] = reps * len(samples) / (time.perf_counter() - t)
    out["speedup"] = out["cached"] / out["recompute"]
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    main_n = max(sizes)
    ks = [int(k) for k in args.edits.split(",")]
    lam, bs = args.damping, args.batch_size
    scen = Scenario(work, sizes, quick=args.quick, bad_within=args.bad_within)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    def checkpoint() -> None:  # partial results survive an interrupted run
        (out_dir / f"{args.name}.partial.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    _log(f"base ready ({scen.pretrain_s:.0f} s)")
    exact = SolverConfig(method="cg", curvature="ggn", damping=lam, tol=args.tol, max_steps=300, batch_size=bs,
                         progress=False, stationarity_check=False)
    approx = SolverConfig(method="prepared", curvature="ggn", damping=lam, batch_size=bs, progress=False,
                          stationarity_check=False, residual_samples=args.residual_samples)
    report: dict[str, Any] = {"config": {**vars(args), "n_bad": N_BAD, "lora_r": scen.cfg.lora_r,
                                         "epochs": scen.cfg.epochs, "curvature": "ggn"},
                              "versions": versions(), "machine": machine(), "load_avg_start": os.getloadavg(),
                              "sizes": {}}
    for n in sizes:
        _log(f"n = {n}")
        row: dict[str, Any] = {}
        corrupted_dir, row["train_corrupted_s"] = scen.adapter(n)
        retrain = {k: scen.adapter(n, k) for k in (ks if n == main_n else [max(ks)])}
        row["retrain_s"] = {k: s for k, (_, s) in retrain.items()}
        t = time.perf_counter()
        bundle = load_model(scen.base, adapter=corrupted_dir, options=LoadOptions(device="cpu"))
        row["load_s"] = time.perf_counter() - t
        cache = bundle.feature_cache()
        train = scen.data(n)
        engine = InfluenceEngine(bundle.model, cache.loss_fn, train, collate_fn=cache.collate)
        evaluate = Evaluator(bundle, engine, scen)
        if n == main_n:
            row["product_rate"] = product_rate(bundle, train, args.rate_reps, bs)
            _log("product rate", row["product_rate"])
        base_eval = {k: evaluate(None, k) for k in retrain}
        ref_eval = {}
        for k, (folder, _) in retrain.items():
            ref = load_model(scen.base, adapter=folder, options=LoadOptions(device="cpu"))
            ref_engine = InfluenceEngine(ref.model, ref.loss_fn, train, collate_fn=ref.collate)
            ref_eval[k] = Evaluator(ref, ref_engine, scen)(None, k)
        row["corrupted"], row["retrained"] = base_eval, ref_eval
        # ---- preparations
        preps, row["prepare"] = {}, {}
        kinds = {"lowrank": PreconditionerConfig(kind="lowrank", rank=args.rank, batch_size=bs),
                 "lowrank-sub": PreconditionerConfig(kind="lowrank", rank=args.sub_rank, samples=args.sub_samples,
                                                     batch_size=bs),
                 "ekfac": PreconditionerConfig(kind="ekfac", batch_size=bs)}
        if n != main_n:
            kinds = {k: v for k, v in kinds.items() if k in ("lowrank", "ekfac")}
        for name, pcfg in kinds.items():
            t = time.perf_counter()
            preps[name] = build_preconditioner(engine, "ggn", lam, pcfg)
            meta = preps[name].meta
            row["prepare"][name] = {"seconds": time.perf_counter() - t, "products": meta["products"],
                                    "product_samples": meta["product_samples"], "kept": meta.get("kept"),
                                    "per_retrain": (time.perf_counter() - t) / row["retrain_s"][max(ks)]}
            _log("prepared", name, row["prepare"][name])
        # ---- the cold exact solve (largest request)
        kmax = max(ks)
        edits = scen.edits(kmax)
        cold, secs = _solve(engine, edits, exact)
        row["cold"] = {**_summary(cold, secs), "eval": evaluate(cold.delta, kmax)}
        row["cold"]["recovery"] = _recovery(row["cold"]["eval"], base_eval[kmax], ref_eval[kmax])
        _log("cold", _summary(cold, secs))
        # ---- requests
        row["requests"] = {}
        for k in (ks if n == main_n else [kmax]):
            edits = scen.edits(k)
            out: dict[str, Any] = {}
            for name, pre in preps.items():
                if name == "lowrank" or (k == kmax and name in args.pcg.split(",")):
                    res, secs = _solve(engine, edits, exact, pre)
                    out[f"pcg-{name}"] = _summary(res, secs)
                    if k == kmax:
                        out[f"pcg-{name}"]["rel_to_cold"] = _rel(res.delta, cold.delta)
                    if name == "lowrank":
                        exact_delta = res.delta
                res, secs = _solve(engine, edits, approx, pre)
                out[f"prepared-{name}"] = {**_summary(res, secs), "rel_to_exact": None}
                out[f"prepared-{name}"]["eval"] = evaluate(res.delta, k)
                out[f"prepared-{name}"]["_delta"] = res.delta
            for key in list(out):
                if key.startswith("prepared-"):
                    out[key]["rel_to_exact"] = _rel(out[key].pop("_delta"), exact_delta)
            out["pcg-lowrank"]["eval"] = evaluate(exact_delta, k)
            for key, val in out.items():
                val["speedup_vs_retrain"] = row["retrain_s"][k] / val["seconds"]
                if "eval" in val:
                    val["recovery"] = _recovery(val["eval"], base_eval[k], ref_eval[k])
            row["requests"][k] = out
            report["sizes"][n] = row
            checkpoint()
            _log(f"request k={k}", {key: (round(v["seconds"], 2), v.get("steps")) for key, v in out.items()})
        # ---- curvature sub-sample (largest request, main size)
        if n == main_n:
            row["subsample"] = {}
            for m in [int(x) for x in args.subsample.split(",")]:
                cfg = SolverConfig(**{**exact.to_dict(), "curvature_samples": m})
                res, secs = _solve(engine, scen.edits(kmax), cfg)
                entry = {**_summary(res, secs), "rel_to_full": _rel(res.delta, cold.delta),
                         "eval": evaluate(res.delta, kmax)}
                entry["recovery"] = _recovery(entry["eval"], base_eval[kmax], ref_eval[kmax])
                entry["speedup_vs_retrain"] = row["retrain_s"][kmax] / secs
                row["subsample"][m] = entry
                _log(f"subsample {m}", {k: entry[k] for k in ("seconds", "steps", "rel_to_full")})
        report["sizes"][n] = row
    report["load_avg_end"] = os.getloadavg()
    return report


def run_sequential(args: argparse.Namespace) -> dict[str, Any]:
    """Two requests one after the other (the second at the updated adapter, with the preparation made for the
    first) against both edit sets solved at the first adapter."""
    torch.set_num_threads(1)
    n = max(int(s) for s in args.sizes.split(","))
    scen = Scenario(Path(args.work), [n], quick=args.quick, bad_within=args.bad_within)
    lam, half = args.damping, N_BAD // 2
    exact = SolverConfig(method="cg", curvature="ggn", damping=lam, tol=args.tol, max_steps=300,
                         batch_size=args.batch_size, progress=False, stationarity_check=False)
    bundle = load_model(scen.base, adapter=scen.adapter(n, timed=False)[0], options=LoadOptions(device="cpu"))
    cache = bundle.feature_cache()
    engine = InfluenceEngine(bundle.model, cache.loss_fn, scen.data(n), collate_fn=cache.collate)
    evaluate = Evaluator(bundle, engine, scen)
    ref_dir, _ = scen.adapter(n, N_BAD, timed=False)
    ref = load_model(scen.base, adapter=ref_dir, options=LoadOptions(device="cpu"))
    ref_eval = Evaluator(ref, InfluenceEngine(ref.model, ref.loss_fn, scen.data(n), collate_fn=ref.collate), scen)
    corrupted, retrained = evaluate(None, N_BAD), ref_eval(None, N_BAD)
    pre = build_preconditioner(engine, "ggn", lam, PreconditionerConfig(kind="lowrank", rank=args.rank,
                                                                        batch_size=args.batch_size))
    e1, e2 = scen.edits(N_BAD)[:half], scen.edits(N_BAD)[half:]
    theta0 = [p.detach().clone() for p in engine.params]
    comb, t_comb = _solve(engine, e1 + e2, exact, pre)
    r1, t1 = _solve(engine, e1, exact, pre)
    engine.apply(r1.delta)
    r2_cold, t2_cold = _solve(engine, e2, exact)
    r2, t2 = _solve(engine, e2, exact, pre)  # the preparation made at θ̂, now one request stale
    engine.apply(r2.delta)
    seq = {name: p.detach() - t for name, p, t in zip(engine.names, engine.params, theta0)}
    seq_eval = evaluate(None, N_BAD)
    engine.apply(seq, alpha=-1.0)
    gap = _rel(seq, comb.delta)
    out = {"n": n, "damping": lam, "edits": [half, N_BAD - half], "gap": gap,
           "combined": {**_summary(comb, t_comb), "eval": evaluate(comb.delta, N_BAD)},
           "first": _summary(r1, t1), "second_stale_preparation": _summary(r2, t2),
           "second_cold": _summary(r2_cold, t2_cold), "sequential_eval": seq_eval,
           "corrupted": corrupted, "retrained": retrained, "versions": versions(), "machine": machine()}
    out["combined"]["recovery"] = _recovery(out["combined"]["eval"], corrupted, retrained)
    out["sequential_recovery"] = _recovery(seq_eval, corrupted, retrained)
    _log("sequential", {k: out[k] for k in ("gap", "sequential_recovery")})
    return out


def markdown_sequential(r: dict[str, Any]) -> str:
    c, s1, s2, s2c = r["combined"], r["first"], r["second_stale_preparation"], r["second_cold"]
    rc, rs = c["recovery"], r["sequential_recovery"]
    return "\n".join([
        "# Two sequential requests vs one combined request (issue 7)", "",
        f"Digits RC, n = {r['n']}, GGN, λ = {r['damping']}; request 1 corrects {r['edits'][0]} answers, request 2 "
        f"the other {r['edits'][1]} at the adapter request 1 produced, preconditioned by the preparation made for the "
        "first adapter; the reference solves both edit sets at the first adapter.", "",
        f"- ‖θ_sequential − θ_combined‖ / ‖δ_combined‖ = **{r['gap']:.4f}** (the second request re-linearised at the "
        "moved adapter: a first-order effect of the first request's step)",
        f"- recovery (loss / accuracy on the 20 corrected samples): combined {_f(rc['edited_loss'])} / "
        f"{_f(rc['edited_acc'])}, sequential {_f(rs['edited_loss'])} / {_f(rs['edited_acc'])}",
        f"- CG steps: combined {c['steps']}, request 1 {s1['steps']}, request 2 with the stale preparation "
        f"{s2['steps']} (cold: {s2c['steps']}); residuals {c['residual']:.1e}, {s1['residual']:.1e}, "
        f"{s2['residual']:.1e}", ""])


def _f(x: Any, nd: int = 2) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{nd}f}" if abs(x) >= 10 ** -nd or x == 0 else f"{x:.1e}"
    return str(x)


def len_test(rep: dict[str, Any]) -> int:
    return 100 if rep["config"]["quick"] else 300


def markdown(rep: dict[str, Any]) -> str:
    cfg, sizes = rep["config"], rep["sizes"]
    main_n = max(sizes, key=int)
    m = sizes[main_n]
    kmax = max(m["requests"], key=int)
    lines = [
        "# Sequential deletion requests: preparation, exact and prepared answers (issue 7)", "",
        f"Digits RC scenario (tiny LLaVA, LoRA r={cfg['lora_r']}, {cfg['n_bad']} corrupted answers among the first "
        f"{min(sizes, key=int)} training pairs), GGN curvature, damping λ={cfg['damping']}, CG tolerance "
        f"{cfg['tol']}, batch {cfg['batch_size']}, float32, one thread. Machine: {rep['machine']['cpu']} "
        f"({rep['machine']['cores']} cores, shared: load average {rep['load_avg_start'][0]:.1f} at start, "
        f"{rep['load_avg_end'][0]:.1f} at end); torch {rep['versions']['torch']}, transformers "
        f"{rep['versions']['transformers']}. Times are wall seconds of `engine.solve` with the model loaded "
        f"(loading it took {m['load_s']:.2f} s); retraining = fine-tuning the adapter from scratch with the demo's "
        f"recipe ({cfg['epochs']} epochs).", "",
        f"## Training-set size n = {main_n}", "",
        "| what | seconds | × one retrain |", "|---|---|---|",
        f"| retrain from scratch ({kmax} answers corrected) | {_f(m['retrain_s'][kmax])} | 1 |",
        f"| cold exact solve, {kmax} edits ({m['cold']['steps']} CG steps) | {_f(m['cold']['seconds'])} | "
        f"{_f(m['cold']['seconds'] / m['retrain_s'][kmax])} |",
    ]
    for name, p in m["prepare"].items():
        lines.append(f"| prepare `{name}` ({p['products']} products, {p['product_samples']} sample-products) | "
                     f"{_f(p['seconds'])} | {_f(p['per_retrain'])} |")
    pr = m["product_rate"]
    lines += ["", f"Frozen-feature cache: {_f(pr['recompute'], 1)} → {_f(pr['cached'], 1)} samples/s through GGN "
              f"products (×{_f(pr['speedup'])}); the tiny vision tower (2 layers, 17 tokens) is a small part of a "
              "product, so the saving is small here and grows with the vision tower's share of the forward.", "",
              "### Requests (k corrected answers)", "",
              "`pcg-X`: exact, preconditioned CG with preparation X (same δ as the cold solve to the tolerance); "
              "`prepared-X`: the preparation's step alone (δ = αMb; α = 1 for the low-rank ones, whose "
              "eigenpairs come from exact products, a line search for ekfac; one product over "
              f"{cfg['residual_samples']} samples for the reported residual, which on so few samples mostly "
              "measures their own curvature noise), approximate. Recovery of the loss / "
              "accuracy gap on the corrected samples and of the held-out accuracy gap (1 = as retrained, "
              "n/a = no gap).", "",
              "| k | answer | seconds | ×faster than retrain | steps | residual | ‖δ−δ_exact‖/‖δ_exact‖ | "
              "recovery loss | recovery acc | recovery test acc |", "|---|---|---|---|---|---|---|---|---|---|"]
    for k, out in m["requests"].items():
        for key, v in out.items():
            rec = v.get("recovery") or {}
            rel = v.get("rel_to_exact", v.get("rel_to_cold"))
            lines.append(f"| {k} | {key} | {_f(v['seconds'])} | {_f(v.get('speedup_vs_retrain'), 1)} | {v['steps']} "
                         f"| {_f(v['residual'], 4)} | {_f(rel, 4)} | {_f(rec.get('edited_loss'))} | "
                         f"{_f(rec.get('edited_acc'))} | {_f(rec.get('test_acc'))} |")
    c = m["cold"]
    acc_c, acc_r = m["corrupted"][kmax]["test_acc"], m["retrained"][kmax]["test_acc"]
    note = (f"Held-out accuracy: corrupted {100 * acc_c:.1f}%, retrained {100 * acc_r:.1f}% "
            f"({abs(acc_r - acc_c) * len_test(rep):.0f} of {len_test(rep)} digits apart), so its recovery ratio is "
            "noise; the loss and accuracy on the corrected samples are the signal.")
    lines += [f"| {kmax} | cold exact CG | {_f(c['seconds'])} | {_f(m['retrain_s'][kmax] / c['seconds'], 2)} | "
              f"{c['steps']} | {_f(c['residual'], 4)} | 0 | {_f(c['recovery']['edited_loss'])} | "
              f"{_f(c['recovery']['edited_acc'])} | {_f(c['recovery']['test_acc'])} |", "",
              "", note, "",
              "### Curvature sub-sample (products over a fixed random subset; cold CG)", "",
              "| subset | seconds | steps | ‖δ−δ_full‖/‖δ_full‖ | recovery loss | recovery acc | recovery test acc |",
              "|---|---|---|---|---|---|---|"]
    for s, v in m.get("subsample", {}).items():
        rec = v["recovery"]
        lines.append(f"| {s} | {_f(v['seconds'])} | {v['steps']} | {_f(v['rel_to_full'], 3)} | "
                     f"{_f(rec['edited_loss'])} | {_f(rec['edited_acc'])} | {_f(rec['test_acc'])} |")
    lines += ["", "## Request time against training-set size (k = %s)" % kmax, "",
              "| n | retrain s | prepare lowrank s | prepare ekfac s | cold exact s | pcg-lowrank s (steps) | "
              "prepared-lowrank s | prepared-ekfac s |", "|---|---|---|---|---|---|---|---|"]
    for n, r in sorted(sizes.items(), key=lambda x: int(x[0])):
        q = r["requests"][kmax] if kmax in r["requests"] else r["requests"][str(kmax)]
        lines.append(f"| {n} | {_f(r['retrain_s'][kmax])} | {_f(r['prepare']['lowrank']['seconds'])} | "
                     f"{_f(r['prepare']['ekfac']['seconds'])} | {_f(r['cold']['seconds'])} | "
                     f"{_f(q['pcg-lowrank']['seconds'])} ({q['pcg-lowrank']['steps']}) | "
                     f"{_f(q['prepared-lowrank']['seconds'])} | {_f(q['prepared-ekfac']['seconds'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).parent), help="folder for request_reuse.json/.md")
    p.add_argument("--work", default="/tmp/mmerase-request-reuse", help="scratch folder (base, adapters; reused)")
    p.add_argument("--sizes", default="140,280,560")
    p.add_argument("--edits", default="1,5,20")
    p.add_argument("--damping", type=float, default=0.01)  # the λ its recorded figures used (the demo's former fixed λ)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rank", type=int, default=32, help="Lanczos steps of the 'lowrank' preparation")
    p.add_argument("--sub-rank", type=int, default=16)
    p.add_argument("--sub-samples", type=int, default=64)
    p.add_argument("--residual-samples", type=int, default=16)
    p.add_argument("--subsample", default="64,140")
    p.add_argument("--rate-reps", type=int, default=2)
    p.add_argument("--pcg", default="lowrank,lowrank-sub,ekfac",
                   help="preparations that also get an exact PCG request for the largest k ('lowrank' always does)")
    p.add_argument("--name", default="request_reuse", help="stem of the output files")
    p.add_argument("--bad-within", type=int, default=None,
                   help="draw the corrupted answers among the first this many training pairs (default: smallest size)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sequential-only", action="store_true",
                   help="only the two-requests-vs-one comparison (largest size), to <name>.json/.md")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.edits, args.rank, args.sub_rank, args.subsample = "40,60", "1,5", 6, 4, "20"
        args.sub_samples, args.residual_samples, args.rate_reps = 20, 8, 1
    out = Path(args.out)
    if args.sequential_only:
        rep = run_sequential(args)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.name}.json").write_text(json.dumps(rep, indent=1, default=float) + "\n")
        (out / f"{args.name}.md").write_text(markdown_sequential(json.loads(json.dumps(rep, default=float))))
        return 0
    report = run(args)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    (out / f"{args.name}.md").write_text(markdown(json.loads(json.dumps(report, default=float))))
    (out / f"{args.name}.partial.json").unlink(missing_ok=True)
    _log(f"wrote {out / args.name}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
