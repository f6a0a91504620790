"""R-Bench / POPE yes-no metrics on a hand-checked fixture in both parsing modes, missing predictions reported,
subset averaging, and the instance-level drawing helper.

Fixture (tests/fixtures/eval/rbench_*): 8 questions, labels y n y n y n y n; question 7 has no prediction.
  id  answer                               official  strict        label
  1   "Yes, the man is riding the horse."  yes (TP)  yes (TP)      yes
  2   "No."                                no  (TN)  no  (TN)      no
  3   "There is not a ball. Yes."          no  (FN)  no  (FN)      yes   (first sentence only)
  4   "The dog is next to the ball"        yes (FP)  unparseable   no
  5   "NO, she is walking"                 yes (TP)  no  (FN)      yes   (official rule is case-sensitive)
  6   "Yes"                                yes (FP)  yes (FP)      no
  8   "I don't think so, no."              no  (TN)  no  (TN)      no
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mmerase.eval.cli import main
from mmerase.eval.rbench import evaluate, load_answers, load_questions, parse_official, parse_strict, yes_no_metrics
from mmerase.eval.rbench_draw import draw_boxes, draw_masks, instance_question

FIX = Path(__file__).parent / "fixtures" / "eval"
EPS = 1e-5  # the official script's denominator guard


@pytest.fixture(scope="module")
def data():
    return load_questions(FIX / "rbench_questions.json"), load_answers(FIX / "rbench_answers.json")[0]


@pytest.mark.parametrize("text,official,strict", [
    ("Yes, the man is riding the horse.", 1, 1), ("No.", 0, 0), ("There is not a ball. Yes.", 0, 0),
    ("The dog is next to the ball", 1, None), ("NO, she is walking", 1, 0), ("I don't think so, no.", 0, 0),
    ("", 1, None), ("Yes. But no.", 1, 1), ("Yes, but no.", 0, None), ("Yes, there is no ball", 0, None), ("no,", 0, 0),
])
def test_parsing_rules(text, official, strict):
    assert parse_official(text) == official
    assert parse_strict(text) == strict


def test_official_mode_metrics_by_hand(data):
    qs, ans = data
    r = evaluate(qs, ans, mode="official")
    s = r["subsets"]["all"]
    assert (s["questions"], s["scored"], s["missing"], s["missing_ids"]) == (8, 7, 1, ["7"])
    m = s["metrics"]
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 2, 2, 1)
    p, rec = 2 / (4 + EPS), 2 / (3 + EPS)
    assert m["accuracy"] == pytest.approx(100 * 4 / 7)
    assert m["precision"] == pytest.approx(100 * p) and m["precision"] == pytest.approx(50.0, abs=1e-3)
    assert m["recall"] == pytest.approx(100 * rec) and m["recall"] == pytest.approx(200 / 3, abs=1e-3)
    assert m["f1"] == pytest.approx(100 * 2 * p * rec / (p + rec + EPS))
    assert m["f1"] == pytest.approx(100 * 4 / 7, abs=2e-3)
    assert m["yes_ratio"] == pytest.approx(100 * 4 / 7)
    assert r["missing_total"] == 1


def test_strict_mode_reports_unparseable_separately(data):
    qs, ans = data
    s = evaluate(qs, ans, mode="strict")["subsets"]["all"]
    assert s["unparseable_ids"] == ["4"] and s["missing_ids"] == ["7"] and s["scored"] == 6
    m = s["metrics"]
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (1, 1, 2, 2)
    assert m["accuracy"] == pytest.approx(50.0)
    assert m["precision"] == pytest.approx(50.0, abs=1e-3) and m["recall"] == pytest.approx(100 / 3, abs=1e-3)
    assert m["f1"] == pytest.approx(40.0, abs=2e-3) and m["yes_ratio"] == pytest.approx(100 / 3)


def test_subsets_and_average_as_official(data):
    qs, ans = data
    r = evaluate(qs, ans, {"s1": ["1", "2", "3", "4"], "s2": ["5", "6", "7", "8"]})
    s1, s2 = r["subsets"]["s1"]["metrics"], r["subsets"]["s2"]["metrics"]
    assert s1["accuracy"] == pytest.approx(50.0) and s1["recall"] == pytest.approx(50.0, abs=1e-3)
    assert (s2["tp"], s2["fp"], s2["tn"], s2["fn"]) == (1, 1, 1, 0)
    assert s2["accuracy"] == pytest.approx(200 / 3) and s2["recall"] == pytest.approx(100.0, abs=1e-3)
    assert r["average"]["accuracy"] == pytest.approx(175 / 3)
    assert r["average"]["recall"] == pytest.approx(75.0, abs=1e-3)
    assert r["average"]["yes_ratio"] == pytest.approx(175 / 3)
    assert r["subsets"]["s1"]["missing"] == 0 and r["subsets"]["s2"]["missing_ids"] == ["7"]
    # a duplicated id is counted twice, as the official loop does, and reported
    d = evaluate(qs, ans, {"d": ["1", "1", "2"]})["subsets"]["d"]
    assert d["duplicate_ids"] == 1 and d["metrics"]["tp"] == 2 and d["metrics"]["n"] == 3


def test_metrics_edge_cases():
    assert yes_no_metrics([], [])["accuracy"] is None
    m = yes_no_metrics([0, 0], [0, 0], eps=0.0)
    assert m["accuracy"] == 100.0 and m["precision"] == 0.0 and m["yes_ratio"] == 0.0


def test_rbench_cli_writes_tables_and_reports_missing(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["rbench", "--questions", str(FIX / "rbench_questions.json"), "--predictions",
               str(FIX / "rbench_answers.json"), "--subset-ids", str(FIX / "rbench_ids_1.json"),
               str(FIX / "rbench_ids_2.json"), "--out", str(out)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "warning: 1 question(s) have no prediction" in cap.err
    assert "mean accuracy 58.33 over 2 subset(s)" in cap.out
    s = json.loads((out / "rbench_summary.json").read_text())
    assert s["average"]["accuracy"] == pytest.approx(175 / 3) and list(s["subsets"]) == ["rbench_ids_1", "rbench_ids_2"]
    md = (out / "rbench_summary.md").read_text()
    assert "| **average** |  |  |  |  | 58.33 | 50.00 | 75.00 | 58.33 | 58.33 |" in md
    assert "1 question(s) have no prediction" in md
    rows = {r["question_id"]: r for r in map(json.loads, (out / "rbench_samples.jsonl").read_text().splitlines())}
    assert rows[7]["text"] is None and rows[7]["official"] is None and rows[7]["subsets"] == ["rbench_ids_2"]
    assert rows[5]["official"] == "yes" and rows[5]["strict"] == "no" and rows[5]["correct_official"] is True
    man = json.loads((out / "rbench_manifest.json").read_text())
    assert set(man["inputs"]) == {"questions", "predictions", "subset:rbench_ids_1", "subset:rbench_ids_2"}
    rc = main(["rbench", "--questions", str(FIX / "rbench_questions.json"), "--predictions",
               str(FIX / "rbench_answers.json"), "--mode", "strict", "--out", str(tmp_path / "strict")])
    assert rc == 0
    s = json.loads((tmp_path / "strict" / "rbench_summary.json").read_text())
    assert s["unparseable_total"] == 1 and s["average"]["accuracy"] == pytest.approx(50.0)


def test_holder_name_stands_for_the_five_subset_files(tmp_path, capsys):
    for i in range(1, 6):
        (tmp_path / f"lvl_ids_{i}.json").write_text(json.dumps([i, i + 1, i + 2]))
    rc = main(["rbench", "--questions", str(FIX / "rbench_questions.json"), "--predictions",
               str(FIX / "rbench_answers.json"), "--subset-ids", str(tmp_path / "lvl_ids_holder.json"),
               "--out", str(tmp_path / "out")])
    assert rc == 0, capsys.readouterr().err
    s = json.loads((tmp_path / "out" / "rbench_summary.json").read_text())
    assert list(s["subsets"]) == [f"lvl_ids_{i}" for i in range(1, 6)]
    # subset 1 = ids 1,2,3 -> TP, TN, FN: accuracy 2/3
    assert s["subsets"]["lvl_ids_1"]["metrics"]["accuracy"] == pytest.approx(200 / 3)
    (tmp_path / "lvl_ids_5.json").unlink()
    rc = main(["rbench", "--questions", str(FIX / "rbench_questions.json"), "--predictions",
               str(FIX / "rbench_answers.json"), "--subset-ids", str(tmp_path / "lvl_ids_holder.json"),
               "--out", str(tmp_path / "out")])
    assert rc == 2 and "lvl_ids_5.json" in capsys.readouterr().err


RECORD = {"question_id": 11, "image": "im.png", "text": "Is the man riding the horse?", "subject": "Man",
          "object": "horse", "sub_box": [0.1, 0.1, 0.5, 0.5], "obj_box": [0.5, 0.5, 0.9, 0.9], "label": "yes"}


def test_instance_question_rewrite():
    assert instance_question(RECORD, "box") == "Is the man in red bounding box riding the horse in green bounding box?"
    assert instance_question(RECORD, "mask", "blue", "gold") == "Is the man in blue mask riding the horse in gold mask?"


def test_draw_boxes_and_masks():
    img = Image.new("RGB", (100, 80), "white")
    boxed = draw_boxes(img, RECORD)
    assert boxed.getpixel((10, 30)) == (255, 0, 0)  # subject box left edge (x = 0.1 * 100)
    assert boxed.getpixel((50, 60)) == (0, 128, 0)  # object box left edge, Pillow's "green"
    assert boxed.getpixel((30, 24)) == (255, 255, 255)  # inside stays untouched
    mask = Image.new("L", (10, 8), 0)
    mask.paste(1, (0, 0, 5, 4))
    mask.paste(2, (5, 4, 10, 8))
    tinted = draw_masks(img, mask)
    a = 120 / 255  # the benchmark's overlay alpha

    def blend(c):
        return tuple(round(c[i] * a + 255 * (1 - a)) for i in range(3))

    assert tinted.mode == "RGBA"
    for (x, y), color in (((20, 20), (250, 0, 45)), ((80, 70), (100, 250, 0))):
        got = tinted.getpixel((x, y))[:3]
        assert all(abs(g - e) <= 1 for g, e in zip(got, blend(color))), (got, blend(color))
    assert tinted.getpixel((80, 10))[:3] == (255, 255, 255)


def test_rbench_draw_cli(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (40, 40), "white").save(tmp_path / "imgs" / "im.png")
    q = tmp_path / "inst.json"
    q.write_text(json.dumps([RECORD]))
    rc = main(["rbench-draw", "--questions", str(q), "--image-dir", str(tmp_path / "imgs"), "--out",
               str(tmp_path / "out")])
    assert rc == 0, capsys.readouterr().err
    row = json.loads((tmp_path / "out" / "questions_box.jsonl").read_text())
    assert row["text"].startswith("Is the man in red bounding box") and row["original_text"] == RECORD["text"]
    assert Image.open(tmp_path / "out" / row["image"]).getpixel((4, 10)) == (255, 0, 0)
