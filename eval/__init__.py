"""Evaluation harness for mmerase: MM-Vet-style GPT judging, R-Bench/POPE yes-no metrics and unlearning metrics.

Installed as ``mmerase.eval`` (the repository keeps it in the folder eval/); run it as ``mmerase eval <command>`` or
``python -m mmerase.eval <command>``. The submodules are small and import their heavy dependencies lazily, so
``mmerase eval rbench`` does not pay for ``openai``, ``mmerase eval mmvet`` not for scikit-learn, and the judge path
(:mod:`~mmerase.eval.judge`, :mod:`~mmerase.eval.mmvet`, :mod:`~mmerase.eval.mmvet_run`) runs without torch.

- ``judge``        OpenAI-compatible judge client: append-only cache, backoff; ``pricing``: the cost cap.
- ``mmvet``        MM-Vet (v1/v2) grading prompt, score parsing, official aggregation; ``mmvet_run`` runs it end to
                   end (outputs, manifest); ``mmvet_official`` reads the prompt from the user's copy of the official
                   evaluator script.
- ``rbench``       R-Bench / POPE yes-no parsing and metrics (id subsets, web-image types); ``rbench_box`` its box
                   mode; ``rbench_draw`` draws instance prompts.
- ``unlearning``   per-split loss/accuracy/ROUGE-L, recovery ratio, membership-inference AUCs, KL to the retrained
                   adapter and forget quality; ``mia`` defines the membership scores; ``unlearning_report`` writes the
                   table and figure; ``model_scores`` computes the per-sample records from models (torch, mmerase).
- ``cli``          the command line (``commands`` runs the non-judged commands; ``cli_config`` reads ``--config``
                   through :mod:`mmerase.options`); ``io``: JSON files and output folders (:mod:`mmerase.fileio`).
"""

from .errors import EvalError, RunStopped, UserError

__all__ = ["EvalError", "RunStopped", "UserError"]
