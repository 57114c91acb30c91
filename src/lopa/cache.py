"""KV cache for many sequences: a pool of fixed slots allocated once, and the view one forward writes through.

``KVPool.kv`` is one zeroed tensor [2, L, S, Hkv, cap, D]: S slots, each the cache of one running request.
In a slot, positions [0, lengths[s]) are the committed prefix; a forward writes its window's K/V right after
it (request b's query q at P_b + q) and attends over [0, Lb) with the step mask (models/attention.py:
step_mask), so the prefix is read once for all of a request's branches and never copied per branch. The
last position, cap - 1, is a trash slot that padding queries may write and no query ever reads.

The tensor never moves while the pool lives (fixed addresses for CUDA graphs); ``resized`` makes a new one.
"""

from __future__ import annotations

import torch


def _head_rows(slots: torch.Tensor, Hkv: int, cap: int) -> torch.Tensor:
    """slots [N] -> [N, Hkv]: the row of position 0 of each (slot, KV head) in slots viewed as [S * Hkv * cap, D]."""
    return (slots[:, None] * Hkv + torch.arange(Hkv, device=slots.device)) * cap


class KVPool:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, hidden_size: int, slots: int,
                 capacity: int, device: torch.device | str, dtype: torch.dtype) -> None:
        self.kv = torch.zeros(2, num_layers, slots, num_kv_heads, capacity, head_dim, device=device, dtype=dtype)
        # [S, E] final hidden state at each slot's last committed position (zeros: finite when nothing is committed)
        self.last_hidden = torch.zeros(slots, hidden_size, device=device, dtype=dtype)
        self.lengths = [0] * slots  # committed prefix per slot (host; mirrors each running request's state.cached)

    @property
    def slots(self) -> int:
        return self.kv.shape[2]

    @property
    def capacity(self) -> int:
        return self.kv.shape[4]

    def view(self, first: int, B: int, Lb: int, write_index: torch.Tensor, Qk: int | None = None) -> "CacheView":
        return CacheView(self, first, B, Lb, write_index, Qk)

    def commit(self, slots: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy K/V at positions src to dst within each slot (index tensors [N] on the device, src never
        overlapping any dst): the winning branch's leading columns become committed positions. Entries may repeat
        a (slot, dst) only with the same src (the device path's idle entries copy the trash position onto itself).

        As rows of D features of one [2 * L, S * Hkv * cap, D] view: one row gather and one row scatter, instead of
        advanced indexing over two non-adjacent dims of the 6-D tensor."""
        _, L, S, Hkv, cap, D = self.kv.shape
        rows = self.kv.view(2 * L, S * Hkv * cap, D)
        base = _head_rows(slots, Hkv, cap)  # [N, Hkv]
        moved = rows.index_select(1, (base + src[:, None]).view(-1))  # [2L, N * Hkv, D], read before any write
        rows.index_copy_(1, (base + dst[:, None]).view(-1), moved)

    def move(self, moves: list[tuple[int, int]]) -> None:
        """Slots change places (engine/scheduler.py: Plan.moves): each (src, dst) moves slot src's committed K/V,
        last hidden state and length to dst, all at once (every source is read before any destination is written,
        so a rotation may reuse a slot another one leaves); a source no move refills is empty afterwards."""
        if not moves:
            return
        src, dst = [s for s, _ in moves], [d for _, d in moves]
        n = max(self.lengths[s] for s in src)
        index = torch.tensor([src, dst], dtype=torch.int64).to(self.kv.device)  # one copy to the device
        prefix = self.kv[:, :, :, :, :n]
        prefix.index_copy_(2, index[1], prefix.index_select(2, index[0]))  # every source gathered (a copy) first
        self.last_hidden.index_copy_(0, index[1], self.last_hidden.index_select(0, index[0]))
        lengths = [self.lengths[s] for s in src]
        for s in src:
            self.lengths[s] = 0
        for d, n in zip(dst, lengths):
            self.lengths[d] = n

    def resized(self, slots: int, capacity: int) -> "KVPool":
        """A pool of another size holding this one's committed K/V in its first ``slots`` slots (the caller
        drops whatever captured the old tensor; every live slot and committed position must fit)."""
        L, S, Hkv, D = self.kv.shape[1], min(slots, self.slots), self.kv.shape[3], self.kv.shape[5]
        n = max(self.lengths[:S], default=0)
        assert not any(self.lengths[S:]) and n <= capacity, (slots, capacity, self.lengths)
        new = KVPool(L, Hkv, D, self.last_hidden.shape[1], slots, capacity, self.kv.device, self.kv.dtype)
        new.kv[:, :, :S, :, :n] = self.kv[:, :, :S, :, :n]
        new.last_hidden[:S] = self.last_hidden[:S]
        new.lengths[:S] = self.lengths[:S]
        return new


class CacheView:
    """One forward's access to slots [first, first + B): where its queries' K/V go, which keys it reads.

    write_index [B, Qb] (device, int64): the position in its slot where each query's K/V are written. Qk: the
    attention's query length a row (FlexAttention's: models/attention.py, kernel_queries), Qb or more.
    """

    def __init__(self, pool: KVPool, first: int, B: int, Lb: int, write_index: torch.Tensor,
                 Qk: int | None = None) -> None:
        assert first + B <= pool.slots and Lb <= pool.capacity, (first, B, pool.slots, Lb, pool.capacity)
        assert write_index.shape[0] == B, write_index.shape
        self.pool, self.first, self.B, self.Lb, self.Qb = pool, first, B, Lb, write_index.shape[1]
        self.Qk = Qk or self.Qb
        assert self.Qk >= self.Qb, (self.Qk, self.Qb)
        # [B, Qb, Hkv]: each query's row, per KV head, in a layer's slots [first, first + B) viewed as
        # [B * Hkv * cap, D] (rows()), in the order k and v lie in memory ([B, Qb, Hkv, D]: the projection's,
        # transposed to [B, Hkv, Qb, D] as views), so writing them takes no copy
        rows = _head_rows(torch.arange(B, device=write_index.device), pool.kv.shape[3], pool.capacity)  # [B, Hkv]
        self.index = rows[:, None, :] + write_index[:, :, None]

    def rows(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's K and V of the view's slots, each [B * Hkv * cap, D] (views): where models/fused.py's
        rope_write puts this forward's K/V, at ``index``."""
        span = slice(self.first, self.first + self.B)
        D = self.pool.kv.shape[-1]
        return self.pool.kv[0, layer, span].view(-1, D), self.pool.kv[1, layer, span].view(-1, D)

    def keys(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """keys/values [B, Hkv, Lb, D] the layer's attention reads: strided views of the slots, no copy."""
        span = slice(self.first, self.first + self.B)
        return self.pool.kv[0, layer, span, :, :self.Lb], self.pool.kv[1, layer, span, :, :self.Lb]

    def to_rows(self, q: torch.Tensor) -> torch.Tensor:
        """q [B, H, Qb, D] as the attention's rows [B, H, Qk, D]: a padded step's are its rows already, zeros past
        Qb where the kernel's length is longer (FlatView lays its flat queries into them)."""
        return q if self.Qk == self.Qb else torch.nn.functional.pad(q, (0, 0, 0, self.Qk - self.Qb))

    def from_rows(self, out: torch.Tensor) -> torch.Tensor:
        """out [B, H, Qk, D] -> [B, Qb, H, D]."""
        return out[:, :, :self.Qb].transpose(1, 2)


class FlatView:
    """One forward on the flat query axis (ModelRunner.flat_body): its T queries are a step's rows back to back
    (runner/step.py: flatten), so the projections, norms and MLP run over T rows, not over B x Qb padded ones.
    They write their K/V through ``index`` (as CacheView's do) and attend as the padded step: ``to_rows`` lays
    each flat query into its place in the [B, Qk] rows of slots [first, first + B) (padding zero; Qk: the padded
    step's attention query length, CacheView's), the attention runs there under the padded step's block mask, and
    ``from_rows`` takes each flat query's output back.

    slot, position [T] (device, int64): where each query's K/V go (a padding query: its row's slot's trash
    position); place [T]: its place in the padded rows, row * Qk + its column (a padding query: -1).
    """

    def __init__(self, pool: KVPool, first: int, B: int, Qk: int, heads: int, slot: torch.Tensor,
                 position: torch.Tensor, place: torch.Tensor) -> None:
        assert first + B <= pool.slots, (first, B, pool.slots)
        self.pool, self.first, self.B, self.Qk, self.Lb = pool, first, B, Qk, pool.capacity
        # [1, T, Hkv]: each query's row, per KV head, in a layer's pool viewed as [S * Hkv * cap, D] (rows())
        self.index = (_head_rows(slot, pool.kv.shape[3], pool.capacity) + position[:, None])[None]
        # [T, H]: each (flat query, query head)'s row in the padded queries [B, H, Qk, D] viewed as [B * H * Qk, D];
        # padding goes to a spare row past them (to_rows) and reads row 0 (from_rows: never read)
        b, q = place.div(Qk, rounding_mode="floor"), place.remainder(Qk)
        h = torch.arange(heads, device=place.device)
        rows = (b[:, None] * heads + h) * Qk + q[:, None]
        self._to = torch.where(place[:, None] >= 0, rows, B * heads * Qk).view(-1)
        self._from = torch.where(place[:, None] >= 0, rows, 0).view(-1)

    def rows(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's K and V of every slot, each [S * Hkv * cap, D] (views)."""
        D = self.pool.kv.shape[-1]
        return self.pool.kv[0, layer].view(-1, D), self.pool.kv[1, layer].view(-1, D)

    keys = CacheView.keys  # the padded rows' slots, whole (Lb = capacity): [B, Hkv, cap, D] views

    def to_rows(self, q: torch.Tensor) -> torch.Tensor:
        """q [1, H, T, D] -> [B, H, Qk, D] (contiguous): each flat query at its place in the padded rows."""
        _, H, T, D = q.shape
        rows = q.new_zeros(self.B * H * self.Qk + 1, D)
        rows.index_copy_(0, self._to, q[0].transpose(0, 1).reshape(T * H, D))
        return rows[:-1].view(self.B, H, self.Qk, D)

    def from_rows(self, out: torch.Tensor) -> torch.Tensor:
        """out [B, H, Qk, D] of the padded rows -> [1, T, H, D] on the flat axis."""
        D = out.shape[-1]
        return out.reshape(-1, D)[self._from].view(1, -1, out.shape[1], D)
