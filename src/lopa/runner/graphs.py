"""CUDA graphs for decode forwards: static buffers, one graph per (K, W bucket, key-length bucket).

An eager LoPA iteration at Dream-7B size is launch-bound (hundreds of small kernels). Here a decode forward
runs on static tensors instead: the window is padded to a multiple of WIDTH_STEP columns (padding columns
are masked out as keys), the K/V go to slots computed on the device, and attention reads a fixed span of
the cache rounded up to KEY_STEP positions (unused slots masked). The mask, positions and slots are built
inside the graph from the prefix length and window width, so an iteration sends one small host-to-device
copy (tokens, block ids, P, W) and reads back the predictions. Shapes then depend only on
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
from ..models.attention import padded_branch_mask
from .single import Runner

WIDTH_STEP = 16
KEY_STEP = 256


def round_up(x: int, step: int) -> int:
    return -(-x // step) * step


@dataclass
class Static:
    K: int
    Wb: int
    Lb: int
    host: torch.Tensor  # [K*Wb + Wb + 2] int64 (pinned on a GPU): tokens [K, Wb], block ids [Wb], P, W
    inputs: torch.Tensor  # the same on the device, copied in one transfer; the graph reads only this
    last_hidden: torch.Tensor  # [E]
    graph: torch.cuda.CUDAGraph | None = None
    out: tuple | None = None  # (hidden [K, Wb, E], Predictions on the device)


class GraphRunner(Runner):
    def __init__(self, *args, capture: bool | None = None, fuse: bool = False, **kw) -> None:
        super().__init__(*args, **kw)
        self.capture = self.device.type == "cuda" if capture is None else capture
        # fuse: softmax, argmax and confidence over the [K, Wb, V] logits in one compiled pass (models/fused.py)
        self.predict = torch.compile(predict, fullgraph=True) if fuse else predict
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
        self._fill(st, batch, P)
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
        cols = batch.logit_cols  # the predictions are [K, Wb]: copy them whole, select the columns on the host
        return Predictions(preds.tokens.cpu()[:, cols], preds.prob.cpu()[:, cols], preds.conf.cpu()[:, cols])

    def _allocate(self, K: int, Wb: int, Lb: int) -> Static:
        n = K * Wb + Wb + 2
        host = torch.zeros(n, dtype=torch.long, pin_memory=self.device.type == "cuda")
        E = self.model.config.hidden_size
        return Static(K, Wb, Lb, host, torch.zeros(n, dtype=torch.long, device=self.device),
                      torch.zeros(E, dtype=self.dtype, device=self.device))

    def _fill(self, st: Static, batch: ForwardBatch, P: int) -> None:
        """Stage the iteration's inputs on the host and send them in one copy (the mask is built on the device)."""
        K, W = batch.tokens.shape
        n = K * st.Wb
        tokens, blocks = st.host[:n].view(K, st.Wb), st.host[n:n + st.Wb]
        tokens[:, :W] = batch.tokens
        tokens[:, W:] = self.spec.mask_id
        if batch.block_ids is None:  # one block: every column sees every (unpadded) column of its branch
            blocks.zero_()
        else:  # padding columns form one more block after the last
            blocks[:W] = batch.block_ids
            blocks[W:] = int(batch.block_ids.max()) + 1
        st.host[-2], st.host[-1] = P, W
        st.inputs.copy_(st.host, non_blocking=True)  # safe: the previous iteration's results were read (synced)
        st.last_hidden.copy_(self.cache.last_hidden)

    def _body(self, st: Static, pspec: PredictSpec):
        """hidden [K, Wb, E] and device Predictions for every column of the padded window."""
        n = st.K * st.Wb
        P, W = st.inputs[-2], st.inputs[-1]
        tokens, blocks = st.inputs[:n].view(st.K, st.Wb), st.inputs[n:n + st.Wb]
        positions = P + torch.arange(st.Wb, device=self.device)  # [Wb]
        self.cache.static_index = P + torch.arange(n, device=self.device)  # [K*Wb] cache slots of the window
        self.cache.static_len = st.Lb
        allowed = padded_branch_mask(P, W, blocks, st.K, st.Wb, st.Lb)  # [K*Wb, Lb] bool
        # additive, in the model's dtype, built once: SDPA would turn a bool mask into this in every layer
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill_(~allowed, float("-inf"))
        hidden = self.model(tokens, cache=self.cache, attn_mask=mask, positions=positions)
        # [K, Wb, V] in the model's dtype: predict promotes to float32 itself (fused: inside its one pass)
        logits = self.model.lm_head(self.model.predicting_hidden(hidden, st.last_hidden))
        return hidden, self.predict(logits, pspec, None, to_cpu=False)

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
