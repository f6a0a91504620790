"""``mmvet --official-evaluator FILE``: the prompt, retry wording and layout come from an evaluator script, and the
scores equal what that script's own logic computes with the same judge.

No MM-Vet text is shipped: the evaluator scripts here are synthetic, written for this test in the shape of MM-Vet's
(a module-level ``prompt`` string, a retry line appended in an ``except`` block, the same retry schedule and
aggregation), with invented prompts. Each is imported and run against one local fake judge; ``mmerase eval mmvet``
runs against a fresh one with the same scripted replies.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "eval"))
from fake_openai import FakeOpenAI  # noqa: E402

from mmerase.eval.cli import main  # noqa: E402

FIX = Path(__file__).parent / "fixtures" / "eval"

COMMON = '''
from collections import Counter

import numpy as np


def grade_one(client, gpt_model, line, model_pred):
    question = build_question(line, model_pred)
    temperature = 0.0
    response = client.chat.completions.create(model=gpt_model, max_tokens=3, temperature=temperature,
                                              messages=[{"role": "user", "content": question}])
    content = response.choices[0].message.content
    try_time = 1
    while True:
        try:
            content = content.split(" ")[0].strip()
            score = float(content)
            if score > 1.0 or score < 0.0:
                raise ValueError(content)
            return score
        except ValueError:
            question_try = question + RETRY_PLACEHOLDER
            response = client.chat.completions.create(model=gpt_model, max_tokens=3, temperature=temperature,
                                                      messages=[{"role": "user", "content": question_try}])
            content = response.choices[0].message.content
            try_time += 1
            temperature += 0.5
            if try_time > 5:  # the reply to the last re-ask is never read
                return 0.0


def grade_all(client, gpt_model, data, results, num_run):
    grades = {}
    for j in range(num_run):
        for key, line in data.items():
            grades.setdefault(key, []).append(grade_one(client, gpt_model, line, results[key]))
    return grades


def export(data, grades, num_run):
    counter = Counter()
    for value in data.values():
        counter.update(set(value["capability"]))
    sums = {c: [0.0] * num_run for c in counter}
    sums["total"] = [0.0] * num_run
    for key, scores in grades.items():
        for i in range(num_run):
            for c in set(data[key]["capability"]):
                sums[c][i] += scores[i]
            sums["total"][i] += scores[i]
    counter["total"] = len(data)
    return {c: float(np.mean(np.array(v) / counter[c] * 100)) for c, v in sums.items()}
'''

V1 = '''"""Synthetic v1-shaped evaluator (invented prompt)."""

prompt = """Score how well the prediction matches the reference answer; invented instructions for a test.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
How many legs has a spider? | 8 | eight | 1.0
How many legs has a spider? | 8 | six | 0.0
"""


def build_question(line, model_pred):
    gt = line["answer"].replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    return prompt + "\\n" + " | ".join([line["question"], gt, model_pred, ""])
''' + COMMON.replace("RETRY_PLACEHOLDER", '"\\nInvented retry line, digits only: "')

V2 = '''"""Synthetic v2-shaped evaluator (invented prompt)."""

prompt = """Score how well the prediction matches the reference answer; <image> marks a picture. Invented text.

| Question | Ground truth | Prediction | Correctness |
| --- | --- | --- | --- |
| How many legs has this animal?<image> | 8 | eight | 1.0 |
"""


def build_question(line, model_pred):
    query = ""
    for q in line["question"].split("<IMG>"):
        query += "<image>" if q.endswith((".jpg", "jpeg", ".png")) else q
    gt = line["answer"].replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    row = [query.replace("\\n", "<br>"), gt.replace("\\n", "<br>"), model_pred.replace("\\n", "<br>"), ""]
    return prompt + "| " + " | ".join(row)
''' + COMMON.replace("RETRY_PLACEHOLDER", '"\\n\\nInvented v2 retry line: "')

# fake-judge replies are scripted in the prediction: "#a|b#" = the k-th reply to the same prompt text is the k-th
# value (unparseable and out-of-range replies trigger the re-asks at rising temperature)
CASES = {
    "v1": (V1, FIX / "mmvet_small.json", {"v1_0": "A cat. #0.8#", "v1_1": "OPEN #0.2|0.6#",
                                          "v1_2": "x = 3 #oops|0.3#", "v1_3": "A cat. #bad#",
                                          "v1_4": "12.40 #1.5|0.9#", "v1_5": "Acme #0.5 and more#"}),
    "v2": (V2, FIX / "mmvet_v2_small.json", {"v2_0": "B #oops|1.0#", "v2_1": "hello\nthere #0.5|0.2#",
                                             "v2_2": "three #bad#"}),
}


def load_script(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("layout", ["v1", "v2"])
def test_scores_equal_the_evaluator_scripts_own_logic(tmp_path, capsys, monkeypatch, layout):
    import openai

    source, meta, preds = CASES[layout]
    script = tmp_path / f"synthetic_{layout}_evaluator.py"
    script.write_text(source, encoding="utf-8")
    pred_file = tmp_path / "preds.json"
    pred_file.write_text(json.dumps(preds), encoding="utf-8")
    data = json.loads(meta.read_text(encoding="utf-8"))
    with FakeOpenAI() as ref:  # the script's own logic
        client = openai.OpenAI(api_key=ref.key, base_url=ref.url, max_retries=0)
        grades = load_script(script).grade_all(client, "judge-x-0613", data, preds, 2)
        expected = load_script(script).export(data, grades, 2)
    out = tmp_path / "out"
    with FakeOpenAI() as srv:
        monkeypatch.setenv("OPENAI_API_KEY", srv.key)
        rc = main(["mmvet", "--metadata", str(meta), "--predictions", str(pred_file), "--judge-model", "judge-x-0613",
                   "--base-url", srv.url, "--runs", "2", "--concurrency", "1", "--official-evaluator", str(script),
                   "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    s = json.loads((out / "mmvet_summary.json").read_text())
    got = {**s["scores"]["capabilities"], "total": s["scores"]["total"]}
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)
    rows = [json.loads(x) for x in (out / "mmvet_judgements.jsonl").read_text().splitlines()]
    # an unparseable judgement is kept as null and scored 0.0, as the script scores it
    assert {r["id"]: [0.0 if v is None else v for v in r["scores"]] for r in rows} == grades
    assert s["judgements"]["unparseable"] == 2 and s["judgements"]["ok"] == 2 * len(preds) - 2
    assert s["judge"]["prompt"] == f"official evaluator {script.name} ({layout} layout)"
    # the same questions at the same temperatures, minus the script's last re-ask, whose reply it never reads
    sent = [(r["prompt"], r["temperature"]) for r in srv.requests]
    assert sent == [(r["prompt"], r["temperature"]) for r in ref.requests if r["temperature"] != 2.0]
    assert len(ref.requests) - len(sent) == 2  # the always-unparseable sample, once per run
    assert all("invented" in p.lower() for p, _ in sent) and any("retry line" in p for p, _ in sent)


def test_files_without_a_grading_prompt_are_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-unused-0000")
    base = ["mmvet", "--metadata", str(FIX / "mmvet_small.json"), "--predictions",
            str(FIX / "mmvet_small_predictions.json"), "--judge-model", "j", "--base-url", "http://127.0.0.1:9/v1",
            "--out", str(tmp_path / "out"), "--official-evaluator"]
    cases = {
        "no_prompt.py": ("import json\n\ndef main():\n    return 1\n", "no grading prompt found; expected a "
                         "module-level prompt"),
        "no_retry.py": ('prompt = """Q | A | P | C\\n"""\n\ndef f(x):\n    return prompt + x\n',
                        "no retry wording found"),
        "notes.txt": ("Just some notes, not code: (\n", "not a Python script"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        assert main(base + [str(path)]) == 2
        err = capsys.readouterr().err
        assert message in err and name in err and len(err.strip().splitlines()) == 1, err
    good = tmp_path / "good.py"
    good.write_text(V1, encoding="utf-8")
    assert main(base + [str(good), "--prompt-file", str(good)]) == 2
    assert "drop --prompt-file" in capsys.readouterr().err
    assert main(base + [str(good), "--mmvet-version", "v2"]) == 2
    assert "lays prompts out as MM-Vet v1, but --mmvet-version is v2" in capsys.readouterr().err
    assert not (tmp_path / "out" / "judge_cache.jsonl").exists()
