"""CUDA graphs for decode forwards: static buffers, one graph per (K, W bucket, key-length bucket).

An eager LoPA iteration at Dream-7B size is launch-bound (hundreds of small kernels). Here a decode forward
runs on static tensors instead: the window is padded to a multiple of WIDTH_STEP columns (padding columns
are masked out as keys), the K/V go to slots computed on the device, and attention reads a fixed span of
the cache rounded up to KEY_STEP positions (unused slots masked). Shapes then depend only on
(K, padded W, key span), so one captured graph serves every iteration with those shapes, across commits
and requests; the cache is allocated once, large enough, so buffer addresses never change.

Greedy decoding only (temperature 0): sampling, prefill and cache-less forwards run eagerly.
On a CPU the same static path runs without capture, which is how the tests check it against the eager path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..decoding.base import ForwardBatch, PredictSpec, Predictions
from ..decoding.confidence import predict
from ..models.attention import branch_mask
from .single import Runner

WIDTH_STEP = 16
KEY_STEP = 256


def round_up(x: int, step: int) -> int:
    return -(-x // step) * step


@dataclass
class Static:
    tokens: torch.Tensor  # [K, Wb]
    positions: torch.Tensor  # [Wb]
    index: torch.Tensor  # [K*Wb] cache slots of the window
    mask: torch.Tensor  # [K*Wb, Lb]
    last_hidden: torch.Tensor  # [E]
    graph: torch.cuda.CUDAGraph | None = None
    out: tuple | None = None  # (hidden [K, Wb, E], Predictions on the device)


class GraphRunner(Runner):
    def __init__(self, *args, capture: bool | None = None, **kw) -> None:
        super().__init__(*args, **kw)
        self.capture = self.device.type == "cuda" if capture is None else capture
        self.statics: dict[tuple, Static] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None

    def _new_cache(self, capacity: int):
        """Keep one cache across requests (fixed addresses for the graphs) while it is large enough."""
        if self.cache is not None and self.cache.capacity >= capacity:
            self.cache.length, self.cache.last_hidden = 0, None
            return self.cache
        # New buffers invalidate every graph; they are recaptured into a fresh pool (a pool whose graphs were
        # freed cannot take new captures). Over-allocate so that growth is rare.
        self.statics.clear()
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        return super()._new_cache(2 * capacity if self.cache is not None else capacity)

    def capacity_for(self, canvas_len: int, branches: int) -> int:
        return round_up(canvas_len * (branches + 1) + KEY_STEP, KEY_STEP)

    def forward(self, batch: ForwardBatch, pspec: PredictSpec) -> Predictions:
        K, W = batch.tokens.shape
        P = self.cache.length
        Wb = round_up(W, WIDTH_STEP)
        Lb = round_up(P + K * Wb, KEY_STEP)
        if pspec.temperature > 0 or batch.prefill or P == 0 or batch.lengths is not None or Lb > self.cache.capacity:
            return super().forward(batch, pspec)
        key = (K, Wb, Lb, pspec)
        st = self.statics.get(key)
        fresh = st is None
        if fresh:
            st = self.statics[key] = self._allocate(K, Wb, Lb)
        self._fill(st, batch, P, W, Wb)
        self.cache.static_index, self.cache.static_len = st.index, Lb
        try:
            if not self.capture:
                st.out = self._body(st, pspec)
            elif fresh:
                self._capture(st, pspec)
            else:
                st.graph.replay()
        finally:
            self.cache.static_index = None
        hidden, preds = st.out
        self._hidden, self._width = hidden, Wb  # commit reads branch rows at a stride of Wb
        cols = batch.logit_cols.to(self.device)
        return Predictions(preds.tokens[:, cols].cpu(), preds.prob[:, cols].cpu(), preds.conf[:, cols].cpu())

    def _allocate(self, K: int, Wb: int, Lb: int) -> Static:
        dev = self.device
        E = self.model.config.hidden_size
        return Static(torch.zeros(K, Wb, dtype=torch.long, device=dev), torch.zeros(Wb, dtype=torch.long, device=dev),
                      torch.zeros(K * Wb, dtype=torch.long, device=dev),
                      torch.zeros(K * Wb, Lb, dtype=torch.bool, device=dev), torch.zeros(E, dtype=self.dtype, device=dev))

    def _fill(self, st: Static, batch: ForwardBatch, P: int, W: int, Wb: int) -> None:
        K = batch.tokens.shape[0]
        st.tokens[:, :W].copy_(batch.tokens, non_blocking=True)
        st.tokens[:, W:] = self.spec.mask_id
        st.positions.copy_(torch.arange(P, P + Wb))
        st.index.copy_(torch.arange(P, P + K * Wb))
        block_ids = None
        if batch.block_ids is not None:  # padding columns form one more block after the last
            block_ids = torch.cat([batch.block_ids, torch.full((Wb - W,), int(batch.block_ids.max()) + 1)])
        mask = branch_mask(P, K, Wb, block_ids, (W,) * K)  # [K*Wb, P + K*Wb]; padding columns hidden as keys
        st.mask.zero_()
        st.mask[:, : mask.shape[1]].copy_(mask.to(self.device, non_blocking=True))
        st.last_hidden.copy_(self.cache.last_hidden)

    def _body(self, st: Static, pspec: PredictSpec):
        """hidden [K, Wb, E] and device Predictions for every column of the padded window."""
        hidden = self.model(st.tokens, cache=self.cache, attn_mask=st.mask, positions=st.positions)
        logits = self.model.lm_head(self.model.predicting_hidden(hidden, st.last_hidden)).float()  # [K, Wb, V]
        return hidden, predict(logits, pspec, None, to_cpu=False)

    def _capture(self, st: Static, pspec: PredictSpec) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._body(st, pspec)  # warm-up: lazy kernel initialization stays out of the graph
        torch.cuda.current_stream().wait_stream(stream)
        st.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(st.graph, pool=self.pool):
            st.out = self._body(st, pspec)
        st.graph.replay()
