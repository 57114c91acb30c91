"""`dream`: Dream's own sampler (Dream-org/Dream `_sample`), without a KV cache.

Every step runs the whole sequence (prompt + canvas) with full attention. With timesteps
t_i = linspace(1, eps, steps + 1), step i unmasks int(n_masked * (1 - t_{i+1} / t_i)) tokens (all that are
left at the last step): the most confident ones under the chosen algorithm (maskgit_plus: probability,
topk_margin: top-1 minus top-2, entropy: negative entropy), or, for "origin", each masked position
independently with that probability.
"""

from __future__ import annotations

import torch

from .base import DecodeState, ForwardBatch, PredictSpec, Predictions, Step, Strategy, answer_ids, new_canvas, settle_eos

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
        return DecodeState(canvas=new_canvas(prompt, self.cfg.gen_length, self.spec), prompt_len=len(prompt))

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
        settle_eos(state.canvas, state.prompt_len, self.spec)
        if self.cfg.trace:
            state.trace.append(Step(sorted(positions.tolist()), 0, []))
        return 0

    def output(self, state: DecodeState) -> list[int]:
        return answer_ids(state.canvas, state.prompt_len, self.spec)
