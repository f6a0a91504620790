"""Evaluation harness for mmerase: MM-Vet-style GPT judging, R-Bench/POPE yes-no metrics and unlearning metrics.

The submodules are small and import their heavy dependencies lazily, so ``python -m eval rbench`` does not pay for
``openai`` and ``python -m eval mmvet`` does not pay for scikit-learn.

- :mod:`eval.judge`      OpenAI-compatible judge client: append-only cache, backoff; :mod:`eval.pricing` cost cap.
- :mod:`eval.mmvet`      MM-Vet (v1/v2) grading prompt, score parsing, official aggregation;
                         :mod:`eval.mmvet_run` runs it end to end (outputs, manifest); :mod:`eval.mmvet_official`
                         reads the prompt from the user's copy of the official evaluator script.
- :mod:`eval.rbench`     R-Bench / POPE yes-no parsing and metrics (id subsets, web-image types);
                         :mod:`eval.rbench_box` its box mode; :mod:`eval.rbench_draw` draws instance prompts.
- :mod:`eval.unlearning` per-split loss/accuracy/ROUGE-L, recovery ratio, membership-inference AUCs, KL to the
                         retrained adapter and forget quality; :mod:`eval.mia` defines the membership scores;
                         :mod:`eval.unlearning_report` writes the table and figure; :mod:`eval.model_scores`
                         computes the per-sample records from models (torch, mmerase).
- :mod:`eval.cli`        ``python -m eval {mmvet,rbench,rbench-draw,unlearning}`` (:mod:`eval.commands` runs the
                         non-judged ones; :mod:`eval.cli_config` reads ``--config``).
"""

from eval.errors import EvalError, RunStopped, UserError

__all__ = ["EvalError", "RunStopped", "UserError"]
