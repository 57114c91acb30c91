"""lopa: fast diffusion-LLM inference with Lookahead PArallel decoding (LoPA).

    from lopa import load_model, generate
    model = load_model()                      # the embedded default model, or a Dream / LLaDA folder
    result = generate(model, "Question: ...", strategy="lopa", k=10)
    print(result.text, result.stats.tpf)
"""

from .api import GenerationResult, LopaModel, default_model_path, generate, generate_many, load_model
from .config import PRESETS, DecodeConfig, RunnerConfig, decode_config
from .errors import (
    AdapterError,
    BranchParallelError,
    CheckpointError,
    ConfigError,
    LopaError,
    OutOfMemoryError,
    PromptTooLongError,
    UnsupportedModelError,
)

__all__ = [
    "load_model", "generate", "generate_many", "default_model_path", "LopaModel", "GenerationResult",
    "DecodeConfig", "RunnerConfig", "PRESETS", "decode_config",
    "LopaError", "ConfigError", "CheckpointError", "UnsupportedModelError", "AdapterError", "PromptTooLongError",
    "BranchParallelError", "OutOfMemoryError",
]
