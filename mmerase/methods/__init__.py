"""Unlearning methods behind one interface, one module each (the way peft keeps one module per tuner):

- ``influence`` (:mod:`.influence`, the default): the influence update by the engine's solve;
- ``finetune`` (:mod:`.finetune`): continue training on the edited training set;
- ``ga`` (:mod:`.ga`), ``graddiff`` (:mod:`.graddiff`), ``npo`` (:mod:`.npo`), ``kl`` (:mod:`.kl`): the ascent
  family (forget the old versions, learn the new ones), serving remove, correct and modify;
- ``surrogate`` (:mod:`.surrogate`): the influence update solved and refined on a sub-sampled quadratic surrogate
  of the edited objective, at a cost that does not grow with the training set.

:func:`unlearn` runs one on a request with the compute accounting of :mod:`.accounting`; :func:`estimate` says what
it would cost. Every gradient method trains through the one training loop, :func:`mmerase.training.train_steps`.
"""

from .accounting import (Accounting, Budget, CheckpointInfo, Checkpoints, Meter, PassCounter, measure_costs,
                         retraining_passes)
from .base import Job, Method, MethodError, MethodOptions, MethodOutput, check_serves
from .registry import METHODS, get_method, method_names, register_method
from .influence import Influence  # registered first: the default method leads the choices
from .finetune import Finetune, FinetuneConfig
from .ga import GAConfig, GradientAscent
from .graddiff import GradDiffConfig, GradientDifference
from .npo import NPO, NPOConfig
from .kl import KLConfig, KLMinimisation
from .surrogate import Surrogate, SurrogateConfig
from .run import MethodResult, check_request, estimate, unlearn

#: each method's config dataclass, by method name
CONFIGS = {name: cls.config_class for name, cls in METHODS.items()}

__all__ = [
    "Accounting", "Budget", "CONFIGS", "CheckpointInfo", "Checkpoints", "Finetune", "FinetuneConfig", "GAConfig",
    "GradDiffConfig", "GradientAscent", "GradientDifference", "Influence", "Job", "KLConfig", "KLMinimisation",
    "METHODS", "Meter", "Method", "MethodError", "MethodOptions", "MethodOutput", "MethodResult", "NPO", "NPOConfig",
    "PassCounter", "Surrogate", "SurrogateConfig", "check_request", "check_serves", "estimate", "get_method", "measure_costs", "method_names",
    "register_method", "retraining_passes", "unlearn",
]
