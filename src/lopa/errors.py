"""Typed errors raised at lopa's edges. Front ends (CLI, server) map them to messages and exit codes."""


class LopaError(Exception):
    """Base class of every error lopa raises on purpose."""


class ConfigError(LopaError, ValueError):
    """A configuration value is outside its allowed range (the message names the field)."""


class CheckpointError(LopaError):
    """A model folder is missing, incomplete, corrupt, or does not match its config (names the file/tensor)."""


class UnsupportedModelError(CheckpointError):
    """config.json names a model_type lopa cannot run."""


class AdapterError(CheckpointError):
    """A PEFT adapter is malformed or was trained for another base model."""


class PromptTooLongError(LopaError, ValueError):
    """Prompt plus generation length exceeds the model's context."""


class QueueFullError(LopaError):
    """The server's bounded queue of requests is full; retry later (HTTP 429)."""


class EngineDeadError(LopaError):
    """The engine thread has stopped (a failed step or a shutdown); no request can be served (HTTP 503)."""


class BranchParallelError(LopaError):
    """A Branch Parallel rank died, hung past RunnerConfig.bp_timeout_s, or diverged from rank 0 (bp_check)."""


class OutOfMemoryError(LopaError):
    """An engine step ran out of device or host memory: its requests failed, the engine serves the rest."""
