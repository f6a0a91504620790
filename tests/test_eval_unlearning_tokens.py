"""Membership-inference scores (loss, Min-K%, Min-K%++, zlib), KL(retrained ‖ adapter) and forget quality on real
tiny models, against references computed independently: each adapter loaded on its own, one sample at a time, the
float64 logits turned into log-probabilities, vocabulary moments and KL divergences with explicit Python loops;
AUCs from ``sklearn.metrics.roc_auc_score`` and the KS p-value from ``scipy.stats.ks_2samp`` on those references."""

from __future__ import annotations

import json
import math
import zlib

import pytest
import torch
from lora_points import perturb_lora_b
from scipy.stats import ks_2samp
from sklearn.metrics import roc_auc_score

from mmerase.eval.mia import sample_mia_scores
from mmerase.eval.model_scores import score_models
from mmerase.eval.unlearning import evaluate_unlearning
from mmerase.data import Sample, digit_samples, save_dataset
from mmerase.models import LoadOptions, LoraSettings, load_model

F64 = LoadOptions(dtype="float64", device="cpu")
K = 0.2
ANSWERS = ["ok", "seven", "hello world", "the quick brown fox", "no", "three two", "a b c d e f", "zero"]


def _sample(sid, question, answer):
    return Sample(sid, [{"from": "human", "value": question}, {"from": "gpt", "value": answer}])


def _make_adapters(base, root, lora, seeds):
    paths = {}
    for name, seed in seeds.items():
        bundle = load_model(base, lora=lora, options=F64)
        perturb_lora_b(bundle.model, seed=seed, scale=0.3)
        paths[name] = bundle.save_adapter(root / name)
    return paths


@pytest.fixture(scope="module")
def llama_case(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens-llama")
    # answer lengths 3..20 tokens (bytes + EOS): k·T is fractional for most, so int() vs ceil() would differ
    forget = [_sample(f"f{i}", f"Say {i}", a) for i, a in enumerate(ANSWERS[:4])]
    test = [_sample(f"t{i}", f"Tell {i}", a) for i, a in enumerate(ANSWERS[4:])]
    splits = {"forget": save_dataset(forget, root / "forget.json"), "test": save_dataset(test, root / "test.json")}
    adapters = _make_adapters(tiny_llama_dir, root, LoraSettings(r=4), {"corrupted": 1, "retrained": 2,
                                                                         "unlearned": 3})
    records = score_models(str(tiny_llama_dir), adapters, splits, options=F64, retrained="retrained", generate=False)
    return tiny_llama_dir, adapters, {"forget": forget, "test": test}, records


# ---- the reference: one sample at a time, explicit loops over the float64 logits ------------------------------------
def _log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - lse for x in row]


def _reference_rows(bundle, sample):
    """Per answer token: (log p of the token, log p over the vocabulary)."""
    batch = bundle.collate([sample])
    with torch.no_grad():
        logits = bundle.loss_fn.outputs(bundle.model, batch)[0].tolist()
    labels = batch["labels"][0].tolist()
    return [(_log_softmax(logits[t])[labels[t + 1]], _log_softmax(logits[t]))
            for t in range(len(labels) - 1) if labels[t + 1] != -100]


def _reference_scores(rows, answer):
    lps = [lp for lp, _ in rows]
    mus = [sum(math.exp(v) * v for v in row) for _, row in rows]
    sds = [math.sqrt(sum(math.exp(v) * (v - mu) ** 2 for v in row)) for (_, row), mu in zip(rows, mus)]
    n = max(1, int(K * len(lps)))
    z = [(lp - mu) / sd for lp, mu, sd in zip(lps, mus, sds)]
    loss = -sum(lps) / len(lps)
    return {"logprobs": lps, "mus": mus, "sds": sds, "loss": loss, "min_k": sum(sorted(lps)[:n]) / n,
            "min_k_pp": sum(sorted(z)[:n]) / n, "zlib": -loss / len(zlib.compress(answer.encode("utf-8")))}


def _reference_kl(ref_rows, rows):
    per_token = [sum(math.exp(a) * (a - b) for a, b in zip(r_row, q_row)) for (_, r_row), (_, q_row) in
                 zip(ref_rows, rows)]
    return sum(per_token) / len(per_token)


@pytest.fixture(scope="module")
def llama_reference(llama_case):
    base, adapters, data, _ = llama_case
    rows = {}
    for name, path in adapters.items():
        bundle = load_model(base, adapter=path, options=F64)
        rows[name] = {(split, s.id): (_reference_rows(bundle, s), s.response) for split, ss in data.items()
                      for s in ss}
    scores = {name: {key: _reference_scores(r, ans) for key, (r, ans) in per.items()} for name, per in rows.items()}
    kl = {name: {key: _reference_kl(rows["retrained"][key][0], r) for key, (r, _) in per.items()}
          for name, per in rows.items()}
    return scores, kl


def test_token_statistics_and_kl_equal_the_float64_reference(llama_case, llama_reference):
    _, _, _, records = llama_case
    scores, kl = llama_reference
    for name, recs in records.items():
        assert len(recs) == 8
        for r in recs:
            ref = scores[name][(r["split"], r["id"])]
            assert len(r["token_logprobs"]) == len(ref["logprobs"]) == len(r["reference"].encode()) + 1  # + EOS
            assert r["token_logprobs"] == pytest.approx(ref["logprobs"], rel=1e-9, abs=1e-12)
            assert r["token_vocab_mean"] == pytest.approx(ref["mus"], rel=1e-9, abs=1e-12)
            assert r["token_vocab_std"] == pytest.approx(ref["sds"], rel=1e-9, abs=1e-12)
            assert r["loss"] == pytest.approx(ref["loss"], rel=1e-9)
            assert r["kl_retrained"] == pytest.approx(kl[name][(r["split"], r["id"])], rel=1e-9, abs=1e-13)
            got = sample_mia_scores(r, K)
            assert [got[k] for k in ("min_k", "min_k_pp", "zlib")] == pytest.approx(
                [ref[k] for k in ("min_k", "min_k_pp", "zlib")], rel=1e-9, abs=1e-12)
    assert all(r["kl_retrained"] == 0.0 for r in records["retrained"])
    assert min(r["kl_retrained"] for r in records["unlearned"]) > 1e-4  # the adapters really differ


def test_mia_aucs_and_forget_quality_equal_sklearn_and_scipy_on_the_reference(llama_case, llama_reference):
    _, _, data, records = llama_case
    scores, kl = llama_reference
    result = evaluate_unlearning(records, corrupted="corrupted", retrained="retrained", min_k=K)
    for name in records:
        ref = scores[name]
        members = [ref[("forget", s.id)] for s in data["forget"]]
        nonmembers = [ref[("test", s.id)] for s in data["test"]]
        labels = [1] * len(members) + [0] * len(nonmembers)
        expected = {"loss": roc_auc_score(labels, [-x["loss"] for x in members + nonmembers])}
        for kind in ("min_k", "min_k_pp", "zlib"):
            expected[kind] = roc_auc_score(labels, [x[kind] for x in members + nonmembers])
        assert result["adapters"][name]["mia"] == pytest.approx(expected, abs=1e-12), name
        assert result["adapters"][name]["mia_auc"] == pytest.approx(expected["loss"], abs=1e-12)
        ks = ks_2samp([x["loss"] for x in members], [scores["retrained"][("forget", s.id)]["loss"]
                                                    for s in data["forget"]])
        fq = result["adapters"][name]["forget_quality"]
        assert fq["p_value"] == pytest.approx(ks.pvalue, rel=1e-12) and fq["statistic"] == pytest.approx(ks.statistic)
        for split in ("forget", "test"):
            mean_kl = sum(kl[name][(split, s.id)] for s in data[split]) / len(data[split])
            assert result["adapters"][name]["kl_retrained"][split] == pytest.approx(mean_kl, rel=1e-9, abs=1e-13)
    assert result["adapters"]["retrained"]["forget_quality"]["p_value"] == 1.0
    # the scores must not all agree, or the AUC checks could not tell them apart
    assert len({round(v, 6) for v in result["adapters"]["unlearned"]["mia"].values()}) >= 2


def test_llava_image_samples_and_projector_adapters(tiny_llava_dir, tmp_path):
    """KL through a second peft adapter on a LLaVA model, including a trained projector (modules_to_save)."""
    forget, test = digit_samples([0, 1], prefix="f-"), digit_samples([2, 3], prefix="t-")
    splits = {"forget": save_dataset(_with_files(forget, tmp_path), tmp_path / "forget.json"),
              "test": save_dataset(_with_files(test, tmp_path), tmp_path / "test.json")}
    adapters = _make_adapters(tiny_llava_dir, tmp_path, LoraSettings(r=2, train_projector=True),
                              {"retrained": 5, "unlearned": 6})
    with torch.no_grad():  # make the two projectors differ too
        b = load_model(tiny_llava_dir, adapter=adapters["unlearned"], options=F64)
        for n, p in b.model.named_parameters():
            if "modules_to_save" in n and p.requires_grad:
                p.add_(0.05)
        b.save_adapter(adapters["unlearned"])
    records = score_models(str(tiny_llava_dir), adapters, splits, options=F64, retrained="retrained",
                           generate=False)
    bundles = {n: load_model(tiny_llava_dir, adapter=p, options=F64) for n, p in adapters.items()}
    for s in forget + test:
        ref_rows = _reference_rows(bundles["retrained"], s)
        rows = _reference_rows(bundles["unlearned"], s)
        rec = next(r for r in records["unlearned"] if r["id"] == s.id)
        assert rec["token_logprobs"] == pytest.approx([lp for lp, _ in rows], rel=1e-9, abs=1e-12)
        assert rec["kl_retrained"] == pytest.approx(_reference_kl(ref_rows, rows), rel=1e-9, abs=1e-13)
        assert rec["kl_retrained"] > 1e-6


def _with_files(samples, folder):
    import dataclasses

    (folder / "img").mkdir(exist_ok=True)
    out = []
    for s in samples:
        path = folder / "img" / f"{s.id}.png"
        s.image.save(path)
        out.append(dataclasses.replace(s, image=None, image_path=path))
    return out


def test_cli_writes_one_table_and_one_figure(llama_case, tmp_path, capsys):
    from mmerase.eval.cli import main

    base, adapters, _, _ = llama_case
    root = adapters["retrained"].parent
    out = tmp_path / "report"
    rc = main(["unlearning", "--base", str(base), "--adapters", *[f"{n}={p}" for n, p in adapters.items()],
               "--splits", f"forget={root / 'forget.json'}", f"test={root / 'test.json'}", "--corrupted",
               "corrupted", "--retrained", "retrained", "--max-new-tokens", "3", "--device", "cpu", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    s = json.loads((out / "unlearning_summary.json").read_text())
    assert set(s["adapters"]["unlearned"]["mia"]) == {"loss", "min_k", "min_k_pp", "zlib"}
    assert all(v is not None for v in s["adapters"]["unlearned"]["mia"].values())
    assert s["adapters"]["retrained"]["kl_retrained"] == {"forget": 0.0, "test": 0.0}
    md = (out / "unlearning_summary.md").read_text()
    for label in ("| metric | corrupted | retrained (target) | unlearned |", "MIA AUC (forget vs test): Min-20%++",
                  "KL(retrained ‖ adapter), test", "forget quality: KS p-value"):
        assert label in md
    assert (out / "unlearning_summary.png").read_bytes()[:4] == b"\x89PNG"
    # the records written beside the table reproduce it through --records
    again = tmp_path / "again"
    rc = main(["unlearning", "--records", *[f"{n}={out / f'records_{n}.jsonl'}" for n in adapters], "--corrupted",
               "corrupted", "--retrained", "retrained", "--out", str(again)])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((again / "unlearning_summary.json").read_text())["adapters"] == s["adapters"]


def test_option_errors_come_before_any_model_runs(llama_case, tmp_path, capsys):
    from mmerase.eval.cli import main

    base, adapters, _, _ = llama_case
    root = adapters["retrained"].parent
    argv = ["unlearning", "--base", str(base), "--adapters", f"a={adapters['retrained']}", "--splits",
            f"forget={root / 'forget.json'}", "--out", str(tmp_path / "o")]
    for extra, message in ((["--retrained", "nope"], "--retrained 'nope' is not one of the --adapters"),
                           (["--min-k", "0"], "--min-k must be in (0, 1]"),
                           (["--corrupted", "a"], "--corrupted needs --retrained")):
        assert main(argv + extra) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
