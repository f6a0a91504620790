"""Unlearning metrics against hand-computed values: ROUGE-L, per-split loss/accuracy, recovery ratio, MIA AUC,
and the ``unlearning`` command's table."""

from __future__ import annotations

import json
import zlib

import pytest

from mmerase.eval.cli import main
from mmerase.eval.errors import UserError
from mmerase.eval.unlearning import evaluate_unlearning, lcs_length, membership_auc, recovery_ratio, rouge_l

REFS = ["seven", "three", "five", "two"]


def adapter(forget_loss, forget_pred, test_loss, test_correct, retain_loss, retain_correct):
    recs = [{"id": f"f{i}", "split": "forget", "loss": l, "prediction": p, "reference": r}
            for i, (l, p, r) in enumerate(zip(forget_loss, forget_pred, REFS))]
    recs += [{"id": f"t{i}", "split": "test", "loss": l, "correct": c} for i, (l, c) in enumerate(zip(test_loss,
                                                                                                       test_correct))]
    recs += [{"id": f"r{i}", "split": "retain", "loss": l, "correct": c}
             for i, (l, c) in enumerate(zip(retain_loss, retain_correct))]
    return recs


RECORDS = {
    "base": adapter([2, 2, 2, 2], ["x"] * 4, [2, 2, 2], [False] * 3, [2, 2], [False, False]),
    "corrupted": adapter([0.2, 0.4, 0.6, 0.2], ["one", "three", "one", "one"], [1.0, 1.2, 1.4],
                         [True, False, False], [0.3, 0.5], [True, True]),
    "retrained": adapter([1.0, 1.1, 0.9, 1.0], ["seven", "three", "five", "one"], [1.0, 0.95, 1.05],
                         [True, True, False], [0.35, 0.45], [True, True]),
    "unlearned": adapter([0.8, 0.7, 0.6, 0.5], ["Seven.", "three", "one", "one"], [0.7, 0.9, 1.1],
                         [True, False, True], [0.4, 0.6], [True, False]),
}


def test_rouge_l_by_hand():
    assert lcs_length("the cat sat on the mat".split(), "the cat is on the mat".split()) == 5
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert rouge_l("a b c d", "b d") == pytest.approx(2 / 3)  # P = 2/4, R = 2/2
    assert rouge_l("Seven!", "seven") == 1.0  # lower-cased, punctuation split off
    assert rouge_l("seven", "7") == 0.0 and rouge_l("", "seven") == 0.0


def test_recovery_and_auc_primitives():
    assert recovery_ratio(0.65, 0.35, 1.0) == pytest.approx(0.3 / 0.65)
    assert recovery_ratio(1.0, 1.0, 1.0) is None and recovery_ratio(None, 0.0, 1.0) is None
    # 12 member/non-member pairs: one tie (0.5), member loss lower in 5 -> 6/12
    assert membership_auc([1.0, 1.1, 0.9, 1.0], [1.0, 0.95, 1.05]) == pytest.approx(0.5)
    assert membership_auc([0.1, 0.2], [0.5, 0.6]) == 1.0 and membership_auc([], [1.0]) is None


def test_evaluate_unlearning_by_hand():
    r = evaluate_unlearning(RECORDS, corrupted="corrupted", retrained="retrained")
    a = r["adapters"]
    assert r["splits"] == ["forget", "test", "retain"]
    f = {k: a[k]["splits"]["forget"] for k in a}
    assert f["corrupted"]["loss"] == pytest.approx(0.35) and f["retrained"]["loss"] == pytest.approx(1.0)
    assert f["unlearned"]["loss"] == pytest.approx(0.65)
    assert [f[k]["accuracy"] for k in ("corrupted", "retrained", "unlearned")] == pytest.approx([0.25, 0.75, 0.5])
    assert f["unlearned"]["rouge_l"] == pytest.approx(0.5)  # single-word answers: ROUGE-L = exact match here
    assert a["unlearned"]["splits"]["test"]["accuracy"] == pytest.approx(2 / 3)
    assert a["unlearned"]["splits"]["test"]["rouge_l"] is None  # no texts in that split
    rec = r["recovery"]
    assert set(rec) == {"base", "unlearned"}
    assert rec["unlearned"]["forget"]["loss"] == pytest.approx(0.3 / 0.65)
    assert rec["unlearned"]["forget"]["accuracy"] == pytest.approx(0.5)
    assert rec["unlearned"]["forget"]["rouge_l"] == pytest.approx(0.5)
    assert rec["unlearned"]["test"]["loss"] == pytest.approx(1.5)  # (0.9 - 1.2) / (1.0 - 1.2)
    assert rec["unlearned"]["test"]["accuracy"] == pytest.approx(1.0)
    assert rec["unlearned"]["retain"]["loss"] is None  # corrupted and retrained both 0.4: no gap to recover
    assert rec["base"]["forget"]["accuracy"] == pytest.approx(-0.5)
    # MIA: forget vs test losses
    assert a["corrupted"]["mia_auc"] == 1.0
    assert a["retrained"]["mia_auc"] == pytest.approx(0.5)
    assert a["unlearned"]["mia_auc"] == pytest.approx(10.5 / 12)
    assert a["base"]["mia_auc"] == pytest.approx(0.5)


def test_bad_records_are_clear_errors():
    bad = {k: [dict(x) for x in v] for k, v in RECORDS.items()}
    bad["unlearned"][0]["loss"] = float("nan")
    with pytest.raises(UserError, match="finite"):
        evaluate_unlearning(bad)
    short = {**RECORDS, "unlearned": RECORDS["unlearned"][:-1]}
    with pytest.raises(UserError, match="cover different samples"):
        evaluate_unlearning(short)
    mixed = {"a": [{"id": 1, "split": "forget", "loss": 1.0, "prediction": "x", "reference": "x"},
                   {"id": 2, "split": "forget", "loss": 1.0}]}
    with pytest.raises(UserError, match="lack what 'accuracy' needs"):
        evaluate_unlearning(mixed)
    with pytest.raises(UserError, match="both"):
        evaluate_unlearning(RECORDS, corrupted="corrupted")


def test_unlearning_cli_writes_one_table(tmp_path, capsys):
    args = []
    for name, recs in RECORDS.items():
        p = tmp_path / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in recs))
        args.append(f"{name}={p}")
    out = tmp_path / "out"
    rc = main(["unlearning", "--records", *args, "--corrupted", "corrupted", "--retrained", "retrained",
               "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    s = json.loads((out / "unlearning_summary.json").read_text())
    assert s["recovery"]["unlearned"]["forget"]["accuracy"] == pytest.approx(0.5)
    md = (out / "unlearning_summary.md").read_text()
    assert "| unlearned | forget | 4 | 0.6500 | 0.5000 | 0.5000 | 0.4615 | 0.5000 | 0.5000 | 0.8750 |" in md
    rows = [json.loads(x) for x in (out / "unlearning_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 9 and rows[0] == {"adapter": "base", "id": "f0", "split": "forget", "loss": 2,
                                              "correct": False, "rouge_l": 0.0, "mia_min_k": None,
                                              "mia_min_k_pp": None, "kl_retrained": None,
                                              "mia_zlib": -2 / len(zlib.compress(b"seven"))}
    assert (out / "unlearning_summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rc = main(["unlearning", "--records", "oops", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "NAME=FILE" in err and len(err.strip().splitlines()) == 1


def test_retrained_alone_gives_forget_quality_without_recovery():
    from scipy.stats import ks_2samp

    r = evaluate_unlearning(RECORDS, retrained="retrained")
    assert r["recovery"] == {}
    expected = ks_2samp([0.8, 0.7, 0.6, 0.5], [1.0, 1.1, 0.9, 1.0])  # unlearned vs retrained forget losses
    fq = r["adapters"]["unlearned"]["forget_quality"]
    assert fq["p_value"] == pytest.approx(expected.pvalue, rel=1e-12) and fq["statistic"] == 1.0
    # records without token statistics or texts: those AUCs are absent, the loss AUC is not
    assert r["adapters"]["unlearned"]["mia"]["min_k"] is None and r["adapters"]["unlearned"]["mia"]["zlib"] is None
    assert r["adapters"]["unlearned"]["mia"]["loss"] == pytest.approx(10.5 / 12)
    assert evaluate_unlearning(RECORDS)["adapters"]["unlearned"]["forget_quality"] is None
