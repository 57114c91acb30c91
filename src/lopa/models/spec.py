"""What the rest of lopa may know about a loaded model beyond its module: token ids and the context limit."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """What a strategy may know about the model: token ids and the context limit."""

    mask_id: int
    eos_ids: tuple[int, ...]
    max_length: int  # context limit in positions (prompt + generation)
    vocab_size: int
    block_size: int | None = None  # block-diffusion models: the block size they were trained with (None: others)
