"""The batch engine: requests (Sequence), the torch-free scheduler, and the step loop over the model runner."""

from .engine import Engine, EngineCounters, StepInfo
from .sequence import RequestOutput, RunOutput, Sequence, Stats

__all__ = ["Engine", "EngineCounters", "StepInfo", "RequestOutput", "RunOutput", "Sequence", "Stats"]
