"""The static path: a decode step on bucketed shapes, replayed from CUDA graphs, one graph per shape key.

An eager LoPA iteration at Dream-7B size is launch-bound (hundreds of small kernels). Here a decode step
over B running requests runs on static buffers instead: B is rounded up to a bucket (padding rows are all
padding queries over free slots), each request row to Qb = a multiple of ROW_STEP queries, and the key span
to Lb = a multiple of KEY_STEP positions; positions, write slots and the mask are built inside the graph from
the packed step (runner/step.py), and the K/V pool is allocated once, so buffer addresses never change. A
step sends ONE host-to-device copy and reads back ONE packed [B, Qb, 3] tensor of predictions. One captured
graph serves every step with the same key (B bucket, Qb, Lb, the measures and suppressed ids in use).

Greedy requests only (temperature 0, top_p 1): steps with a sampled request, prefill steps and cache-less
windows run eagerly. On a CPU the same path runs without capture (the tests check it against eager).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..decoding.base import Predictions
from ..decoding.confidence import measure_confidence
from .step import FIELDS, StepItem, pack, split, unpack

ROW_STEP = 32  # request rows padded to a multiple of this many queries
KEY_STEP = 256  # KV slot capacities and key spans are multiples of this many positions
BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
MAX_GRAPHS = 256  # captured graphs kept; past this all are dropped and recaptured on demand


def round_up(x: int, step: int) -> int:
    return -(-x // step) * step


def bucket(n: int, slots: int) -> int:
    """The smallest bucket >= n, within the pool's slots (the pool size is always the last bucket)."""
    return min(next((b for b in BUCKETS if b >= n), n), slots)


def predict_rows(logits: torch.Tensor, measure: torch.Tensor, suppress: torch.Tensor, measures: tuple[str, ...],
                 suppress_ids: tuple[int, ...]) -> torch.Tensor:
    """Greedy predict (decoding/confidence.py) for every query of a step, each request row with its own
    measure and suppression. logits [B, Qb, V] -> [B, Qb, 3]: token id, its probability, its confidence."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32), copy=True)
    for token in suppress_ids:
        logits[..., token] = torch.where(suppress[:, None].bool(), float("-inf"), logits[..., token])
    probs = torch.softmax(logits, dim=-1)
    tokens = probs.argmax(-1)
    chosen = probs.gather(-1, tokens[..., None])[..., 0]
    conf = chosen
    for i, name in enumerate(measures):
        if name != "prob":
            conf = torch.where((measure == i)[:, None], measure_confidence(probs, chosen, name), conf)
    return torch.stack([tokens.to(chosen.dtype), chosen, conf], dim=-1)


@dataclass
class Static:
    host: torch.Tensor  # [B, 4*Qb + 3] int64 (pinned on a GPU): the packed step
    inputs: torch.Tensor  # the same on the device, one copy per step; the graph reads only this
    Lb: int
    graph: torch.cuda.CUDAGraph | None = None
    out: tuple | None = None  # (hidden [B, Qb, E], packed predictions [B, Qb, 3]) on the device


class GraphExecutor:
    def __init__(self, runner, capture: bool, fuse: bool = False) -> None:
        self.runner = runner
        self.capture = capture
        # fuse: softmax, argmax and confidence over the step's logits in one compiled pass (models/fused.py)
        self.predict = torch.compile(predict_rows, fullgraph=True) if fuse else predict_rows
        self.statics: dict[tuple, Static] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def clear(self) -> None:
        """Drop every graph (the KV pool they read was replaced); later captures go into a fresh graph pool."""
        self.statics.clear()
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None

    def supports(self, items: list[StepItem]) -> bool:
        suppress = {item.pspec.suppress_ids for item in items} - {()}
        return (items[0].slot == 0 and len(suppress) <= 1
                and all(item.pspec.temperature == 0 and item.pspec.top_p == 1.0 and not item.batch.prefill
                        and item.batch.start > 0 for item in items))

    def key(self, items: list[StepItem], queries: int | None = None) -> tuple:
        """``queries``: the most queries of a request row on any rank (Branch Parallel: every rank packs the same
        Qb, so the step's predictions gather as one [N, B, Qb, 3] tensor); default: these items'."""
        pool = self.runner.pool
        B = bucket(len(items), pool.slots)
        Qb = round_up(queries or max(item.queries for item in items), ROW_STEP)
        Lb = min(round_up(max(item.batch.start + item.queries for item in items), KEY_STEP), pool.capacity)
        measures = tuple(sorted({item.pspec.measure for item in items}))
        suppress = next((item.pspec.suppress_ids for item in items if item.pspec.suppress_ids), ())
        return B, Qb, Lb, measures, suppress

    def run(self, items: list[StepItem], spread: list[StepItem] | None = None,
            layouts: list[list[range]] | None = None, queries: int | None = None) -> tuple[torch.Tensor, list[Predictions]]:
        """``items``: this rank's rows of each request. Under Branch Parallel ``spread`` holds the whole
        requests, ``layouts`` which ranks computed which of their rows, and the predictions of every rank are
        gathered on the device before the one device-to-host copy."""
        key = self.key(items, queries)
        B, Qb, Lb, measures, suppress = key
        st = self.statics.get(key)
        fresh = st is None
        if fresh:
            if len(self.statics) >= MAX_GRAPHS:
                self.clear()
            cuda = self.runner.device.type == "cuda"
            host = torch.zeros(B, FIELDS * Qb + 3, dtype=torch.long, pin_memory=cuda)
            st = self.statics[key] = Static(host, torch.zeros_like(host, device=self.runner.device), Lb)
        pack(items, st.host, self.runner.spec.mask_id, measures, suppress)
        st.inputs.copy_(st.host, non_blocking=True)  # safe: the previous step's results were read (synced)
        if not self.capture:
            st.out = self._body(st, measures, suppress)
        elif fresh:
            self._capture(st, measures, suppress)
        else:
            st.graph.replay()
        hidden, packed = st.out
        if spread is None:
            preds = [Predictions(*p) for p in split(packed.cpu()[None], items)]  # the step's one device-to-host copy
        else:  # [N, B, Qb, 3]: one all_gather on the device, then the one copy to the host
            preds = [Predictions(*p) for p in split(self.runner.group.gather_packed(packed), spread, layouts)]
        return hidden, preds

    def _body(self, st: Static, measures, suppress):
        runner, model = self.runner, self.runner.model
        hidden = runner.body(st.inputs, 0, st.Lb)  # [B, Qb, E]
        _, col, branch, _, _, measure, suppressed = unpack(st.inputs)
        first = (col == 0) & (branch >= 0)  # each branch's column 0 reads the slot's last committed state
        B = hidden.shape[0]
        logits = model.lm_head(model.predicting_hidden(hidden, runner.pool.last_hidden[:B], first))  # [B, Qb, V]
        return hidden, self.predict(logits, measure, suppressed, measures, suppress)

    def _capture(self, st: Static, measures, suppress) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._body(st, measures, suppress)  # warm-up: lazy kernel initialization stays out of the graph
        torch.cuda.current_stream().wait_stream(stream)
        st.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(st.graph, pool=self.pool):
            st.out = self._body(st, measures, suppress)
        st.graph.replay()
