"""R-Bench's web-image, image/instance (id subsets) and box modes give the numbers R-Bench's own ``eval.py`` prints
on the same files, which hold the tricky answers: a first sentence that decides, "not", "Not", an empty answer, an
upper-case "NO", an answer missing, and raw U+2028 / U+2029 / U+0085 inside answers (valid JSON Lines).

The expected numbers below were obtained by running a local copy of R-Bench's eval.py (github.com/mrwu-mac/R-Bench,
commit d9d73c0) on the fixture files, outside this repository::

    python eval.py --question-file rbench_web_questions.json --result-file rbench_web_answers.jsonl --eval_web
    python eval.py --question-file rbench_web_questions.json --question-id-file rbench_web_ids_holder.json \\
        --result-file rbench_web_answers.jsonl --eval_image
    python eval.py --question-file rbench_box_questions.jsonl --result-file rbench_box_answers.jsonl --eval_box

and copying what it printed (fractions; this package reports percent).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmerase.eval.cli import main

FIX = Path(__file__).parent / "fixtures" / "eval"
WEB_Q, WEB_A = FIX / "rbench_web_questions.json", FIX / "rbench_web_answers.jsonl"
BOX_Q, BOX_A = FIX / "rbench_box_questions.jsonl", FIX / "rbench_box_answers.jsonl"

# (accuracy, precision, recall, F1, yes ratio) as eval.py printed them
OFFICIAL_WEB = {
    "counterfactual": (0.42857142857142855, 0.39999920000160005, 0.6666644444518518, 0.49999406254550754,
                       0.7142857142857143),
    "illusion": (0.5, 0.49999750001249993, 0.49999750001249993, 0.49999250006249973, 0.5),
    "total": (0.45454545454545453, 0.4285708163274053, 0.5999988000024, 0.499994305603742, 0.6363636363636364),
}
OFFICIAL_IMAGE = [
    (0.6666666666666666, 0.6666644444518518, 0.6666644444518518, 0.6666594444893517, 0.5),
    (0.2, 0.24999937500156252, 0.49999750001249993, 0.3333277778370366, 0.8),
    (0.5, 0.49999875000312505, 0.6666644444518518, 0.5714220408623905, 0.6666666666666666),
    (0.5, 0.3333322222259259, 0.49999750001249993, 0.39999360006239953, 0.5),
    (0.5, 0.49999875000312505, 0.6666644444518518, 0.5714220408623905, 0.6666666666666666),
]
OFFICIAL_IMAGE_AVERAGE = (47.33, 45.0, 60.0, 50.86, 62.67)  # np.round(..., decimals=2)
OFFICIAL_BOX_ACCURACY = 0.625
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def run(argv, capsys):
    rc = main(argv)
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    return cap


def summary(out):
    return json.loads((out / "rbench_summary.json").read_text(encoding="utf-8"))


def test_answers_with_raw_line_separators_are_valid_json_lines():
    from mmerase.eval.io import iter_jsonl

    raw = WEB_A.read_text(encoding="utf-8")
    assert "\u2028" in raw and "\u2029" in raw and "\u0085" in raw  # str.splitlines() would cut these records
    rows = list(iter_jsonl(WEB_A))
    assert [n for n, _ in rows] == list(range(1, 12)) and rows[4][1]["text"] == "No\u2028the dog is not there"


def test_web_mode_equals_official_script(tmp_path, capsys):
    out = tmp_path / "web"
    cap = run(["rbench", "--eval", "web", "--questions", str(WEB_Q), "--predictions", str(WEB_A), "--out", str(out)],
              capsys)
    s = summary(out)
    assert list(s["subsets"]) == ["counterfactual", "illusion", "total"]
    for name, expected in OFFICIAL_WEB.items():
        got = [s["subsets"][name]["metrics"][m] / 100 for m in METRICS]
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-15), name
    assert s["subsets"]["total"]["missing_ids"] == ["8"] and s["average"] is None
    assert "total accuracy 45.45 over 11 question(s)" in cap.out
    md = (out / "rbench_summary.md").read_text(encoding="utf-8")
    assert "| total | 12 | 11 | 1 | — | 45.45 | 42.86 | 60.00 | 50.00 | 63.64 |" in md and "average" not in md


def test_image_mode_with_line_separators_equals_official_script(tmp_path, capsys):
    out = tmp_path / "img"
    run(["rbench", "--questions", str(WEB_Q), "--predictions", str(WEB_A), "--subset-ids",
         str(FIX / "rbench_web_ids_holder.json"), "--out", str(out)], capsys)
    s = summary(out)
    for k, expected in enumerate(OFFICIAL_IMAGE, start=1):
        got = [s["subsets"][f"rbench_web_ids_{k}"]["metrics"][m] / 100 for m in METRICS]
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-15), k
    assert [round(s["average"][m], 2) for m in METRICS] == list(OFFICIAL_IMAGE_AVERAGE)


def test_box_mode_equals_official_script(tmp_path, capsys):
    out = tmp_path / "box"
    cap = run(["rbench", "--eval", "box", "--questions", str(BOX_Q), "--predictions", str(BOX_A), "--out", str(out)],
              capsys)
    s = summary(out)
    assert s["accuracy"] / 100 == pytest.approx(OFFICIAL_BOX_ACCURACY, rel=1e-15) and s["pairing"] == "question_id"
    assert "accuracy 62.50 over 8 answer(s)" in cap.out
    rows = [json.loads(x) for x in (out / "rbench_samples.jsonl").read_text(encoding="utf-8").split("\n") if x]
    # "Dog" is not "dog"; "not a horse" still names the horse; "" names nothing; "Trees." does not contain "tree"
    assert [r["correct"] for r in rows] == [True, False, True, True, False, True, False, True]
    # without ids on the answers the script's pairing by position is used: same number
    bare = tmp_path / "bare.jsonl"
    bare.write_text("".join(json.dumps({"text": json.loads(x)["text"]}, ensure_ascii=False) + "\n"
                            for x in BOX_A.read_text(encoding="utf-8").split("\n") if x), encoding="utf-8")
    run(["rbench", "--eval", "box", "--questions", str(BOX_Q), "--predictions", str(bare), "--out",
         str(tmp_path / "pos")], capsys)
    p = summary(tmp_path / "pos")
    assert p["pairing"] == "position" and p["accuracy"] / 100 == pytest.approx(OFFICIAL_BOX_ACCURACY, rel=1e-15)


def test_string_answer_ids_are_matched_and_counted(tmp_path, capsys):
    answers = tmp_path / "str_ids.jsonl"
    lines = [json.loads(x) for x in WEB_A.read_text(encoding="utf-8").split("\n") if x]
    for rec in lines[:4]:
        rec["question_id"] = str(rec["question_id"])
    answers.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), encoding="utf-8")
    out = tmp_path / "o"
    cap = run(["rbench", "--eval", "web", "--questions", str(WEB_Q), "--predictions", str(answers), "--out",
               str(out)], capsys)
    s = summary(out)
    assert s["ids_matched_by_conversion"] == 4
    assert s["subsets"]["total"]["metrics"]["accuracy"] / 100 == pytest.approx(OFFICIAL_WEB["total"][0])
    assert "4 answer id(s) matched a question id only after conversion" in cap.err
    assert "4 answer id(s) matched" in (out / "rbench_summary.md").read_text(encoding="utf-8")


def test_broken_line_and_bad_inputs_are_named(tmp_path, capsys):
    text = WEB_A.read_text(encoding="utf-8").split("\n")
    text[2] = text[2][:-3]  # line 3 loses its closing characters
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(text), encoding="utf-8")
    assert main(["rbench", "--questions", str(WEB_Q), "--predictions", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:3: invalid JSON" in err and len(err.strip().splitlines()) == 1
    # web mode needs a 'type' on every question; box mode a label list
    rc = main(["rbench", "--eval", "web", "--questions", str(FIX / "rbench_questions.json"), "--predictions",
               str(FIX / "rbench_answers.json"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "has no text 'type' field" in capsys.readouterr().err
    rc = main(["rbench", "--eval", "box", "--questions", str(WEB_Q), "--predictions", str(BOX_A), "--out",
               str(tmp_path / "o")])
    assert rc == 2 and "question 1 (1): box mode needs 'label' as a list" in capsys.readouterr().err
    rc = main(["rbench", "--eval", "web", "--questions", str(WEB_Q), "--predictions", str(WEB_A), "--subset-ids",
               str(FIX / "rbench_ids_1.json"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "--subset-ids is for --eval subsets" in capsys.readouterr().err
