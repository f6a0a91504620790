"""Cases run identically on one process (in pytest) and on two (under torchrun, by tests/test_distributed.py).

``python tests/dist_worker.py MODEL_DIR OUT_DIR`` under torchrun runs every case and writes ``OUT_DIR/rank{r}.pt``:
a dict of case name → result (δ of a solve, a product, or an error message). Each case builds its model from the
same seed, so the only difference between one and two processes is how the work is split.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from lora_points import perturb_lora_b  # tests/ is on sys.path: the script's folder, or pytest's

torch.set_num_threads(1)

SOLVE_CASES = ("hessian", "fd-hessian", "ggn", "ggn-stochastic")
ZERO3_CASES = ("zero3/fd-hessian", "zero3/ggn", "zero3/fisher", "zero3/ggn-solve", "zero3/method-kl")
METHOD_CASES = ("method-finetune", "method-ga", "method-npo", "method-kl")


def _bundle(model_dir: str):
    from mmerase.models import LoadOptions, LoraSettings, load_model

    b = load_model(model_dir, lora=LoraSettings(r=4, train_projector=True),
                   options=LoadOptions(dtype="float64", device="cpu"))
    perturb_lora_b(b.model)
    return b


def _samples(text: bool):
    from mmerase.data import Sample, digit_samples

    samples = digit_samples(range(5))
    if text:  # data parallel copes with mixed batches; ZeRO-3 needs every rank to run the same modules
        samples += [Sample(f"t{i}", [{"from": "human", "value": q}, {"from": "gpt", "value": a}])
                    for i, (q, a) in enumerate([("Say hi", "hi"), ("Count to three", "one two three")])]
    else:
        samples += digit_samples(range(5, 7))
    return samples  # 7 samples: with batch_size 3 the last chunk leaves rank 1 without a sample


def _edits(samples):
    from mmerase.data import modify_sample
    from mmerase.influence import Edit

    return [Edit(old=samples[1], new=modify_sample(samples[1], response="no")), Edit(old=samples[5])]


def _vec(params, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


def _method(name: str, model, bundle, samples) -> list:
    """δ of a few steps of an unlearning method (batches of 3: uneven shards, padding passes on the short rank)."""
    from mmerase.influence import InfluenceEngine
    from mmerase.methods import CONFIGS, unlearn

    engine = InfluenceEngine(model, bundle.loss_fn, samples, collate_fn=bundle.collate)
    extra = {"npo_retain": True} if name == "npo" else {}
    res = unlearn(engine, None, _edits(samples), name, CONFIGS[name](lr=1e-2, batch_size=3, **extra), budget=20)
    return [res.delta[n] for n in engine.names]


def run_cases(model_dir: str, zero3: bool) -> dict:
    """All data-parallel solve cases, then (when ``zero3``) the ZeRO-3 cases; name → tensors or error text."""
    from mmerase.influence import InfluenceEngine, SolverConfig, make_curvature

    out: dict = {}
    b = _bundle(model_dir)
    samples = _samples(text=True)
    engine = InfluenceEngine(b.model, b.loss_fn, samples, collate_fn=b.collate)
    for case in SOLVE_CASES:
        curvature = case.partition("-stochastic")[0]
        cfg = SolverConfig(method="stochastic" if case.endswith("-stochastic") else "cg", curvature=curvature,
                           damping=1e4, tol=1e-12, max_steps=6, batch_size=3, eval_every=3, progress=False)
        res = engine.solve(_edits(samples), cfg)
        out[case] = [res.delta[n] for n in engine.names]
    fisher = make_curvature("fisher")
    out["fisher-product"] = engine.product(_vec(engine.params), fisher, batch_size=3)
    for case in METHOD_CASES:
        b = _bundle(model_dir)
        out[case] = _method(case.partition("-")[2], b.model, b, samples)
    if not zero3:
        return out

    from mmerase.distributed import zero3_wrap
    from mmerase.influence.distributed import world

    b = _bundle(model_dir)
    samples = _samples(text=False)
    model = b.model
    if world()[1] > 1:
        model = zero3_wrap(b.model, {"zero_optimization": {"stage": 3}}).module
    engine = InfluenceEngine(model, b.loss_fn, samples, collate_fn=b.collate)
    v = _vec(engine.params)
    for name, curv in (("fd-hessian", make_curvature("fd-hessian")), ("ggn", make_curvature("ggn", ggn_jvp="fd")),
                       ("fisher", fisher)):
        out[f"zero3/{name}"] = engine.product(v, curv, batch_size=3)
    res = engine.solve(_edits(samples), SolverConfig(method="cg", curvature="ggn", ggn_jvp="fd", damping=10.0,
                                                     tol=1e-12, max_steps=4, batch_size=3, progress=False))
    out["zero3/ggn-solve"] = [res.delta[n] for n in engine.names]
    out["zero3/method-kl"] = _method("kl", model, b, samples)
    try:
        engine.product(v, "hessian", batch_size=3)
        out["zero3/hessian-error"] = None
    except Exception as e:  # the clear error, raised before any pass (no rank is left waiting)
        out["zero3/hessian-error"] = f"{type(e).__name__}: {e}"
    return out


def main() -> None:
    from mmerase.distributed import init_from_env, shutdown

    model_dir, out_dir = sys.argv[1], Path(sys.argv[2])
    info = init_from_env()
    try:
        import deepspeed  # noqa: F401
        zero3 = True
    except ImportError:
        zero3 = False
    results = run_cases(model_dir, zero3)
    torch.save({"world_size": info.world_size, "zero3": zero3, "results": results}, out_dir / f"rank{info.rank}.pt")
    shutdown(info)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
