"""One engine step's forward, described for the device: what each request contributes and how it is packed.

Row b of the forward is request b's K_b x W_b window, its branches flattened branch-major (branch r, column
c -> query r*W_b + c: the order attention always used for a request's branches), padded at the tail to Qb
queries. Each query carries four ints, staged on the host in one [B, 4*Qb + 3] int64 tensor and sent in ONE
host-to-device copy; the device builds positions, cache write slots and the mask from them:

    tokens  [Qb]  the window token (mask id on padding)
    col     [Qb]  window column (0 on padding)            position   = P_b + col
    branch  [Qb]  branch index, -1 = padding (also a published row's columns past its length)
    block   [Qb]  block id of the column (0 without block-causal attention)
    P, measure, suppress   the committed prefix length, the index of the row's confidence measure in the
                           step's measure list, whether the row never proposes the suppressed ids

Rows without a request (bucket padding, CUDA graphs) are all padding with P = 0. A padding query writes its
K/V only to its slot's trash position (runner/model_runner.py: body), so padding rows may lie over any slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..decoding.base import ForwardBatch, PredictSpec

FIELDS = 4  # token, col, branch, block


@dataclass
class StepItem:
    """One request's share of an engine step."""

    slot: int
    batch: ForwardBatch  # tokens [K, W]; batch.start must equal the slot's committed length
    pspec: PredictSpec
    generator: torch.Generator | None = None  # only when the request samples

    @property
    def queries(self) -> int:
        K, W = self.batch.tokens.shape
        return K * W


@dataclass
class Commit:
    slot: int
    index: int  # the request's position in the step (row b of the forward)
    row: int  # winning branch
    n: int  # leading window columns whose K/V become committed


def pack(items: list[StepItem], host: torch.Tensor, mask_id: int, measures: tuple[str, ...] | None = None,
         suppress_ids: tuple[int, ...] = (), row: int = 0) -> None:
    """Stage the step into ``host`` [B, 4*Qb + 3]: the items at rows row.., every other row padding.
    ``measures`` / ``suppress_ids``: the batched predict's (runner/graphs.py); None when each request predicts apart
    (a request whose measure is not listed asks for no prediction: index 0)."""
    B, width = host.shape
    Qb = (width - 3) // FIELDS
    fields = host[:, :FIELDS * Qb].view(B, FIELDS, Qb)
    tokens, col, branch, block = fields.unbind(1)
    tokens.fill_(mask_id)
    col.zero_()
    branch.fill_(-1)
    block.zero_()
    host[:, FIELDS * Qb:].zero_()
    for b, item in enumerate(items, row):
        batch = item.batch
        K, W = batch.tokens.shape
        Q = K * W
        tokens[b, :Q] = batch.tokens.reshape(-1)
        col[b, :Q] = torch.arange(W).repeat(K)
        rows = torch.arange(K).repeat_interleave(W)
        if batch.lengths is not None:  # rows of different lengths: the padding columns are padding queries
            rows = torch.where(col[b, :Q] < torch.tensor(batch.lengths).repeat_interleave(W), rows, -1)
        branch[b, :Q] = rows
        if batch.block_ids is not None:
            block[b, :Q] = batch.block_ids.repeat(K)
        host[b, FIELDS * Qb] = batch.start
        host[b, FIELDS * Qb + 1] = measures.index(item.pspec.measure) if item.pspec.measure in (measures or ()) else 0
        host[b, FIELDS * Qb + 2] = int(bool(suppress_ids) and item.pspec.suppress_ids == suppress_ids)


def unpack(inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The device copy of pack's tensor -> tokens, col, branch, block [B, Qb]; P, measure, suppress [B]."""
    B, width = inputs.shape
    Qb = (width - 3) // FIELDS
    tokens, col, branch, block = inputs[:, :FIELDS * Qb].view(B, FIELDS, Qb).unbind(1)
    P, measure, suppress = inputs[:, FIELDS * Qb:].unbind(1)
    return tokens, col, branch, block, P, measure, suppress


def split(packed: torch.Tensor, items: list[StepItem], layouts: list[list[range]] | None = None):
    """Host [N, B, Qb, 3] (each rank's packed predictions: token, prob, conf per query, in the predictions'
    dtype: token ids are exact in it) -> per request (tokens, prob, conf) [K, C] for its logit_cols.
    ``layouts[b][r]``: the rows of request b that rank r computed (its local rows 0..), in global order;
    None: every row on rank 0 (one process, or a request every rank computed alike)."""
    out = []
    for b, item in enumerate(items):
        K, W = item.batch.tokens.shape
        parts = layouts[b] if layouts is not None else [range(K)]
        rows = torch.cat([packed[r, b, :len(p) * W].view(len(p), W, 3) for r, p in enumerate(parts)])
        rows = rows[:, item.batch.logit_cols]  # [K, C, 3]
        out.append((rows[..., 0].long(), rows[..., 1], rows[..., 2]))
    return out



def pack_device(fields: tuple[torch.Tensor, ...], P: torch.Tensor, measure: torch.Tensor, suppress: torch.Tensor,
                B: int, mask_id: int) -> torch.Tensor:
    """pack's layout built on the device, for a step whose queries were built there (engine/device.py):
    fields = tokens, col, branch, block [n, Qb]; P, measure, suppress [n] -> [B, 4*Qb + 3] (rows past n are
    padding, as pack writes them)."""
    tokens = fields[0]
    n, Qb = tokens.shape
    out = torch.zeros(B, FIELDS * Qb + 3, dtype=torch.long, device=tokens.device)
    view = out[:, :FIELDS * Qb].view(B, FIELDS, Qb)
    view[:, 0] = mask_id
    view[:, 2] = -1
    view[:n] = torch.stack(fields, 1)
    out[:n, FIELDS * Qb:] = torch.stack([P, measure, suppress], 1)
    return out


# The flat query axis (ModelRunner.flat_body): the step's rows back to back, each padded to a multiple of a query tile.
# ONE int64 tensor [FLAT_FIELDS * T + ROW_FIELDS * R]: per flat query token, col, branch (-1 = padding), block and
# owner (its row); per row slot, P, start (its first flat query), Q (1 + its last real query), measure, suppress.
# Flat query t of row r is query t - start[r] of that row, its K/V written at P + t - start[r] of the row's slot.
FLAT_FIELDS, ROW_FIELDS = 5, 6


def flat_segments(branch: torch.Tensor, T: int, q_tile: int) -> tuple[torch.Tensor, ...]:
    """The flat query axis of a packed step (branch [B, Qb] of unpack): request row b's queries 0..Q_b-1 (Q_b =
    1 + its last real query, 0 for an all-padding row) back to back at start[b].., each segment padded to a multiple
    of ``q_tile``, T positions in all (at least the segments' total). -> Q [B], start [B], owner [T] (the row of
    each flat query; the tail past the segments: the last row), qidx [T] (its query within the row, >= Q on
    padding). Built on the device from static shapes: graph-capturable."""
    B, Qb = branch.shape
    dev = branch.device
    Q = ((torch.arange(1, Qb + 1, device=dev) * (branch >= 0)).amax(1))  # [B]
    seg = (Q + q_tile - 1) // q_tile * q_tile
    end = seg.cumsum(0)
    start = end - seg
    t = torch.arange(T, device=dev)
    owner = torch.searchsorted(end, t, right=True).clamp(max=B - 1)
    return Q, start, owner, t - start[owner]


def flatten(inputs: torch.Tensor, T: int, q_tile: int, mask_id: int, first: int = 0) -> torch.Tensor:
    """A packed step [B, 4*Qb + 3] over slots [first, first + B) -> its flat layout [FLAT_FIELDS * T + ROW_FIELDS * B]
    (T at least the rows' segments in all), on the device: graph-capturable."""
    tokens, col, branch, block, P, measure, suppress = unpack(inputs)
    B, Qb = tokens.shape
    Q, start, owner, qidx = flat_segments(branch, T, q_tile)
    q = qidx.clamp(max=Qb - 1)
    real = (qidx < Qb) & (branch[owner, q] >= 0)  # [T]
    fields = [torch.where(real, tokens[owner, q], mask_id), torch.where(real, col[owner, q], 0),
              torch.where(real, branch[owner, q], -1), torch.where(real, block[owner, q], 0), owner]
    rows = [first + torch.arange(B, device=inputs.device), P, start, Q, measure, suppress]
    return torch.cat([torch.stack(fields).view(-1), torch.stack(rows).view(-1)])


def unpack_flat(inputs: torch.Tensor, T: int) -> tuple[torch.Tensor, ...]:
    """The flat layout -> token, col, branch, block, owner [T]; slot, P, start, Q, measure, suppress [R]."""
    fields = inputs[:FLAT_FIELDS * T].view(FLAT_FIELDS, T).unbind(0)
    return (*fields, *inputs[FLAT_FIELDS * T:].view(ROW_FIELDS, -1).unbind(0))
