"""Data-parallel solves and DeepSpeed ZeRO-3 on 2 CPU processes (gloo, torchrun) against one process, the CLI under
torchrun, lockstep sharding, and the errors a sharded or fused-attention model gives for exact products (issue 8)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lora_points import perturb_lora_b
from safetensors.torch import load_file

from mmerase.influence import InfluenceError
from mmerase.influence.distributed import check_product_support, shard

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import dist_worker  # noqa: E402

TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_start(args: list[str], cwd: Path, nproc: int = 2) -> subprocess.Popen:
    """Start ``torchrun --nproc_per_node=nproc ARGS`` (a free port; one thread per process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> str:
    """Wait (bounded) for a torchrun started by :func:`_torchrun_start`; its stdout, or a failure with its output."""
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s:\n{out[-3000:]}{err[-3000:]}")
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return out


def _rel(a, b) -> float:
    num = sum(float((x - y).norm() ** 2) for x, y in zip(a, b)) ** 0.5
    return num / sum(float(y.norm() ** 2) for y in b) ** 0.5


# ---- sharding rules (pure) ----------------------------------------------------------------------------------

def test_shard_pads_ranks_into_lockstep():
    # per-batch backends: a rank without samples runs one padding pass
    assert shard([0, 1, 2], 0, 2) == [([0, 2], True)]
    assert shard([0, 1, 2], 1, 2) == [([1], True)]
    assert shard([6], 1, 2) == [([6], False)]
    assert shard([6], 0, 2) == [([6], True)]
    # per-sample backends (Fisher): the short rank pads up to the longest share
    assert shard([0, 1, 2], 1, 2, per_sample=True) == [([1], True), ([0], False)]
    assert shard([0, 1, 2, 3, 4], 2, 4, per_sample=True) == [([2], True), ([0], False)]
    assert shard([5], 1, 2, per_sample=True) == [([5], False)]
    assert shard([0, 1, 2], 0, 1) == [([0, 1, 2], True)]
    # every sample is live on exactly one rank
    for n, w in ((7, 3), (2, 4), (9, 2)):
        live = sorted(i for r in range(w) for part, ok in shard(range(n), r, w) if ok for i in part)
        assert live == list(range(n))


# ---- two processes against one --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_process_runs(tiny_llava_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    proc = _torchrun_start([str(HERE / "dist_worker.py"), str(tiny_llava_dir), str(out)], cwd=out)
    import deepspeed  # noqa: F401  (in the test extra: ZeRO-3 cases always run)

    zero3 = True
    reference = dist_worker.run_cases(str(tiny_llava_dir), zero3=zero3)
    _finish(proc)
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["zero3"] == zero3
    return ranks, reference


@pytest.mark.parametrize("case", dist_worker.SOLVE_CASES + ("fisher-product",))
def test_two_process_solve_equals_one_process(two_process_runs, case):
    """δ of a CG solve (exact Hessian, FD Hessian, GGN), of the stochastic solver's mini-batch Adam, and a Fisher
    product: 2 ranks with uneven shards (7 samples, batch 3, images and text) give the 1-process result to float64
    rounding, and both ranks hold bit-identical results."""
    ranks, reference = two_process_runs
    assert ranks[0]["world_size"] == 2
    got, other = ranks[0]["results"][case], ranks[1]["results"][case]
    assert _rel(got, reference[case]) < 1e-6
    assert all(torch.equal(a, b) for a, b in zip(got, other))
    assert sum(float(t.norm()) for t in got) > 0


@pytest.mark.parametrize("case", dist_worker.METHOD_CASES)
def test_two_process_unlearning_methods_equal_one_process(two_process_runs, case):
    """The gradient methods through the one training loop: each rank takes its share of every batch (images and
    text mixed, uneven shards, zero-weight padding on the short rank) and the gradients are all-reduced, so a few
    AdamW steps on 2 ranks give the 1-process δ to float64 rounding, identical on both ranks."""
    ranks, reference = two_process_runs
    got, other = ranks[0]["results"][case], ranks[1]["results"][case]
    assert _rel(got, reference[case]) < 1e-6
    assert all(torch.equal(a, b) for a, b in zip(got, other))
    assert sum(float(t.norm()) for t in got) > 0


@pytest.mark.parametrize("case", dist_worker.ZERO3_CASES)
def test_zero3_first_order_products_equal_one_process(two_process_runs, case):
    """ZeRO-3 partitions the frozen base over 2 ranks; FD-Hessian, GGN (fd J·v) and Fisher products and a GGN solve
    equal the unsharded single-process ones (float64; the FD step sees the same ‖θ‖)."""
    ranks, reference = two_process_runs
    if not ranks[0]["zero3"]:
        pytest.skip("deepspeed is not installed (pip install 'mmerase[distributed]')")
    assert _rel(ranks[0]["results"][case], reference[case]) < 1e-9
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["results"][case], ranks[1]["results"][case]))


def test_zero3_exact_hessian_is_a_clear_error(two_process_runs):
    ranks, _ = two_process_runs
    if not ranks[0]["zero3"]:
        pytest.skip("deepspeed is not installed (pip install 'mmerase[distributed]')")
    for r in ranks:
        msg = r["results"]["zero3/hessian-error"]
        assert msg is not None and msg.startswith("InfluenceError: curvature 'hessian' needs a second backward")
        assert "mat2 must be a matrix" in msg and "'fd-hessian', 'ggn' with ggn_jvp='fd', or 'fisher'" in msg


# ---- the CLI under torchrun --------------------------------------------------------------------------------

def test_cli_under_torchrun_writes_once_and_matches_one_process(tiny_llama_dir, tmp_path, capsys):
    from mmerase.cli import main
    from mmerase.models import LoadOptions, LoraSettings, load_model

    b = load_model(tiny_llama_dir, lora=LoraSettings(r=4), options=LoadOptions(dtype="float64", device="cpu"))
    perturb_lora_b(b.model)
    adapter = b.save_adapter(tmp_path / "adapter")
    rows = [{"id": f"q{i}", "conversations": [{"from": "human", "value": f"Spell {i}"},
                                               {"from": "gpt", "value": w}]}
            for i, w in enumerate(["zero", "one", "two", "three", "four"])]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    edits = tmp_path / "edits.jsonl"
    edits.write_text(json.dumps({"op": "remove", "id": "q1"}) + "\n"
                     + json.dumps({"op": "correct", "id": "q2", "response": "TWO"}) + "\n")
    args = ["unlearn", "--base", str(tiny_llama_dir), "--adapter", str(adapter), "--data", str(data),
            "--edits", str(edits), "--dtype", "float64", "--device", "cpu", "--curvature", "ggn",
            "--damping", "100", "--tol", "1e-10", "--max-steps", "40", "--batch-size", "2", "--no-progress"]
    runs = tmp_path / "runs"
    runs.mkdir()
    proc = _torchrun_start(["-m", "mmerase", *args, "--out", str(runs / "two")], cwd=tmp_path)
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    stdout = _finish(proc)
    assert [p.name for p in runs.iterdir()] == ["two"]  # one output, no partial folder from another rank
    assert stdout.count("unlearned adapter written to") == 1  # rank 0 alone reports
    one = load_file(tmp_path / "one" / "adapter_model.safetensors")
    two = load_file(runs / "two" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    assert _rel([two[k] for k in one], [one[k] for k in one]) < 1e-6
    base = load_file(adapter / "adapter_model.safetensors")
    assert _rel([one[k] for k in one], [base[k] for k in one]) > 1e-8  # the solve moved the adapter
    rec = json.loads((runs / "two" / "mmerase_record.json").read_text())
    assert rec["distributed"] == {"world_size": 2, "zero3": None}
    assert rec["result"]["converged"]
    mem = rec["memory"]
    assert {"train_step", "product", "solve"} <= set(mem)
    assert all(mem[k]["peak_bytes"] > 0 and mem[k]["kind"] == "cpu_rss" for k in ("train_step", "product", "solve"))
    import deepspeed  # noqa: F401  (in the test extra: its absence is a failure, not a pass)

    # ZeRO-3 through the CLI: ggn's J·v switches to forward differences by itself (≈1e-10 from autograd's)
    _finish(_torchrun_start(["-m", "mmerase", *args, "--out", str(runs / "zero3"), "--deepspeed",
                             str(HERE.parent / "configs" / "ds_zero3.json")], cwd=tmp_path))
    assert sorted(p.name for p in runs.iterdir()) == ["two", "zero3"]
    z3 = load_file(runs / "zero3" / "adapter_model.safetensors")
    assert _rel([z3[k] for k in one], [one[k] for k in one]) < 1e-6
    rec = json.loads((runs / "zero3" / "mmerase_record.json").read_text())
    assert rec["solver"]["ggn_jvp"] == "fd" and rec["distributed"]["zero3"]["zero_optimization"]["stage"] == 3


# ---- what a model cannot do ----------------------------------------------------------------------------------

class _Cfg:
    def __init__(self, attn: str, **sub) -> None:
        self._attn_implementation = attn
        self.__dict__.update(sub)


def test_exact_products_refuse_fused_attention():
    from mmerase.influence import make_curvature

    model = torch.nn.Linear(2, 2)
    model.config = _Cfg("eager", text_config=_Cfg("sdpa"))
    with pytest.raises(InfluenceError, match=r"attn_implementation='sdpa', whose kernel has none.*'eager'"):
        check_product_support(model, make_curvature("hessian"))
    with pytest.raises(InfluenceError, match=r"curvature 'ggn' with ggn_jvp='autograd'"):
        check_product_support(model, make_curvature("ggn"))
    for ok in ("fd-hessian", "fisher"):
        check_product_support(model, make_curvature(ok))
    check_product_support(model, make_curvature("ggn", ggn_jvp="fd"))
    model.config = _Cfg("eager", vision_config=_Cfg("mmerase_eager"))
    check_product_support(model, make_curvature("hessian"))


def test_deepspeed_config_errors_are_actionable(tmp_path):
    from mmerase.distributed import DistributedSetupError, read_deepspeed_config

    with pytest.raises(DistributedSetupError, match=r"stage=2: mmerase uses DeepSpeed only to shard the frozen base"):
        read_deepspeed_config({"zero_optimization": {"stage": 2}})
    with pytest.raises(DistributedSetupError, match=r"enables bf16.*--dtype"):
        read_deepspeed_config({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}})
    with pytest.raises(DistributedSetupError, match=r"not found"):
        read_deepspeed_config(tmp_path / "missing.json")
    shipped = read_deepspeed_config(HERE.parent / "configs" / "ds_zero3.json")
    assert shipped["zero_optimization"]["stage"] == 3 and shipped["train_micro_batch_size_per_gpu"] == 1


def test_launcher_environment_without_rendezvous_is_an_error(monkeypatch):
    from mmerase.distributed import DistributedSetupError, init_from_env

    monkeypatch.setenv("WORLD_SIZE", "2")
    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(DistributedSetupError, match=r"RANK, MASTER_ADDR, MASTER_PORT not set: start mmerase with"):
        init_from_env()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_from_env().world_size == 1
