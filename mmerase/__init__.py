"""mmerase: make a fine-tuned (vision-)language model forget or correct training samples via influence functions
on its PEFT adapter."""

from .influence import Edit, InfluenceEngine, SolverConfig, SolveResult, Task

__all__ = ["Edit", "InfluenceEngine", "SolveResult", "SolverConfig", "Task"]
__version__ = "0.1.0"
