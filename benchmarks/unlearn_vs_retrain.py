"""Unlearning vs retraining from scratch (issue 9, item 3): time, peak memory and quality on the demo's scenarios.

The tiny LLaVA of ``mmerase demo`` (pre-trained on 500 digits), a LoRA adapter fine-tuned with the demo's recipe on
"<image> What digit is this?" pairs, a fraction of them corrupted: RC (wrong answers → corrected), QM (another
digit's image → the right image), IR (the corrupted pairs removed). Training sets beyond scikit-learn's digits are
extended with shifted/rotated copies (``benchmarks/_augment.py``). Each point compares

- **retrain**: a fresh adapter, same recipe and seed, trained on the edited data (timed in this run);
- **cold**: ``engine.solve`` from nothing (fresh feature cache): conjugate gradients with the demo's other solver
  settings (GGN, no refinement);
- **pcg**: the same exact solve preconditioned by a preparation (``mmerase.prepare.prepare``, library defaults);
- **prepared**: the preparation's one-step answer (``method='prepared'``, ``residual_samples=16``, no
  stationarity check: the README's recipe).

Sweeps around the default point (demo size n=500, 20% corrupted, every corrupted pair edited): the corruption rate
(all three scenarios, cold solves), the training-set size (RC, k fixed edits, products over a fixed curvature
sub-sample of ``--curvature-samples``; full-data cold solves up to ``--full-cold-max``) and the number of edits (RC,
one size). Peak memory: the process's peak resident set (VmHWM, reset before each block) through
``mmerase.memory.PeakMemory``, reported as the rise over the resident set at the block's start.

    python benchmarks/unlearn_vs_retrain.py                # the full run (~45 min on one core)
    python benchmarks/unlearn_vs_retrain.py --smoke --out /tmp/uvr
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _augment import augmented_digits  # noqa: E402
from request_reuse import _f, _log, _recovery as recovery  # noqa: E402

from mmerase import Edit, InfluenceEngine, SolverConfig  # noqa: E402
from mmerase import demo as D  # noqa: E402
from mmerase import scenarios as S  # noqa: E402
from mmerase.data import DIGIT_QUESTION, DIGIT_WORDS, Sample, digit_images, digit_samples, modify_sample  # noqa: E402
from mmerase.memory import PeakMemory  # noqa: E402
from mmerase.models import LoadOptions, load_model  # noqa: E402
from mmerase.prepare import PreconditionerConfig, prepare  # noqa: E402
from mmerase.record import machine, versions  # noqa: E402

NAME = "unlearn_vs_retrain"
ROLES = ("cold", "cold-full", "pcg", "prepared")


def _mib(mem: dict[str, Any]) -> dict[str, float]:
    return {"peak_mib": mem["peak_bytes"] / 2**20, "rise_mib": (mem["peak_bytes"] - mem["start_bytes"]) / 2**20,
            "scope": mem.get("peak_scope")}


def _sample(sid: str, image: Any, label: int) -> Sample:
    return Sample(id=sid, image=image, conversations=[{"from": "human", "value": DIGIT_QUESTION},
                                                      {"from": "gpt", "value": DIGIT_WORDS[label]}])


class Data:
    """One training set of size n with a fraction ``rate`` corrupted, as in the demo (same draws for n=500)."""

    def __init__(self, bench: "Bench", n: int, rate: float) -> None:
        seed = bench.seed
        self.digits = augmented_digits(bench.pool, n, seed=seed)
        self.clean = [_sample(d.id, d.image, d.label) for d in self.digits]
        rng = random.Random(seed + 1)
        self.bad = sorted(rng.sample(range(n), max(1, round(rate * n))))
        self.wrong = {k: (self.digits[k].label + rng.randint(1, 9)) % 10 for k in self.bad}
        wrong_image = {k: rng.choice(bench.by_class[self.wrong[k]]) for k in self.bad}
        self.rc = [modify_sample(s, response=DIGIT_WORDS[self.wrong[k]]) if k in self.wrong else s
                   for k, s in enumerate(self.clean)]
        self.qm = [modify_sample(s, image=bench.images[wrong_image[k]]) if k in self.wrong else s
                   for k, s in enumerate(self.clean)]
        self.order = list(self.bad)  # a request of k edits takes the first k of a fixed shuffle
        random.Random(seed + 2).shuffle(self.order)

    def trained(self, task: str) -> list[Sample]:
        return self.qm if task == "qm" else self.rc

    def edited_idx(self, k: int) -> list[int]:
        return sorted(self.order[:k])

    def edits(self, task: str, k: int) -> list[Edit]:
        old = self.trained(task)
        return [Edit(old=old[i], new=None if task == "ir" else self.clean[i]) for i in self.edited_idx(k)]

    def retrain_set(self, task: str, k: int) -> list[Sample]:
        idx = set(self.edited_idx(k))
        old = self.trained(task)
        if task == "ir":
            return [s for i, s in enumerate(old) if i not in idx]
        return [self.clean[i] if i in idx else s for i, s in enumerate(old)]

    def eval_set(self, task: str, k: int) -> tuple[list[Sample], list[int]]:
        """RC/QM: the corrected pairs with their true labels; IR: the removed pairs as trained (forget set)."""
        idx = self.edited_idx(k)
        if task == "ir":
            return [self.rc[i] for i in idx], [self.wrong[i] for i in idx]
        return [self.clean[i] for i in idx], [self.digits[i].label for i in idx]


class Bench:
    """Base model, data and trained adapters of one run; every result lands in ``report`` and is checkpointed."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.seed = args, args.seed
        self.work = Path(args.work or tempfile.mkdtemp(prefix="mmerase-uvr-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cfg = D.DemoConfig(tasks=("rc", "qm", "ir"), seed=args.seed, n_pretrain=args.n_pretrain,
                                n_train=len(digit_images()[0]) - args.n_pretrain - args.n_test, n_test=args.n_test,
                                progress=False)
        if args.smoke:
            self.cfg.pretrain_epochs, self.cfg.epochs = 1, 1
        pre, pool, test = S.digit_split(self.cfg)
        self.pool = pool[: args.pool] if args.pool else pool
        self.images, targets = digit_images()
        self.by_class: dict[int, list[int]] = {}
        for i in pre:
            self.by_class.setdefault(targets[i], []).append(i)
        self.test = (digit_samples(test, prefix="test-"), [targets[i] for i in test])
        # a cold first-order CG solve (GGN, no refinement) with the demo's other settings: what the results in
        # benchmarks/ were measured with; the demo itself answers from an EK-FAC preparation and refines
        self.solver = dataclasses.replace(D.demo_solver(self.cfg), method="cg", curvature="ggn",
                                          refine_steps=0)
        if args.damping is not None:
            self.solver = dataclasses.replace(self.solver, damping=args.damping)
        if args.max_steps is not None:
            self.solver = dataclasses.replace(self.solver, max_steps=args.max_steps)
        self.load = LoadOptions(device="cpu", exact_hvp=self.solver.curvature in ("hessian", "ggn"))
        self.data: dict[tuple[int, float], Data] = {}
        self.adapters: dict[tuple, dict[str, Any]] = {}
        self.points: dict[str, dict[str, Any]] = {}
        self.t0 = time.perf_counter()
        runs: list[dict[str, Any]] = []
        if args.resume:  # points measured by an earlier (interrupted) run are kept, each with its own timings
            prev = json.loads(Path(args.resume).read_text())
            runs = prev.get("runs") or [{k: prev.get(k) for k in ("load_avg_start", "load_avg_end", "seconds",
                                                                   "cpu_seconds", "solver")}]
            for key, q in prev["points"].items():
                self.points[key] = {**q, "run": q.get("run", 1)}
        runs.append({"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "load_avg_start": os.getloadavg()})
        self.report: dict[str, Any] = {"runs": runs,
            "config": {**vars(args), "demo": dataclasses.asdict(self.cfg)}, "solver": self.solver.to_dict(),
            "machine": machine(), "versions": versions(), "load_avg_start": os.getloadavg(),
            "torch_threads": torch.get_num_threads(), "sizes": {"pretrain": len(pre), "pool": len(self.pool),
                                                                 "test": len(test)},
            "points": self.points, "sweeps": {}}
        t = time.perf_counter()
        self.base = self.work / "base"
        if not (self.base / "config.json").is_file():
            S.pretrain_base(self.base, digit_samples(pre, prefix="pre-"), self.cfg)
        self.report["pretrain_s"] = time.perf_counter() - t

    def over_budget(self) -> bool:
        return time.perf_counter() - self.t0 > 60 * self.args.budget_min

    def checkpoint(self) -> None:
        self.report["elapsed_s"] = time.perf_counter() - self.t0
        (self.out / f"{NAME}.partial.json").write_text(json.dumps(self.report, indent=1, default=float) + "\n")

    def dataset(self, n: int, rate: float) -> Data:
        if (n, rate) not in self.data:
            self.data[(n, rate)] = Data(self, n, rate)
        return self.data[(n, rate)]

    def adapter(self, key: tuple, samples: list[Sample]) -> dict[str, Any]:
        """Train (once per run) the adapter for ``key`` on ``samples``: folder, seconds, peak memory, evaluation."""
        if key not in self.adapters:
            folder = self.work / "adapters" / "-".join(str(x) for x in key)
            with PeakMemory() as mem:
                seconds = S.train_scenario_adapter(self.base, samples, folder, self.cfg)
            self.adapters[key] = {"dir": folder, "seconds": seconds, "memory": _mib(mem.result), "n": len(samples)}
            _log(f"trained {folder.name}: {seconds:.1f} s")
        return self.adapters[key]

    def evaluate(self, folder: Path, edited: tuple[list[Sample], list[int]]) -> dict[str, float]:
        return S.evaluate_adapter(self.base, folder, {"test": self.test, "edited": edited}, self.cfg)

    def engine(self, folder: Path, train: list[Sample]) -> tuple[Any, InfluenceEngine]:
        """The corrupted adapter loaded with a fresh frozen-feature cache (nothing precomputed)."""
        bundle = load_model(self.base, adapter=folder, options=self.load)
        cache = bundle.feature_cache()
        return bundle, InfluenceEngine(bundle.model, cache.loss_fn, train, collate_fn=cache.collate)

    def evaluate_delta(self, bundle: Any, engine: InfluenceEngine, delta: dict, edited: tuple) -> dict[str, float]:
        engine.apply(delta)
        try:
            with tempfile.TemporaryDirectory(dir=self.work) as tmp:
                bundle.save_adapter(tmp)
                return self.evaluate(Path(tmp), edited)
        finally:
            engine.apply(delta, alpha=-1.0)

    # ------------------------------------------------------------------ one point
    def point(self, task: str, n: int, rate: float, k: int | None, answers: tuple[str, ...],
              curvature_samples: int | None = None) -> dict[str, Any]:
        """Corrupted vs retrained vs each answer in ``answers`` for a request of k edits (None: every corrupted
        pair); a point already measured in this run is reused (answers added if missing)."""
        data = self.dataset(n, rate)
        k = len(data.bad) if k is None else k
        sub = curvature_samples if curvature_samples is not None and curvature_samples < n else None
        key = point_key(task, n, rate, k, curvature_samples)
        p = self.points.setdefault(key, {"key": key, "task": task, "n": n, "rate": rate, "k": k,
                                         "n_corrupted": len(data.bad), "curvature_samples": sub, "answers": {},
                                         "run": len(self.report["runs"])})
        todo = [a for a in answers if a not in p["answers"]]
        if not todo:
            return p
        trained = data.trained(task)
        edited = data.eval_set(task, k)
        corrupted = self.adapter(("corrupted", "qm" if task == "qm" else "rc", n, rate), trained)
        all_fixed = k == len(data.bad)
        rkey = ("retrained", "clean" if all_fixed and task != "ir" else task, n, rate, None if all_fixed else k)
        retrained = self.adapter(rkey, data.retrain_set(task, k))
        if "corrupted" not in p:
            p["corrupted"] = {"eval": self.evaluate(corrupted["dir"], edited), "train_s": corrupted["seconds"],
                              "memory": corrupted["memory"]}
            p["retrained"] = {"eval": self.evaluate(retrained["dir"], edited), "seconds": retrained["seconds"],
                              "memory": retrained["memory"], "n": retrained["n"]}
        edits = data.edits(task, k)
        sub = dataclasses.replace(self.solver, curvature_samples=curvature_samples)
        for role in todo:
            if role in ("cold", "cold-full"):
                cfg = self.solver if role == "cold-full" else sub
                bundle, engine = self.engine(corrupted["dir"], trained)
                with PeakMemory() as mem:
                    t = time.perf_counter()
                    res = engine.solve(edits, cfg)
                    secs = time.perf_counter() - t
                p["answers"][role] = self._answer(res, secs, mem, p, bundle, engine, edited, cfg)
            else:
                prep = self.preparation(task, n, rate, curvature_samples)
                cfg = sub if role == "pcg" else dataclasses.replace(sub, method="prepared", residual_samples=16,
                                                                    stationarity_check=False)
                with PeakMemory() as mem:
                    t = time.perf_counter()
                    res = prep["engine"].solve(edits, cfg, preconditioner=prep["prep"].preconditioner)
                    secs = time.perf_counter() - t
                p["answers"][role] = self._answer(res, secs, mem, p, prep["bundle"], prep["engine"], edited, cfg)
                p["answers"][role]["preparation"] = prep["summary"]
            a = p["answers"][role]
            _log(f"{key} {role}: {a['seconds']:.2f} s ({a['steps']} steps, residual {a['residual']:.1e}), "
                 f"{a['speedup']:.2f}x retrain, recovery {a['recovery']}")
            self.checkpoint()
        return p

    def _answer(self, res: Any, secs: float, mem: PeakMemory, p: dict, bundle: Any, engine: InfluenceEngine,
                edited: tuple, cfg: SolverConfig) -> dict[str, Any]:
        ev = self.evaluate_delta(bundle, engine, res.delta, edited)
        return {"seconds": secs, "speedup": p["retrained"]["seconds"] / secs, "steps": res.steps,
                "residual": res.residual, "converged": res.converged, "product_samples": res.product_samples,
                "curvature_set": res.info.get("curvature_set"), "n_edits": res.info.get("n_edits"),
                "damping": res.config.get("damping"), "damping_estimate": res.info.get("damping"),
                "stationarity_gap": res.info.get("stationarity_gap"), "memory": _mib(mem.result), "eval": ev,
                "recovery": recovery(ev, p["corrupted"]["eval"], p["retrained"]["eval"])}

    def preparation(self, task: str, n: int, rate: float, samples: int | None) -> dict[str, Any]:
        """The preparation for the corrupted adapter of (task's training set, n, rate), built once from a fresh
        feature cache: library defaults, over the curvature sub-sample when there is one."""
        key = ("qm" if task == "qm" else "rc", n, rate, samples)
        preps = self.report.setdefault("preparations", {})
        if not hasattr(self, "_preps"):
            self._preps: dict[tuple, dict[str, Any]] = {}
        if key not in self._preps:
            data = self.dataset(n, rate)
            corrupted = self.adapter(("corrupted", key[0], n, rate), data.trained(task))
            bundle, engine = self.engine(corrupted["dir"], data.trained(task))
            solver = dataclasses.replace(self.solver, curvature_samples=samples)
            pcfg = PreconditionerConfig(batch_size=solver.batch_size, seed=solver.seed, progress=False,
                                        samples=samples)
            if self.args.rank is not None:
                pcfg.rank = self.args.rank
            with PeakMemory() as mem:
                t = time.perf_counter()
                prep = prepare(engine, solver, pcfg)
                secs = time.perf_counter() - t
            meta = prep.preconditioner.meta
            summary = {"seconds": secs, "kind": prep.record.get("kind"), "products": meta.get("products"),
                       "product_samples": meta.get("product_samples"), "build_samples": meta.get("build_samples"),
                       "kept": meta.get("kept"), "memory": _mib(mem.result),
                       "per_retrain": secs / corrupted["seconds"]}
            self._preps[key] = {"bundle": bundle, "engine": engine, "prep": prep, "summary": summary}
            preps["-".join(str(x) for x in key)] = summary
            _log(f"prepared {key}: {secs:.1f} s ({summary['products']} products)")
        return self._preps[key]


# ---------------------------------------------------------------------- sweeps
def point_key(task: str, n: int, rate: float, k: int, curvature_samples: int | None) -> str:
    sub = curvature_samples if curvature_samples is not None and curvature_samples < n else None
    return f"{task}-n{n}-r{rate:g}-k{k}" + (f"-m{sub}" if sub else "")


def plan(args: argparse.Namespace) -> list[tuple[str, str, int, float, int | None, tuple[str, ...], int | None]]:
    """(sweep, task, n, rate, k, answers, curvature sub-sample) in run order, most needed first."""
    n0, r0, m = args.default_n, args.default_rate, args.curvature_samples
    which, steps = set(args.sweeps.split(",")), ("cold", "pcg", "prepared")
    which |= {"requests"} if "default" in which and args.requests else set()
    sizes = [int(x) for x in args.sizes.split(",")]
    out: list = []
    if "default" in which:  # every scenario, cold / preconditioned / prepared, full-data curvature
        out += [("default", t, n0, r0, None, steps, None) for t in ("rc", "qm", "ir")]
    if "requests" in which:  # RC requests of a few edits at the default size, the default preparation's answer
        out += [("requests", "rc", n0, r0, int(k), ("prepared",), None) for k in args.requests.split(",")]
    if "size" in which:  # RC, a fixed request, products over a fixed curvature sub-sample
        out += [("size", "rc", n, r0, round(r0 * n0), steps, m) for n in sizes]
    if "edits" in which:  # RC at one size; the size sweep's preparation serves every request
        out += [("edits", "rc", args.edits_n, r0, int(k), steps, m) for k in args.edits.split(",")]
    if "corruption" in which:  # cold solves, full-data curvature; the tasks of --corruption-extra go last
        rates = [float(x) for x in args.rates.split(",")]
        extra = set(args.corruption_extra.split(",")) - {""}
        for last in (False, True):
            out += [("corruption", t, n0, r, None, ("cold",), None) for r in rates for t in ("rc", "qm", "ir")
                    if (t in extra) == last]
    if "size" in which:  # what the full-data cold solve costs at larger n, while affordable
        out += [("size-full", "rc", n, r0, round(r0 * n0), ("cold-full",), m) for n in sizes
                if n0 < n <= args.full_cold_max]
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every point of :func:`plan`; once the run has taken ``--budget-min``, the points after the default ones are
    skipped (and listed as skipped). Partial results are checkpointed after every answer."""
    torch.set_num_threads(1)
    bench = Bench(args)
    _log(f"base ready ({bench.report['pretrain_s']:.0f} s); solver {bench.solver.to_dict()}")
    sw = bench.report["sweeps"]
    for name in ("default", "requests", "size", "edits", "corruption"):
        sw[name] = []
    skipped = bench.report["skipped"] = []
    for sweep, task, n, rate, k, answers, m in plan(args):
        key = point_key(task, n, rate, max(1, round(rate * n)) if k is None else k, m)
        done = key in bench.points and set(answers) <= set(bench.points[key]["answers"])
        if sweep != "default" and not done and bench.over_budget():
            skipped.append({"sweep": sweep, "task": task, "n": n, "rate": rate, "k": k, "answers": list(answers)})
            _log(f"skipped (over --budget-min): {skipped[-1]}")
            continue
        key = bench.point(task, n, rate, k, answers, curvature_samples=m)["key"]
        if sweep in sw and key not in sw[sweep]:
            sw[sweep].append(key)
        bench.checkpoint()
    bench.report["adapters"] = {"-".join(str(x) for x in key): {k: v for k, v in a.items() if k != "dir"}
                                for key, a in bench.adapters.items()}
    bench.report["load_avg_end"] = os.getloadavg()
    bench.report["seconds"] = time.perf_counter() - bench.t0
    use = resource.getrusage(resource.RUSAGE_SELF)
    bench.report["cpu_seconds"] = use.ru_utime + use.ru_stime
    bench.report["runs"][-1].update({k: bench.report[k] for k in ("load_avg_end", "seconds", "cpu_seconds",
                                                                    "solver")})
    bench.report["bars"] = bars(bench.report)
    return bench.report


def _pt(rep: dict, key: str) -> dict:
    return rep["points"][key]


def _full_cold(rep: dict, p: dict) -> dict | None:
    """The full-data cold solve for size point ``p``: its own, or the default point's at the same n."""
    if "cold-full" in p["answers"]:
        return p["answers"]["cold-full"]
    if p["curvature_samples"] is None:
        return p["answers"]["cold"]
    same = [q for q in rep["points"].values() if q["task"] == p["task"] and q["n"] == p["n"] and
            q["rate"] == p["rate"] and q["k"] == p["k"] and q["curvature_samples"] is None and "cold" in q["answers"]]
    return same[0]["answers"]["cold"] if same else None


def _full_estimate(rep: dict, p: dict) -> str:
    """A full-data cold solve not run at this n: the default point's, scaled by n (its products are over n)."""
    ref = next((q for q in rep["points"].values() if q["task"] == "rc" and q["n"] == rep["config"]["default_n"]
                and q["curvature_samples"] is None and "cold" in q["answers"] and q["k"] == p["k"]), None)
    if ref is None:
        return "not run"
    return f"≈ {ref['answers']['cold']['seconds'] * p['n'] / ref['n']:.0f} (est.: n={ref['n']}'s × n/{ref['n']})"


def _size_fit(rep: dict) -> dict[str, Any]:
    """Retraining time ∝ n (least squares through 0, on the faster of the two same-size trainings: the corrupted
    adapter's and the retrained one's) and the cold solve's spread over n; the crossover n*."""
    pts = [_pt(rep, k) for k in rep["sweeps"]["size"]]
    ns = [p["n"] for p in pts]
    rt = [min(p["retrained"]["seconds"], p["corrupted"]["train_s"]) for p in pts]  # least disturbed by load
    cold = [p["answers"]["cold"]["seconds"] for p in pts]
    per_sample = sum(n * t for n, t in zip(ns, rt)) / sum(n * n for n in ns)
    mean_cold = sum(cold) / len(cold)
    return {"retrain_s_per_sample": per_sample, "cold_s_mean": mean_cold, "cold_s_spread": max(cold) / min(cold),
            "retrain_growth": rt[-1] / rt[0], "size_growth": ns[-1] / ns[0], "crossover_n": mean_cold / per_sample}


def bars(rep: dict) -> dict[str, Any]:
    """Each bar of the issue, met or missed, from the sweeps that ran."""
    out: dict[str, Any] = {}
    sw = rep["sweeps"]
    for task in ("rc", "qm") if any(k.startswith("qm") for k in sw["default"]) else ():
        key = next(k for k in rep["sweeps"]["default"] if k.startswith(task))
        rec = _pt(rep, key)["answers"]["cold"]["recovery"]
        out[f"recovery_{task}"] = {"edited_loss": rec["edited_loss"], "edited_acc": rec["edited_acc"],
                                   "met": rec["edited_loss"] is not None and rec["edited_loss"] >= 0.8}
    if len(sw["size"]) > 1:
        fit = _size_fit(rep)
        out["flat_cold"] = {**fit, "met": fit["cold_s_spread"] <= 1.5}
    if not sw["default"]:
        return out
    speed = {k.split("-")[0]: _pt(rep, k)["answers"]["prepared"]["speedup"] for k in rep["sweeps"]["default"]}
    pcg = {k.split("-")[0]: _pt(rep, k)["answers"]["pcg"]["speedup"] for k in rep["sweeps"]["default"]}
    small = {_pt(rep, k)["k"]: _pt(rep, k)["answers"]["prepared"]["speedup"] for k in sw.get("requests", [])}
    out["prepared_50x"] = {"prepared": speed, "pcg": pcg, "met": min(speed.values()) >= 50,
                           "requests": small, "requests_met": bool(small) and min(small.values()) >= 50}
    return out


# ---------------------------------------------------------------------- report
def _runs_text(rep: dict) -> str:
    runs = rep.get("runs") or []
    if len(runs) < 2:
        return ""
    return (f" in the last of {len(runs)} runs (points carry the run that measured them; every ratio compares "
            "times of one run): " + "; ".join(
                f"run {i + 1} started {r.get('started', '?')}, load {_f((r.get('load_avg_start') or [None])[0], 1)}"
                f"→{_f((r.get('load_avg_end') or [None])[0], 1)}, {_f(r.get('seconds'), 0)} s wall, damping "
                f"{_damping(r['solver']) if r.get('solver') else '?'}" for i, r in enumerate(runs)))


def _damping(s: dict) -> str:
    return f"auto ({s.get('damping_scale', 0):g} × top eigenvalue)" if s["damping"] == "auto" else f"{s['damping']:g}"


def _lam(a: dict) -> str:
    est = a.get("damping_estimate")
    lam = est.get("value") if isinstance(est, dict) else a.get("damping")
    return _f(lam, 4) if isinstance(lam, (int, float)) else str(lam)


def _row(name: str, ev: dict, rec: dict | None, extra: str) -> str:
    r = rec or {}
    return (f"| {name} | {100 * ev['test_acc']:.1f}% | {100 * ev['edited_acc']:.1f}% | {ev['edited_loss']:.3f} | "
            f"{_f(r.get('edited_loss'))} | {_f(r.get('edited_acc'))} | {_f(r.get('test_acc'))} | {extra}")


def _ans_cols(a: dict) -> str:
    return (f"{_f(a['seconds'])} | {_f(a['speedup'], 1)} | {a['steps']} | {a['residual']:.1e} | "
            f"{a['memory']['rise_mib']:.0f} |")


def markdown(rep: dict) -> str:
    m, v, c = rep["machine"], rep["versions"], rep["config"]
    s = rep["solver"]
    lines = [
        "# Unlearning vs retraining from scratch (issue 9, item 3)", "",
        f"Machine: {m['cpu']} ({m['cores']} cores, shared; load average {rep['load_avg_start'][0]:.1f} at start, "
        f"{rep.get('load_avg_end', [float('nan')])[0]:.1f} at end), one torch thread; torch {v['torch']}, "
        f"transformers {v['transformers']}, peft {v['peft']}; seed {c['seed']}; total {rep.get('seconds', 0):.0f} s "
        f"wall, {rep.get('cpu_seconds', 0):.0f} s CPU{_runs_text(rep)}"
        f"{' (smoke run)' if c['smoke'] else ''}. Base pre-trained on {rep['sizes']['pretrain']} digits, "
        f"{rep['sizes']['test']} held-out digits, training pool {rep['sizes']['pool']} originals (larger sets: "
        "shifted/rotated copies). Solver: the demo's first-order solve: "
        f"{s['method']}, curvature {s['curvature']}, damping {_damping(s)}, tol {s['tol']}, max_steps "
        f"{s['max_steps']}, batch {s['batch_size']}, stationarity check {s['stationarity_check']}. Retraining = "
        f"the demo's recipe ({rep['config']['demo']['epochs']} epochs, batch {rep['config']['demo']['batch_size']}),"
        " timed in this run. Times: wall seconds of training / `engine.solve` with the model loaded; memory: rise "
        "of the peak resident set over the block's start (MiB, VmHWM reset per block).", "",
        "Recovery = (unlearned − corrupted) / (retrained − corrupted) of the edited-sample loss, edited-sample "
        "accuracy and test accuracy (1 = as retrained; n/a = no gap). Edited samples: RC/QM the corrected pairs, "
        "IR the removed pairs (forget set; a higher loss is the goal).", ""]
    prep_rows = rep.get("preparations", {})
    # default point
    lines += [f"## Default point (n = {c['default_n']}, {100 * c['default_rate']:.0f}% corrupted, every corrupted "
              "pair edited)", ""]
    for key in rep["sweeps"].get("default", []):
        p = _pt(rep, key)
        lines += [f"### {p['task'].upper()}: {S.TASK_NAMES[p['task']]} ({p['k']} edits)", "",
                  "| adapter | test acc | edited acc | edited loss | rec. loss | rec. acc | rec. test acc | seconds | "
                  "× faster than retrain | steps | residual | peak RSS rise MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        r = p["retrained"]
        lines.append(_row("retrained", r["eval"], None, f"{_f(r['seconds'])} | 1 | | | "
                                                        f"{r['memory']['rise_mib']:.0f} |"))
        lines.append(_row("corrupted", p["corrupted"]["eval"], None, "| | | | |"))
        for role in ROLES:
            if role in p["answers"]:
                a = p["answers"][role]
                lines.append(_row(role, a["eval"], a["recovery"], _ans_cols(a)))
        lines += ["", "λ used: " + ", ".join(f"{role} {_lam(a)}" for role, a in p["answers"].items()), ""]
    if rep["sweeps"].get("requests"):
        lines += [f"### Smaller RC requests at n = {c['default_n']} (the default point's preparation, prepared "
                  "one-step answer; retrained = the same data with only those k answers corrected)", "",
                  "| k | retrain s | prepared s | × faster than retrain | rec. loss | rec. acc | rec. test acc |",
                  "|---|---|---|---|---|---|---|"]
        for key in rep["sweeps"]["requests"]:
            p = _pt(rep, key)
            a = p["answers"]["prepared"]
            lines.append(f"| {p['k']} | {_f(p['retrained']['seconds'])} | {_f(a['seconds'])} | {_f(a['speedup'], 1)} "
                         f"| {_f(a['recovery']['edited_loss'])} | {_f(a['recovery']['edited_acc'])} | "
                         f"{_f(a['recovery']['test_acc'])} |")
        lines.append("")
    if prep_rows:
        lines += ["Preparations (library defaults: `lowrank`, Lanczos over the curvature set; reused by every "
                  "later request against the same adapter):", "",
                  "| adapter (train set, n, rate, curvature sub-sample) | seconds | × one retraining | products | "
                  "sample-products | peak RSS rise MiB |", "|---|---|---|---|---|---|"]
        for key, q in prep_rows.items():
            lines.append(f"| {key} | {_f(q['seconds'])} | {_f(q['per_retrain'])} | {q['products']} | "
                         f"{q['product_samples']} | {q['memory']['rise_mib']:.0f} |")
        lines.append("")
    # corruption sweep
    if rep["sweeps"].get("corruption"):
        lines += [f"## Corruption rate (n = {c['default_n']}, cold solves, every corrupted pair edited)", "",
                  "| task | rate | edits | retrain s | cold s | × | steps | corrupted → retrained → cold test acc | "
                  "rec. loss | rec. acc | rec. test acc |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for key in sorted(rep["sweeps"]["corruption"], key=lambda k: (k.split("-")[0], _pt(rep, k)["rate"])):
            p = _pt(rep, key)
            a, rec = p["answers"]["cold"], p["answers"]["cold"]["recovery"]
            accs = " → ".join(f"{100 * x['test_acc']:.1f}%" for x in (p["corrupted"]["eval"],
                                                                      p["retrained"]["eval"], a["eval"]))
            lines.append(f"| {p['task'].upper()} | {100 * p['rate']:.0f}% | {p['k']} | {_f(p['retrained']['seconds'])}"
                         f" | {_f(a['seconds'])} | {_f(a['speedup'])} | {a['steps']} | {accs} | "
                         f"{_f(rec['edited_loss'])} | {_f(rec['edited_acc'])} | {_f(rec['test_acc'])} |")
        lines.append("")
    # size sweep
    if rep["sweeps"].get("size"):
        msub = c["curvature_samples"]
        lines += [f"## Training-set size (RC, {100 * c['default_rate']:.0f}% corrupted, {round(c['default_rate'] * c['default_n'])}"
                  f" corrected per request; above n = {c['default_n']} products over a fixed curvature sub-sample "
                  f"of {msub} samples, `SolverConfig.curvature_samples`, also for the preparation)", "",
                  "| n | retrain s (corrupted adapter's training s) | retrain RSS rise MiB | cold s (steps; s/step) | "
                  "cold RSS rise MiB | full-data cold s (steps) | prepare s | pcg s (steps) | prepared s | × retrain: "
                  "cold / pcg / prepared | rec. loss: cold / prepared | rec. acc: cold / prepared |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for key in rep["sweeps"]["size"]:
            p = _pt(rep, key)
            A = p["answers"]
            full = _full_cold(rep, p)
            prep = A["pcg"].get("preparation", {})
            lines.append(
                f"| {p['n']} | {_f(p['retrained']['seconds'])} ({_f(p['corrupted']['train_s'])}) | "
                f"{p['retrained']['memory']['rise_mib']:.0f} | {_f(A['cold']['seconds'])} ({A['cold']['steps']}; "
                f"{_f(A['cold']['seconds'] / A['cold']['steps'])}) | {A['cold']['memory']['rise_mib']:.0f} | "
                + (f"{_f(full['seconds'])} ({full['steps']})" if full else _full_estimate(rep, p)) +
                f" | {_f(prep.get('seconds'))} | {_f(A['pcg']['seconds'])} ({A['pcg']['steps']}) | "
                f"{_f(A['prepared']['seconds'])} | {_f(A['cold']['speedup'])} / {_f(A['pcg']['speedup'])} / "
                f"{_f(A['prepared']['speedup'], 1)} | {_f(A['cold']['recovery']['edited_loss'])} / "
                f"{_f(A['prepared']['recovery']['edited_loss'])} | {_f(A['cold']['recovery']['edited_acc'])} / "
                f"{_f(A['prepared']['recovery']['edited_acc'])} |")
    if len(rep["sweeps"].get("size", [])) > 1:
        fit = _size_fit(rep)
        lines += ["", "Full-data cold solves are measured where the column gives steps; otherwise estimated (their "
                  "products run over all n samples, so their cost grows like retraining's and never catches up). "
                  f"Retraining: {1000 * fit['retrain_s_per_sample']:.2f} ms per training sample (least squares "
                  f"through 0; ×{fit['retrain_growth']:.1f} time for ×{fit['size_growth']:.0f} samples). Cold solve: "
                  f"{_f(fit['cold_s_mean'])} s on average, max/min {fit['cold_s_spread']:.2f} over the sizes: a cold "
                  f"solve beats retraining from n ≈ {fit['crossover_n']:.0f} on.", ""]
    # edits sweep
    if rep["sweeps"].get("edits"):
        lines += [f"## Number of edits (RC, n = {c['edits_n']}, {100 * c['default_rate']:.0f}% corrupted; curvature "
                  f"sub-sample {c['curvature_samples'] if c['edits_n'] > c['default_n'] else 'none'}; one preparation "
                  "for every request)", "",
                  "| k | retrain s | cold s (steps) | pcg s (steps) | prepared s | × retrain: cold / pcg / prepared | "
                  "rec. loss: cold / pcg / prepared | rec. acc: cold / prepared | rec. test acc: cold |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for key in rep["sweeps"]["edits"]:
            p = _pt(rep, key)
            A = p["answers"]
            lines.append(
                f"| {p['k']} | {_f(p['retrained']['seconds'])} | {_f(A['cold']['seconds'])} ({A['cold']['steps']}) | "
                f"{_f(A['pcg']['seconds'])} ({A['pcg']['steps']}) | {_f(A['prepared']['seconds'])} | "
                f"{_f(A['cold']['speedup'])} / {_f(A['pcg']['speedup'])} / {_f(A['prepared']['speedup'], 1)} | "
                f"{_f(A['cold']['recovery']['edited_loss'])} / {_f(A['pcg']['recovery']['edited_loss'])} / "
                f"{_f(A['prepared']['recovery']['edited_loss'])} | {_f(A['cold']['recovery']['edited_acc'])} / "
                f"{_f(A['prepared']['recovery']['edited_acc'])} | {_f(A['cold']['recovery']['test_acc'])} |")
        lines.append("")
    if rep.get("skipped"):
        lines += ["Skipped (the run passed `--budget-min`): " + "; ".join(
            f"{q['sweep']} {q['task'].upper()} n={q['n']} rate={q['rate']:g} k={q['k'] or 'all'} "
            f"({', '.join(q['answers'])})" for q in rep["skipped"]) + ".", ""]
    b = rep.get("bars") or {}
    ok = lambda x: "**met**" if x else "**missed**"  # noqa: E731
    lines += ["## Bars", ""]
    if "recovery_rc" in b:
        lines.append(f"- Recovery ≥ 0.8 for RC and QM (edited-sample loss, cold solve, default point): RC "
                     f"{_f(b['recovery_rc']['edited_loss'])} {ok(b['recovery_rc']['met'])}, QM "
                     f"{_f(b['recovery_qm']['edited_loss'])} {ok(b['recovery_qm']['met'])} (edited accuracy: RC "
                     f"{_f(b['recovery_rc']['edited_acc'])}, QM {_f(b['recovery_qm']['edited_acc'])}).")
    if "flat_cold" in b:
        f = b["flat_cold"]
        lines.append(f"- Cold solve flat in n at fixed tolerance (curvature sub-sample; max/min ≤ 1.5) while "
                     f"retraining grows linearly: max/min {f['cold_s_spread']:.2f} {ok(f['met'])}; retraining "
                     f"×{f['retrain_growth']:.1f} for ×{f['size_growth']:.0f} samples.")
    if "prepared_50x" in b:
        q = b["prepared_50x"]
        lines.append("- With a preparation ≥ 50× faster than retraining at the default size: prepared one-step "
                     + ", ".join(f"{t.upper()} {x:.0f}×" for t, x in q["prepared"].items()) + f" {ok(q['met'])}; "
                     "exact preconditioned CG " + ", ".join(f"{t.upper()} {x:.2f}×" for t, x in q["pcg"].items())
                     + " (every corrupted pair in one request)"
                     + ("; RC requests of " + ", ".join(f"{k} edits {x:.0f}×" for k, x in q["requests"].items())
                        + f" (prepared one-step) {ok(q['requests_met'])}" if q.get("requests") else "") + ".")
    lines.append("")
    return "\n".join(lines)


def plot(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    pts = [_pt(rep, k) for k in rep["sweeps"].get("size", [])]
    ns = [p["n"] for p in pts]
    ax.loglog(ns, [p["retrained"]["seconds"] for p in pts], "o-", label="retrain from scratch")
    for role, style in (("cold", "s-"), ("pcg", "^-"), ("prepared", "v-")):
        ax.loglog(ns, [p["answers"][role]["seconds"] for p in pts], style,
                  label=f"{role} (curvature sub-sample {rep['config']['curvature_samples']})")
    full = [(p["n"], _full_cold(rep, p)["seconds"]) for p in pts if _full_cold(rep, p)]
    if full:
        ax.loglog(*zip(*full), "kx--", label="cold, full-data curvature")
    ax.set_xlabel("training-set size n")
    ax.set_ylabel("wall seconds (one core)")
    ax.set_title(f"time vs n (RC, {pts[0]['k'] if pts else '?'} edits)")
    ax.legend(fontsize=7)
    ax = axes[1]
    for task, mk in (("rc", "o-"), ("qm", "s-"), ("ir", "^-")):
        ps = sorted((_pt(rep, k) for k in rep["sweeps"].get("corruption", []) if k.startswith(task)),
                    key=lambda p: p["rate"])
        ax.plot([100 * p["rate"] for p in ps], [p["answers"]["cold"]["recovery"]["edited_loss"] or float("nan")
                                                 for p in ps], mk, label=task.upper())
    ax.axhline(0.8, color="grey", ls=":", label="bar 0.8 (RC, QM)")
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_xlabel("corruption rate (%)")
    ax.set_ylabel("recovery of the edited-sample loss gap")
    ax.set_title(f"recovery vs corruption (cold, n={rep['config']['default_n']})")
    ax.legend(fontsize=7)
    ax = axes[2]
    ps = [_pt(rep, k) for k in rep["sweeps"].get("edits", [])]
    ks = [p["k"] for p in ps]
    ax.loglog(ks, [p["retrained"]["seconds"] for p in ps], "o-", label="retrain")
    for role, style in (("cold", "s-"), ("pcg", "^-"), ("prepared", "v-")):
        ax.loglog(ks, [p["answers"][role]["seconds"] for p in ps], style, label=role)
    ax.set_xlabel("edits per request k")
    ax.set_ylabel("wall seconds")
    ax.set_title(f"time vs edits (RC, n={rep['config']['edits_n']})")
    ax.legend(fontsize=7)
    m, v, c = rep["machine"], rep["versions"], rep["config"]
    fig.suptitle(f"{m['cpu']} ({m['cores']} cores shared, 1 thread), torch {v['torch']}, transformers "
                 f"{v['transformers']}, peft {v['peft']}, seed {c['seed']}; base {rep['sizes']['pretrain']} digits, "
                 f"test {rep['sizes']['test']}, n = {c['sizes']}, default n = {c['default_n']} at "
                 f"{100 * c['default_rate']:.0f}% corrupted, edits at n = {c['edits_n']}; "
                 f"solver {rep['solver']['method']}/{rep['solver']['curvature']} λ={_damping(rep['solver'])} "
                 f"tol={rep['solver']['tol']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).parent), help=f"folder for {NAME}.json/.md/.png")
    p.add_argument("--work", default=None, help="scratch folder (base and adapters; default: a new temp folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 1 epoch, ≤ 8 solver steps (CI)")
    p.add_argument("--n-pretrain", type=int, default=500)
    p.add_argument("--n-test", type=int, default=400)
    p.add_argument("--pool", type=int, default=None, help="use only this many original digits for training sets")
    p.add_argument("--default-n", type=int, default=500)
    p.add_argument("--default-rate", type=float, default=0.2)
    p.add_argument("--rates", default="0.05,0.1,0.2,0.3")
    p.add_argument("--corruption-extra", default="ir",
                   help="scenarios whose corruption points run after the others (first to be skipped over budget)")
    p.add_argument("--sizes", default="500,1000,2500,16000")
    p.add_argument("--edits", default="1,5,20,100,500")
    p.add_argument("--requests", default="1,5,20",
                   help="edits per request answered with the default point's preparation (RC, default size)")
    p.add_argument("--edits-n", type=int, default=2500, help="training-set size of the edits sweep")
    p.add_argument("--curvature-samples", type=int, default=256,
                   help="fixed curvature sub-sample of the size and edits sweeps (products and preparation)")
    p.add_argument("--full-cold-max", type=int, default=2000,
                   help="largest n of the size sweep that also gets a full-data cold solve (run last)")
    p.add_argument("--budget-min", type=float, default=45.0,
                   help="skip the points after the default ones once the run has taken this many minutes")
    p.add_argument("--resume", default=None, metavar="JSON",
                   help="keep the points of an earlier run's (partial) result and measure only the missing ones")
    p.add_argument("--report-only", default=None, metavar="JSON",
                   help="only render .md/.png from a (partial) result file")
    p.add_argument("--damping", type=lambda x: x if x == "auto" else float(x), default=None,
                   help="override the demo's damping (a number or 'auto')")
    p.add_argument("--max-steps", type=int, default=None, help="override the demo's max_steps")
    p.add_argument("--rank", type=int, default=None, help="override the preparation's Lanczos steps")
    p.add_argument("--sweeps", default="default,corruption,size,edits", help="which sweeps to run")
    args = p.parse_args(argv)
    if args.smoke:
        args.n_pretrain, args.n_test, args.pool = 60, 30, 16
        args.default_n, args.rates, args.sizes, args.edits, args.edits_n = 16, "0.125,0.25", "16,40", "1,4", 40
        args.requests = "1,2"
        args.curvature_samples, args.full_cold_max = 12, 40
        args.n_test, args.max_steps, args.rank = 20, args.max_steps or 3, args.rank or 4
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        report = json.loads(Path(args.report_only).read_text())
        report.setdefault("bars", bars(report))
        write_report(report, out, final=False)
        return 0
    report = run(args)
    write_report(report, out)
    _log(f"wrote {out / NAME}.json/.md/.png")
    return 0


def write_report(report: dict, out: Path, final: bool = True) -> None:
    """Write the JSON (final runs), Markdown and PNG of ``report`` to ``out`` and print the tables."""
    out.mkdir(parents=True, exist_ok=True)
    if final:
        (out / f"{NAME}.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    report = json.loads(json.dumps(report, default=float))
    md = markdown(report)
    (out / f"{NAME}.md").write_text(md + "\n")
    plot(report, out / f"{NAME}.png")
    if final:
        (out / f"{NAME}.partial.json").unlink(missing_ok=True)
    print(md)


if __name__ == "__main__":
    sys.exit(main())
