"""Attention masks (bool, True = may attend) shared by the runner, the trainer and the tests."""

from __future__ import annotations

import torch

from .fused import mark_batch_dynamic


def block_causal_mask(block_ids: torch.Tensor) -> torch.Tensor:
    """[T] block index per position -> [T, T]: position i sees j iff block(j) <= block(i) (D2F's mask)."""
    return block_ids[None, :] <= block_ids[:, None]


def branch_mask(
    P: int,
    K: int,
    W: int,
    block_ids: torch.Tensor | None = None,
    lengths: tuple[int, ...] | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Mask for K branches of a W-column window over one shared P-position prefix: [K*W, P + K*W].

    Queries are the branches' columns flattened row-major (branch r, column i -> r*W + i); keys are the
    prefix followed by the branches' columns in the same order. Every query sees the whole prefix and only
    its own branch's columns: all of them (block_ids None) or those of its own and earlier blocks, never
    a padding column (col >= lengths[r]).
    """
    cols = torch.arange(W, device=device)
    within = torch.ones(W, W, dtype=torch.bool, device=device)  # [Wq, Wk]
    if block_ids is not None:
        within = block_causal_mask(block_ids.to(device))
    window = torch.block_diag(*[within] * K)  # [K*W, K*W]
    if lengths is not None:
        valid = cols[None, :] < torch.tensor(lengths, device=device)[:, None]  # [K, W]
        window &= valid.reshape(1, K * W)
    prefix = torch.ones(K * W, P, dtype=torch.bool, device=device)
    return torch.cat([prefix, window], dim=1)


def step_mask(P: torch.Tensor, branch: torch.Tensor, block: torch.Tensor, Lb: int) -> torch.Tensor:
    """The mask of one engine step, built on the device from per-query metadata: bool [B, Qb, Lb].

    Row b is one request: P [B] its committed prefix length; its queries q are its branches' window columns
    flattened branch-major, with branch [B, Qb] (-1 = padding) and block [B, Qb] per query. Query q wrote its
    K/V to key slot P_b + q. A real query sees the whole prefix and the keys written this step by its own
    branch's columns of its own and earlier blocks (branch_mask, per request). A padding query sees key 0
    only, so every softmax row stays finite. Nothing is read on the host: CUDA graphs capture it as is.
    """
    B, Qb = branch.shape
    j = torch.arange(Lb, device=P.device)
    rel = j[None] - P[:, None]  # [B, Lb] key slot relative to the request's window start
    src = rel.clamp(0, Qb - 1)  # the query that wrote key j this step (where 0 <= rel < Qb)
    key_branch = torch.where((rel >= 0) & (rel < Qb), branch.gather(1, src), -1)  # [B, Lb]
    key_block = block.gather(1, src)
    real = (branch >= 0)[:, :, None]  # [B, Qb, 1]
    own = (key_branch[:, None] == branch[:, :, None]) & (key_block[:, None] <= block[:, :, None])
    return (real & ((rel < 0)[:, None] | own)) | (~real & (j == 0))


def step_block_mask(P: torch.Tensor, branch: torch.Tensor, block: torch.Tensor, capacity: int, size: int = 128,
                    groups: int = 1):
    """The same mask as step_mask, as a FlexAttention BlockMask over each slot's WHOLE capacity, built on the
    device (no host read: CUDA graphs capture it as is, and one graph serves every prefix length).

    ``groups``: the query heads that share a KV head sit one after another on the query axis ([B, Hkv, groups *
    Qb, D]: each K/V tile is read once for all of them), so query index i is query i % Qb of the step.

    Keys are tiled in ``size``-position blocks. For request b the tiles wholly inside its prefix [0, P_b) are
    full (every query sees them: no mask evaluated); the tile holding P_b and the window's tiles that a query tile
    needs are partial (``mask_mod`` decides per key); the rest are skipped. A query tile needs only the window
    columns of the branches its queries belong to (each branch's run of columns, so with k lookaheads a tile reads
    about one branch's columns, not all k + 1): the kernel's work follows each query's real key span, not the
    capacity nor the whole step's window. In full tiles a padding query sees the prefix (step_mask: key 0 only);
    padding outputs are never read, and a tile of padding queries only (a row's tail past its K*W queries, a free
    slot) reads tile 0 alone, through mask_mod: key 0, whatever the prefix's length.
    """
    from torch.nn.attention.flex_attention import BlockMask

    B, Qb = branch.shape
    n_kv = capacity // size  # capacity is a multiple of the tile (runner: KEY_STEP)
    n_q = -(-groups * Qb // size)
    # fresh tensors, not views into the packed step: torch.compile guards on a view's offset and strides, which
    # change with B and Qb (one more compile per batch bucket)
    P, branch, block = (x.clone(memory_format=torch.contiguous_format) for x in (P, branch, block))
    mark_batch_dynamic(P, branch, block)

    def mask_mod(b, h, i, kv):
        n = branch.shape[1]  # Qb, static for torch.compile (an int in the closure turns dynamic at its 2nd value)
        q = i % n if groups > 1 else i
        rel = kv - P[b]
        src = rel.clamp(0, n - 1)
        real = branch[b, q] >= 0
        own = (rel >= 0) & (rel < n) & (branch[b, src] == branch[b, q]) & (block[b, src] <= block[b, q])
        return (real & ((rel < 0) | own)) | (~real & (kv == 0))

    full = (P // size).to(torch.int32)  # [B] tiles wholly inside the prefix; tile `full` holds P_b
    lo, hi = _query_tile_spans(P, branch, groups, size, n_q)  # [B, n_q] first / last key tile of each query tile
    empty = lo > hi  # [B, n_q] query tiles without a real query: tile 0 alone, where their queries see key 0
    start = torch.maximum(lo, full[:, None] + 1)  # window tiles past the one holding P_b
    count = 1 + (torch.clamp(hi, max=n_kv - 1) - start + 1).clamp(min=0)  # [B, n_q] partial tiles
    # [B, n_q] the first partial tile (the one holding P_b, or tile 0), so also the count of full tiles before it
    first = torch.where(empty, 0, full[:, None]).to(torch.int32)
    j = torch.arange(n_kv, device=P.device, dtype=torch.int32)
    partial = torch.where(j == 0, first[..., None], start[..., None] + j - 1).clamp(0, n_kv - 1)  # [B, n_q, n_kv]
    full_grid = first[:, None].contiguous()  # [B, 1, n_q]
    mask = BlockMask.from_kv_blocks(count.to(torch.int32)[:, None].contiguous(), partial[:, None].contiguous(),
                                    full_grid, j.expand(B, 1, n_q, n_kv).contiguous(), BLOCK_SIZE=size,
                                    mask_mod=mask_mod, seq_lengths=(groups * Qb, capacity), compute_q_blocks=False)
    mark_batch_dynamic(mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices)
    return mask


def _query_tile_spans(P: torch.Tensor, branch: torch.Tensor, groups: int, size: int,
                      n_q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The key tiles [lo, hi] holding the window columns that the real queries of each ``size``-query tile of the
    query axis (``groups`` copies of the step's Qb queries) may see: their branches' runs of columns, at keys
    P_b + column. A tile without a real query gets lo > hi. -> int32 [B, n_q] each."""
    B, Qb = branch.shape
    c = torch.arange(Qb, device=P.device)
    real = branch >= 0
    edge = branch.new_full((B, 1), -2)
    starts = real & (branch != torch.cat([edge, branch[:, :-1]], 1))  # a branch's first column
    ends = real & (branch != torch.cat([branch[:, 1:], edge], 1))  # its last
    first = torch.where(starts, c, 0).cummax(1).values  # [B, Qb] the first column of each column's run
    last = torch.where(ends, c, Qb).flip(1).cummin(1).values.flip(1)  # [B, Qb] its last column
    i = torch.arange(n_q * size, device=P.device)
    q = i % Qb
    ok = (i < groups * Qb)[None] & real[:, q]  # [B, n_q * size] real queries on the query axis
    far = torch.iinfo(torch.int32).max // 2  # past every tile
    lo = torch.where(ok, P[:, None] + first[:, q], far).view(B, n_q, size).amin(-1) // size
    hi = torch.where(ok, P[:, None] + last[:, q], -size).view(B, n_q, size).amax(-1) // size
    return lo.to(torch.int32), hi.to(torch.int32)

