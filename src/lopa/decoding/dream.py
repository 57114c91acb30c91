"""`dream`: Dream's own sampler (Dream-org/Dream `_sample`), without a KV cache.

Every step runs the whole sequence (prompt + canvas) with full attention. With timesteps
t_i = linspace(1, eps, steps + 1), step i unmasks int(n_masked * (1 - t_{i+1} / t_i)) tokens (all that are
left at the last step): the most confident ones under the chosen algorithm (maskgit_plus: probability,
topk_margin: top-1 minus top-2, entropy: negative entropy), or, for "origin", each masked position
independently with that probability.
"""

from __future__ import annotations

import torch

from ..errors import PromptTooLongError
from .base import DecodeState, ForwardBatch, PredictSpec, Predictions, Step, Strategy

EPS = 1e-3
ALG_MEASURE = {"origin": "prob", "maskgit_plus": "prob", "topk_margin": "margin", "entropy": "neg_entropy"}


class DreamStrategy(Strategy):
    name = "dream"

    def __init__(self, cfg, spec) -> None:
        super().__init__(cfg, spec)
        self.steps = cfg.steps or cfg.gen_length
        self.timesteps = torch.linspace(1, EPS, self.steps + 1)
        self.rng = torch.Generator().manual_seed(cfg.seed)

    @property
    def predict_spec(self) -> PredictSpec:
        return PredictSpec(self.cfg.temperature, self.cfg.top_p, ALG_MEASURE[self.cfg.alg], (self.spec.mask_id,))

    def start(self, prompt: list[int]) -> DecodeState:
        P, T = len(prompt), len(prompt) + self.cfg.gen_length
        if T > self.spec.max_length:
            raise PromptTooLongError(
                f"prompt ({P} tokens) + gen_length ({self.cfg.gen_length}) = {T} exceeds the context ({self.spec.max_length})"
            )
        canvas = torch.full((T,), self.spec.mask_id, dtype=torch.int64)
        canvas[:P] = torch.tensor(prompt, dtype=torch.int64)
        return DecodeState(canvas=canvas, prompt_len=P)

    def _masked(self, state: DecodeState) -> torch.Tensor:
        return (state.canvas == self.spec.mask_id).nonzero()[:, 0]

    def propose(self, state: DecodeState) -> ForwardBatch | None:
        cols = self._masked(state)
        if len(cols) == 0 or state.rounds >= self.steps:
            state.done = True
            state.hit_round_cap = len(cols) > 0
            return None
        return ForwardBatch(state.canvas[None].clone(), 0, cols)  # whole sequence, nothing committed

    def accept(self, state: DecodeState, batch: ForwardBatch, preds: Predictions) -> int:
        i = state.rounds
        cols = batch.logit_cols
        n = len(cols)
        last = i == self.steps - 1
        if self.cfg.alg == "origin":
            p = 1.0 if last else float(1 - self.timesteps[i + 1] / self.timesteps[i])
            chosen = (torch.rand(n, generator=self.rng) < p).nonzero()[:, 0]
        else:
            count = n if last else int(n * float(1 - self.timesteps[i + 1] / self.timesteps[i]))
            chosen = torch.topk(preds.conf[0], count).indices if count > 0 else torch.empty(0, dtype=torch.int64)
        positions = cols[chosen]
        state.canvas[positions] = preds.tokens[0, chosen]
        state.rounds += 1
        hits = torch.isin(state.canvas[state.prompt_len:], torch.tensor(self.spec.eos_ids)).nonzero()
        if len(hits):  # EOS ends the answer: the rest of the canvas becomes EOS
            tail = state.canvas[state.prompt_len + int(hits[0]) + 1:]
            tail[tail == self.spec.mask_id] = self.spec.eos_ids[0]
        if self.cfg.trace:
            state.trace.append(Step(sorted(positions.tolist()), 0, []))
        return 0

    def output(self, state: DecodeState) -> list[int]:
        ids = state.canvas[state.prompt_len:]
        hits = torch.isin(ids, torch.tensor(self.spec.eos_ids)).nonzero()
        end = int(hits[0]) + 1 if len(hits) else len(ids)
        ids = ids[:end]
        holes = (ids == self.spec.mask_id).nonzero()
        return ids[: int(holes[0])].tolist() if len(holes) else ids.tolist()
