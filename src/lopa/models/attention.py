"""Attention masks (bool, True = may attend) shared by the runner, the trainer and the tests; the static path's
FlexAttention block mask, and its split over key chunks for steps too small to fill the GPU."""

from __future__ import annotations

import torch

try:  # FlexAttention's auxiliary outputs (torch >= 2.9; before, return_lse=True)
    from torch.nn.attention.flex_attention import AuxRequest as _AuxRequest
except ImportError:  # pragma: no cover - older torch
    _AuxRequest = None


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
                    groups: int = 1, splits: int = 1, kv_heads: int = 1):
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

    ``splits`` > 1 cuts the key tiles that row b reads at all (up to the last one any of its queries needs) into that
    many chunks of consecutive tiles, of ceil(tiles_b / splits) each, one per query head of the split layout
    (split_attention: [B, kv_heads * splits, groups * Qb, D], head h * splits + s reading chunk s of KV head h), so
    the kernel runs splits times more programs over shorter spans that follow the row's real length (still nothing
    host-side: the chunks are computed here); each chunk's lists hold only its own tiles (a chunk may hold none).
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
        allowed = (real & ((rel < 0) | own)) | (~real & (kv == 0))
        if splits > 1:  # head h * splits + s sees chunk s alone (the kernel reads no other tile; the eager one would)
            return allowed & (kv // (size * width[b]) == h % splits)
        return allowed

    full = (P // size).to(torch.int32)  # [B] tiles wholly inside the prefix; tile `full` holds P_b
    lo, hi = _query_tile_spans(P, branch, groups, size, n_q)  # [B, n_q] first / last key tile of each query tile
    empty = lo > hi  # [B, n_q] query tiles without a real query: tile 0 alone, where their queries see key 0
    # [B, n_q] the first partial tile (the one holding P_b, or tile 0), so also the count of full tiles before it
    first = torch.where(empty, 0, full[:, None]).to(torch.int32)[:, None]  # [B, 1, n_q]
    start = torch.maximum(lo, full[:, None] + 1)[:, None]  # [B, 1, n_q] window tiles past the one holding P_b
    hi = torch.clamp(hi, max=n_kv - 1)[:, None]
    # chunk s of row b's key tiles: [begin, end] ([B, splits, 1] each; one chunk of every tile without a split)
    if splits == 1:
        begin, end = torch.zeros_like(first), torch.full_like(first, n_kv - 1)
    else:
        tiles = torch.maximum(first, torch.where(hi >= start, hi, 0)).amax(-1, keepdim=True) + 1  # [B, 1, 1] read
        width = -(-tiles // splits)  # [B, 1, 1] tiles a chunk
        begin = torch.arange(splits, device=P.device, dtype=torch.int32)[:, None] * width
        end = torch.clamp(begin + width - 1, max=n_kv - 1)
        width = width.view(B).clone()  # read by mask_mod
        mark_batch_dynamic(width)
    has_first = (first >= begin) & (first <= end)  # [B, splits, n_q]: the tile holding P_b lies in the chunk
    lo_win = torch.maximum(start, begin)  # the chunk's run of window tiles [lo_win, hi_win]
    count = has_first.int() + (torch.minimum(hi, end) - lo_win + 1).clamp(min=0)  # [B, splits, n_q] partial tiles
    j = torch.arange(n_kv, device=P.device, dtype=torch.int32)
    run = lo_win[..., None] + j - has_first[..., None].int()  # the window tiles after the first one (if any)
    partial = torch.where(has_first[..., None] & (j == 0), first[..., None], run).clamp(0, n_kv - 1)
    full_count = torch.minimum(first - begin, end - begin + 1).clamp(min=0)  # [B, splits, n_q] full tiles in the chunk
    full_tiles = (begin[..., None] + j).clamp(max=n_kv - 1).expand(B, splits, n_q, n_kv)
    if splits > 1:  # one copy per KV head: head h * splits + s reads chunk s
        count, partial, full_count, full_tiles = (x.repeat(1, kv_heads, *[1] * (x.dim() - 2))
                                                  for x in (count, partial, full_count, full_tiles))
    mask = BlockMask.from_kv_blocks(count.to(torch.int32).contiguous(), partial.to(torch.int32).contiguous(),
                                    full_count.to(torch.int32).contiguous(), full_tiles.to(torch.int32).contiguous(),
                                    BLOCK_SIZE=size, mask_mod=mask_mod, seq_lengths=(groups * Qb, capacity),
                                    compute_q_blocks=False)
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


def split_attention(flex, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, **kw) -> torch.Tensor:
    """FlexAttention with the keys cut into chunks, for steps too small to fill the GPU: q [B, H, T, D] (the query
    heads of a KV head consecutive), k / v [B, Hkv, L, D], a block mask of step_block_mask(splits=S, kv_heads=Hkv,
    groups=H / Hkv) -> [B, Hkv, (H / Hkv) * T, D], the packed query axis of the unsplit call.

    The packed queries are repeated S times as query heads (head h * S + s reads chunk s of KV head h: enable_gqa),
    in one copy of q, so the kernel runs S times the programs, each over about 1/S of the span; the chunks' partial
    results are merged by their log-sum-exps (a chunk without keys has -inf and weighs 0). Equal to the unsplit
    attention up to rounding. ``kw``: flex's other options (kernel_options). models/fused.py compiles the whole call
    (Ops.split): the repeat and the merge become generated kernels around FlexAttention's.
    """
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    S, Q = block_mask.kv_num_blocks.shape[1] // Hkv, H // Hkv * T
    assert S > 1 and S * Hkv == block_mask.kv_num_blocks.shape[1], "a block mask of step_block_mask(splits >= 2)"
    qs = q.unflatten(1, (Hkv, H // Hkv))[:, :, None].expand(B, Hkv, S, H // Hkv, T, D).reshape(B, Hkv * S, Q, D)
    if _AuxRequest is None:  # torch < 2.9
        out, lse = flex(qs, k, v, block_mask=block_mask, enable_gqa=True, return_lse=True, **kw)
    else:
        out, aux = flex(qs, k, v, block_mask=block_mask, enable_gqa=True, return_aux=_AuxRequest(lse=True), **kw)
        lse = aux.lse
    lse = lse.view(B, Hkv, S, Q)
    weight = torch.softmax(lse.to(torch.promote_types(lse.dtype, torch.float32)), dim=2)[..., None]  # [B, Hkv, S, Q, 1]
    return (out.view(B, Hkv, S, Q, D) * weight).sum(2).to(q.dtype)


# FlexAttention compiles once per query length (compiled for dynamic lengths it ran at about half the speed:
# models/fused.py, _static_queries), so a step's query bucket Qb from KERNEL_PAD_MIN on is padded for the kernel to
# the next power of two: the buckets 384, 768, 1536, 3072 and 6144 attend as 512, 1024, 2048, 4096 and 8192, so
# a warm-up over slots of 8,192 positions compiles 11 kernel lengths for its 15 buckets (9 for 11 at 2,048
# positions). The padding queries sit past each query head's Qb, in query tiles of their own (Qk a multiple of the
# 128-query tile), and such a tile reads one key tile (step_block_mask); below 384 a padded tile would hold real
# queries, which read their whole span. Start-up seconds and step times: not yet measured on a GPU
# (docs/benchmarks.md, eighteenth session)
KERNEL_PAD_MIN = 384


def kernel_queries(Qb: int, least: int = KERNEL_PAD_MIN) -> int:
    """The FlexAttention query length of a step's rows of Qb queries: Qb below ``least``, else the next power of
    two."""
    return Qb if Qb < least else 1 << (Qb - 1).bit_length()


MAX_KEY_SPLITS = 16  # the chunks' partial outputs ([B, H, Qb, D] each) are merged in one more pass
# Split only where one row's step leaves the GPU at least this many times idle (one H100, Dream-7B shape, one request
# at k = 0 and an 8,192-token prefix: 16 chunks made the step 1.69x faster; 2 chunks at k = 7 gained 3% there and lost
# 10% at a 512-token prefix), in steps of at most twice the GPU's programs once split (8 requests at 16 chunks made
# a mixed workload 6% slower), for models whose keys are at least this wide (KV heads x head dim; the embedded
# model's 128 are not: its attention is a sliver of its step, unmeasured split)
MIN_KEY_SPLITS = 8
MIN_KV_WIDTH = 512


def key_splits(B: int, Qb: int, groups: int, kv_heads: int, head_dim: int, capacity: int, sms: int,
               size: int = 128) -> int:
    """How many chunks a step's keys are cut into (split_attention) so its FlexAttention fills ``sms``
    multiprocessors: the kernel runs one program per (row, KV head, query tile), B * kv_heads * ceil(groups * Qb /
    size); one request's decode step at Dream-7B shape (4 KV heads, 7 query heads each, Qb = 32) runs 8 programs on
    an H100's 132. Splits are a power of two (at most MAX_KEY_SPLITS) chosen per query bucket, so one more compile
    each; a slot of ``capacity`` keys keeps at least two tiles a chunk; the rest of the rule: MIN_KEY_SPLITS. 1 = no
    split (the CPU: ``sms`` 0)."""
    one = kv_heads * -(-groups * Qb // size)  # programs of one row
    if sms <= 0 or kv_heads * head_dim < MIN_KV_WIDTH:
        return 1
    splits = 1
    while 2 * splits * one <= sms and 2 * splits <= MAX_KEY_SPLITS and 4 * splits * size <= capacity:
        splits *= 2
    return splits if splits >= MIN_KEY_SPLITS and B * one * splits <= 2 * sms else 1


def mark_batch_dynamic(*tensors: torch.Tensor) -> None:
    """Tell torch.compile that dim 0 (the batch bucket B) of what the compiled FlexAttention reads may vary and
    everything else is fixed, so the kernel compiles once per query bucket for every B: q, k, v where it is called
    (models/fused.py), the block mask's tensors where it is built (step_block_mask). Only marks: nothing changes in
    eager code."""
    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 0)
        for dim in range(1, t.dim()):
            torch._dynamo.mark_static(t, dim)
