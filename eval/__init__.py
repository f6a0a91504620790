"""Evaluation harness for mmerase: MM-Vet-style GPT judging, R-Bench/POPE yes-no metrics and unlearning metrics.

The submodules are small and import their heavy dependencies lazily, so ``python -m eval rbench`` does not pay for
``openai`` and ``python -m eval mmvet`` does not pay for scikit-learn.

- :mod:`eval.judge`      OpenAI-compatible judge client: append-only cache, backoff; :mod:`eval.pricing` cost cap.
- :mod:`eval.mmvet`      MM-Vet (v1/v2) grading prompt, score parsing, official aggregation;
                         :mod:`eval.mmvet_run` runs it end to end (outputs, manifest).
- :mod:`eval.rbench`     R-Bench / POPE yes-no parsing and metrics; :mod:`eval.rbench_draw` draws instance prompts.
- :mod:`eval.unlearning` per-split loss/accuracy/ROUGE-L, recovery ratio and membership-inference AUC.
- :mod:`eval.cli`        ``python -m eval {mmvet,rbench,rbench-draw,unlearning}`` (:mod:`eval.commands` runs the
                         non-judged ones; :mod:`eval.cli_config` reads ``--config``).
"""

from eval.errors import EvalError, RunStopped, UserError

__all__ = ["EvalError", "RunStopped", "UserError"]
