"""The static decode path behind CUDA graphs: its batched predict and its mask equal the eager ones."""

import contextlib
import dataclasses
import gc
import warnings

import pytest
import torch

import lopa
from lopa.engine import Engine
from lopa.models import attention
from lopa.models.attention import branch_mask, step_mask
from lopa.runner import graphs
from lopa.runner.model_runner import ModelRunner
from lopa.runner.step import FIELDS


def test_static_path_with_fused_kernels_matches_eager(tiny_dream_dir, monkeypatch):
    """fuse=True compiles the batched confidence pass; the eager backend checks that it traces whole."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, **{**kw, "backend": "eager"}))
    model = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu"))
    loaded = model.loaded
    runner = ModelRunner(loaded.model, loaded.spec, torch.device("cpu"), torch.float32, max_num_seqs=2, static=True,
                         capture=False, fuse=True)
    assert runner.graphs.predict is not graphs.predict_rows
    fused = dataclasses.replace(model, runner=runner, engine=Engine(runner, loaded.spec, 2))
    cfgs = [lopa.DecodeConfig(strategy="lopa", k=3, gen_length=40, block_size=8, tau=0.5, trace=True),
            lopa.DecodeConfig(strategy="lopa", k=2, gen_length=24, block_size=8, tau=0.5, confidence="margin", trace=True)]
    prompts = ["Tom has 12 apples and", "The cat"]
    ref = [lopa.generate(model, p, c) for p, c in zip(prompts, cfgs)]
    got = lopa.generate_many(fused, prompts, cfgs)
    assert runner.graphs.statics, "the static path was not exercised"
    for a, b in zip(ref, got):
        assert a.token_ids == b.token_ids and [s.winner for s in a.trace] == [s.winner for s in b.trace]


def test_captures_hold_the_garbage_collector_off(monkeypatch):
    """graphs.capturing: no cyclic collection inside a capture (it may destroy an earlier model's CUDA graphs, which
    invalidates the capture), the collector's state restored after it, also when the capture raises."""
    seen = []
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, pool=None: contextlib.nullcontext())
    with graphs.capturing(None, None):
        seen.append(gc.isenabled())
    with pytest.raises(RuntimeError, match="boom"), graphs.capturing(None, None):
        seen.append(gc.isenabled())
        raise RuntimeError("boom")
    assert seen == [False, False] and gc.isenabled()
    gc.disable()
    try:
        with graphs.capturing(None, None):
            pass
        assert not gc.isenabled()  # left off as it was
    finally:
        gc.enable()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_garbage_freed_during_a_warm_up_does_not_break_its_captures(tiny_dream_dir, monkeypatch):
    """A CUDA graph left in a reference cycle (as a dropped model's are) and collected while the warm-up captures
    would be destroyed inside the capture, which invalidates it. Here every forward captured drops such a cycle and
    sets the collector to run at nearly every allocation: the warm-up still captures every key."""
    from lopa.models.transformer import Transformer

    x = torch.zeros(1, device="cuda")
    spares = []
    for _ in range(64):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            x.add_(1)
        spares.append(g)
    forward = Transformer.forward
    threshold = gc.get_threshold()

    def dropping(self, *args, **kwargs):
        capturing = torch.cuda.is_current_stream_capturing()
        gc.set_threshold(1 if capturing else threshold[0])  # while capturing, a collection at nearly every allocation
        if capturing and spares:
            cycle = [spares.pop()]
            cycle.append(cycle)  # unreachable after this call: only the collector frees it
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Transformer, "forward", dropping)
    try:
        model = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cuda", max_num_seqs=2,
                                                                         max_num_batched_tokens=128, warmup=True))
    finally:
        gc.set_threshold(*threshold)
    stats = model.runner.graphs.stats
    assert len(spares) < 64 and stats.captures == stats.warmup_graphs > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_replay_matches_eager_on_gpu(tiny_dream_dir):
    """Batched graph replay equals batched eager on the GPU in float32 (the tiny model): the host strategies' path
    (the device path's captured step: tests/engine/test_device_step.py)."""
    fast = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cuda", dtype="float32", max_num_seqs=4,
                                                                    device_step=False))
    slow = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cuda", dtype="float32", cuda_graphs=False,
                                                                    max_num_seqs=4, device_step=False))
    prompts = ["Tom has 12 apples and", "The cat sat", "A B C", "one two"]
    for strategy in ("d2f", "lopa"):
        a = lopa.generate_many(slow, prompts, strategy=strategy, k=3, gen_length=40, block_size=8)
        b = lopa.generate_many(fast, prompts, strategy=strategy, k=3, gen_length=40, block_size=8)
        assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert fast.runner.graphs.statics and all(s.graph is not None for s in fast.runner.graphs.statics.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernels run on a GPU")
def test_fused_kernels_decode_as_the_eager_ops_on_gpu(tiny_dream_dir):
    """On a GPU the compiled kernels (the elementwise chains, the cache write with k's RoPE: Ops.rope_write, the
    batched predict) decode the tokens the eager ops do, float32, through the same SDPA path; the CPU runs the
    eager ops only, so this is where the compiled write meets the engine."""
    runner = dict(device="cuda", dtype="float32", max_num_seqs=4, attention="sdpa")
    fused = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(**runner))
    eager = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(**runner, fuse=False))
    assert fused.fused and not eager.fused
    prompts = ["Tom has 12 apples and", "The cat sat", "A B C", "one two"]
    for strategy in ("d2f", "lopa"):
        a = lopa.generate_many(eager, prompts, strategy=strategy, k=3, gen_length=40, block_size=8)
        b = lopa.generate_many(fused, prompts, strategy=strategy, k=3, gen_length=40, block_size=8)
        assert [r.token_ids for r in a] == [r.token_ids for r in b]


@pytest.mark.parametrize("seed", range(6))
def test_step_mask_equals_branch_mask_per_request(seed):
    """For random mixes of requests (K, W, P, block ids, row lengths) the device-built step mask, on each
    request's real queries, is branch_mask embedded in the key span; padding queries read key 0 only."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    reqs = []
    for _ in range(rand(1, 5)):
        K, W, P = rand(1, 5), rand(1, 12), rand(0, 20)
        blocks = torch.sort(torch.randint(0, 3, (W,), generator=g)).values if rand(0, 2) else None
        lengths = tuple(rand(1, W + 1) for _ in range(K)) if rand(0, 3) == 0 else None
        if lengths is not None:
            lengths = lengths[:-1] + (W,)
        reqs.append((K, W, P, blocks, lengths))
    Qb = graphs.round_up(max(K * W for K, W, *_ in reqs), 8)
    Lb = max(P + Qb for _, _, P, *_ in reqs) + 3
    B = len(reqs) + 1  # one all-padding row
    branch = torch.full((B, Qb), -1)
    block = torch.zeros(B, Qb, dtype=torch.long)
    P_ = torch.zeros(B, dtype=torch.long)
    for b, (K, W, P, blocks, lengths) in enumerate(reqs):
        rows = torch.arange(K).repeat_interleave(W)
        cols = torch.arange(W).repeat(K)
        if lengths is not None:
            rows = torch.where(cols < torch.tensor(lengths).repeat_interleave(W), rows, -1)
        branch[b, :K * W] = rows
        if blocks is not None:
            block[b, :K * W] = blocks.repeat(K)
        P_[b] = P
    mask = step_mask(P_, branch, block, Lb)
    assert mask.any(-1).all()  # no query row is fully masked
    for b, (K, W, P, blocks, lengths) in enumerate(reqs):
        ref = branch_mask(P, K, W, blocks, lengths)  # [K*W, P + K*W]
        real = branch[b, :K * W] >= 0
        assert torch.equal(mask[b, :K * W, :P + K * W][real], ref[real])
        assert not mask[b, :K * W, P + K * W:][real].any()
    pad = branch < 0
    assert torch.equal(mask[pad], (torch.arange(Lb) == 0).expand(int(pad.sum()), Lb))


def _random_step(seed: int, size: int):
    """Packed-step metadata of a few random requests: P [B], branch and block [B, Qb] (the layout of step.py)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    B, Qb = rand(1, 4), rand(1, 3 * size)
    P = torch.tensor([rand(1, 5 * size) for _ in range(B)])
    branch = torch.full((B, Qb), -1)
    block = torch.zeros(B, Qb, dtype=torch.long)
    for b in range(B):
        K, W = rand(1, 4), rand(1, max(2, Qb // 3))
        Q = min(K * W, Qb)
        branch[b, :Q] = torch.arange(K).repeat_interleave(W)[:Q]
        block[b, :Q] = torch.sort(torch.randint(0, 3, (W,), generator=g)).values.repeat(K)[:Q]
    return P, branch, block, graphs.round_up(int(P.max()) + Qb + 1, size)


@pytest.mark.parametrize("seed,groups", [(s, 1 + s % 3) for s in range(12)])
def test_block_mask_tiles_cover_exactly_the_step_mask(seed, groups):
    """What the compiled FlexAttention kernel computes from the block mask (full tiles: every key; partial tiles:
    mask_mod; other tiles skipped) equals step_mask on every real query of every query tile, and each query tile
    reads no window tile past its own branches' columns: the kernel's work follows each query's real key span,
    not the capacity nor the whole window. (The eager FlexAttention on a CPU ignores the tiles, so this is
    checked here, on the tile lists themselves.) With ``groups`` query heads per KV head on the query axis, each
    repeats the step's queries."""
    size = 16
    P, branch, block, cap = _random_step(seed, size)
    bm = attention.step_block_mask(P, branch, block, cap, size, groups=groups)
    B, Qb = branch.shape
    want = step_mask(P, branch, block, cap).repeat(1, groups, 1)  # [B, groups * Qb, cap]
    kv, q = torch.arange(cap), torch.arange(groups * Qb)
    for b in range(B):
        real = (branch[b] >= 0).repeat(groups)
        for qt in range(-(-groups * Qb // size)):
            rows = q[qt * size:(qt + 1) * size]
            got = torch.zeros(len(rows), cap, dtype=torch.bool)
            full = bm.full_kv_indices[b, 0, qt, :int(bm.full_kv_num_blocks[b, 0, qt])]
            part = bm.kv_indices[b, 0, qt, :int(bm.kv_num_blocks[b, 0, qt])]
            assert not set(full.tolist()) & set(part.tolist()) and len(set(part.tolist())) == len(part)
            for t in full.tolist():
                got[:, t * size:(t + 1) * size] = True
            for t in part.tolist():
                keys = kv[t * size:(t + 1) * size]
                got[:, keys] = bm.mask_mod(torch.tensor(b), 0, rows[:, None], keys[None, :])
            assert torch.equal(got[real[rows]], want[b][rows][real[rows]]), (b, qt)
            # nothing past the last column of the tile's real queries' branches (the tile holding P_b at least); a
            # tile of padding queries reads tile 0 alone (its queries see key 0), whatever the prefix
            mine = {int(branch[b, i % Qb]) for i in rows.tolist() if real[i]}
            if not mine:
                assert full.tolist() == [] and part.tolist() == [0], (b, qt)
                continue
            cols = [c for c in range(Qb) if int(branch[b, c]) in mine]
            last = (int(P[b]) + max(cols)) // size
            assert max(full.tolist() + part.tolist()) == max(last, int(P[b]) // size), (b, qt)


def test_block_mask_query_tiles_read_their_own_branch():
    """k = 7 lookaheads over a 32-column window (Qb = 256): a 16-query tile lies inside one branch and reads the
    tile holding P and its branch's window tiles (2, or 3 when P is not tile-aligned), not the whole window's."""
    size, K, W = 16, 8, 32
    P = torch.tensor([16, 40])
    branch = torch.arange(K).repeat_interleave(W).repeat(2, 1)
    bm = attention.step_block_mask(P, branch, torch.zeros_like(branch), 512, size)
    assert bm.kv_num_blocks.shape == (2, 1, K * W // size)
    assert (bm.kv_num_blocks[0] <= 3).all() and (bm.kv_num_blocks[1] <= 4).all()  # the whole window: 16-17 tiles


def _packed_step(rng, size: int):
    """A step as pack() lays it out (runner/step.py): decode rows of K x W windows, some with rows of unequal
    lengths (padding columns at each row's tail) or block ids, prefill rows (one branch over the prompt), rows
    past the items all padding (P = 0), at P anywhere up to a capacity the step may fill exactly."""
    from lopa.decoding.base import ForwardBatch, PredictSpec
    from lopa.runner.step import StepItem, pack, unpack

    items = []
    for slot in range(rng.randint(1, 3)):
        kind = rng.choice(["window", "lengths", "blocks", "prefill"])
        K, W = (1, rng.randint(1, 3 * size + 5)) if kind == "prefill" else (rng.randint(1, 5), rng.randint(1, 2 * size))
        lengths = tuple(rng.randint(0, W) for _ in range(K)) if kind == "lengths" else None
        blocks = (torch.arange(W) + rng.randint(0, 3)) // rng.randint(1, 4) if kind == "blocks" else None
        P = rng.choice([0, rng.randint(0, 6 * size), rng.randint(1, 6) * size, rng.randint(1, 6) * size - 1])
        batch = ForwardBatch(torch.zeros(K, W, dtype=torch.long), P, torch.arange(0), block_ids=blocks,
                             lengths=lengths, prefill=kind == "prefill")
        items.append(StepItem(slot, batch, PredictSpec()))
    Qb = max(item.queries for item in items) + rng.choice([0, rng.randint(1, size)])
    host = torch.zeros(len(items) + rng.randint(0, 2), FIELDS * Qb + 3, dtype=torch.long)
    pack(items, host, 99)
    _, _, branch, block, P, _, _ = unpack(host)
    return P, branch, block, graphs.round_up(int((P + Qb).max()) + rng.randint(0, 1), size)


@pytest.mark.parametrize("seed", range(3))
def test_block_mask_equals_the_step_mask_on_packed_steps(seed):
    """The block mask's tiles expanded as the kernel reads them (full: every key; partial: mask_mod; others: none)
    equal step_mask on every real query of steps pack() lays out: rows of unequal lengths, prefill rows, block ids,
    all-padding rows, query tiles straddling two copies of the step's queries (groups > 1, Qb no multiple of the
    tile), windows reaching the slot's last tile; each padding query sees some key. With the keys split into
    chunks (one query head per chunk and KV head), each head's tiles lie in its own chunk and the chunks of a KV
    head together read exactly the unsplit tiles."""
    import random

    rng = random.Random(seed)
    for _ in range(40):
        size, groups = rng.choice([4, 8, 16]), rng.choice([1, 2, 3, 7])
        splits, kv_heads = rng.choice([(1, 1), (2, 1), (3, 2), (5, 1)])
        P, branch, block, cap = _packed_step(rng, size)
        B, Qb = branch.shape
        bm = attention.step_block_mask(P, branch, block, cap, size, groups=groups, splits=splits, kv_heads=kv_heads)
        assert bm.kv_num_blocks.shape[1] == (1 if splits == 1 else splits * kv_heads)
        # row b's chunks: ceil(tiles_b / splits) tiles each, tiles_b = 1 + the last tile the unsplit mask reads
        one = attention.step_block_mask(P, branch, block, cap, size, groups=groups)
        tiles = [1 + max(int(one.kv_indices[b, 0, qt, :int(one.kv_num_blocks[b, 0, qt])].max())
                         for qt in range(one.kv_num_blocks.shape[-1])) for b in range(B)]
        want = step_mask(P, branch, block, cap).repeat(1, groups, 1)
        kv, q = torch.arange(cap), torch.arange(groups * Qb)
        for h in range(kv_heads):
            got = torch.zeros_like(want)
            for s in range(splits):
                head = h * splits + s if splits > 1 else 0
                for b in range(B):
                    for qt in range(bm.kv_num_blocks.shape[-1]):
                        rows = q[qt * size:(qt + 1) * size]
                        full = bm.full_kv_indices[b, head, qt, :int(bm.full_kv_num_blocks[b, head, qt])].tolist()
                        part = bm.kv_indices[b, head, qt, :int(bm.kv_num_blocks[b, head, qt])].tolist()
                        assert not set(full) & set(part) and len(set(part)) == len(part)
                        width = -(-tiles[b] // splits)
                        assert all(s * width <= t < min((s + 1) * width, cap // size) for t in full + part)
                        for t in full:
                            assert not got[b, rows, t * size:(t + 1) * size].any()  # no tile read twice
                            got[b, rows, t * size:(t + 1) * size] = True
                        for t in part:
                            keys = kv[t * size:(t + 1) * size]
                            got[b, rows[:, None], keys] = bm.mask_mod(torch.tensor(b), head, rows[:, None],
                                                                      keys[None, :])
            real = (branch >= 0).repeat(1, groups)
            assert torch.equal(got[real], want[real]) and got.any(-1).all()


@pytest.mark.parametrize("splits", [2, 3, 8])
def test_split_attention_equals_the_unsplit_attention(splits):
    """split_attention (the keys in chunks, merged by their log-sum-exps) equals FlexAttention over the unsplit block
    mask on every real query, float64, eager, with the attention compiled and whole through torch.compile (Ops.split;
    eager backend), chunks without any key included (8 chunks over short prefixes)."""
    from lopa.models import fused

    ops = fused.compiled(backend="eager")
    for seed in range(4):
        size, Hkv, groups, D = 16, 2, 1 + seed % 3, 8
        P, branch, block, cap = _random_step(seed, size)
        B, Qb = branch.shape
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(B, Hkv, groups * Qb, D, dtype=torch.float64, generator=g)
        k, v = (torch.randn(B, Hkv, cap, D, dtype=torch.float64, generator=g) for _ in range(2))
        with torch.inference_mode():
            want = fused.EAGER.flex(q, k, v, block_mask=attention.step_block_mask(P, branch, block, cap, size,
                                                                                   groups=groups))
            mask = attention.step_block_mask(P, branch, block, cap, size, groups=groups, splits=splits, kv_heads=Hkv)
            heads = q.view(B, Hkv * groups, Qb, D)  # unpacked
            real = (branch >= 0).repeat(1, groups)[:, None].expand(B, Hkv, groups * Qb)
            for got in (fused.EAGER.split(heads, k, v, mask), attention.split_attention(ops.flex, heads, k, v, mask)):
                torch.testing.assert_close(got[real], want[real], rtol=1e-12, atol=1e-12)
            # traced whole, FlexAttention's log-sum-exps are float32 (as its kernels make them): float32's precision
            torch.testing.assert_close(ops.split(heads, k, v, mask)[real], want[real], rtol=1e-6, atol=1e-6)


def test_split_attention_falls_back_to_the_unfused_form_where_its_compile_fails():
    """Ops.split whose whole compile raises: a warning once, then the unfused form (the attention alone compiled),
    with the same output; later calls do not try the compile again."""
    from lopa.models import fused

    calls = []

    def refusing(*args):
        calls.append(args)
        raise RuntimeError("no kernel for this")

    split = fused._or_unfused(refusing, fused.EAGER.flex)
    P, branch, block, cap = _random_step(0, 16)
    B, Qb = branch.shape
    q = torch.randn(B, 4, Qb, 8, dtype=torch.float64)
    k, v = (torch.randn(B, 2, cap, 8, dtype=torch.float64) for _ in range(2))
    with torch.inference_mode():
        mask = attention.step_block_mask(P, branch, block, cap, 16, groups=2, splits=2, kv_heads=2)
        with pytest.warns(RuntimeWarning, match="did not compile whole"):
            got = split(q, k, v, mask)
        torch.testing.assert_close(got, fused.EAGER.split(q, k, v, mask), rtol=0, atol=0)
        split(q, k, v, mask)
    assert len(calls) == 1


def test_split_attention_keeps_its_fused_form_when_the_gpu_runs_out_of_memory():
    """An out-of-memory error from Ops.split's whole compile (or its kernel) is not a compiler's refusal: it reaches
    the caller with no warning, and the next call tries the fused form again."""
    from lopa.models import fused

    calls = []

    def out_of_memory(*args):
        calls.append(args)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    split = fused._or_unfused(out_of_memory, fused.EAGER.flex)
    q, kv = torch.randn(1, 4, 32, 8), torch.randn(1, 2, 64, 8)
    for _ in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning
            with pytest.raises(torch.cuda.OutOfMemoryError):
                split(q, kv, kv, None)
    assert len(calls) == 2


def test_key_splits_fill_the_gpu_only_where_a_step_leaves_it_idle():
    """One request at Dream-7B shape (4 KV heads of 7 query heads, an H100's 132 multiprocessors): Qb = 32 runs 8
    programs, so its keys split 16 ways (128 programs; MAX_KEY_SPLITS), as do 2 requests, not 3 (over twice the GPU
    once split); Qb = 64 splits 8 ways; longer windows would split 4 or 2 ways (under MIN_KEY_SPLITS: not at all);
    a short slot less (two tiles a chunk at least); narrow keys (the embedded model), LLaDA's 32 KV heads and a CPU
    (0 multiprocessors) never."""
    dream = dict(groups=7, kv_heads=4, head_dim=128, capacity=8192, sms=132)
    assert attention.key_splits(1, 32, **dream) == 16 == attention.key_splits(2, 32, **dream)
    assert attention.key_splits(3, 32, **dream) == 1  # 384 programs split: over twice the GPU
    assert [attention.key_splits(1, Qb, **dream) for Qb in (64, 96, 256)] == [8, 1, 1]  # 4 and 2 chunks: not worth it
    assert attention.key_splits(2, 64, **dream) == 8 and attention.key_splits(3, 64, **dream) == 1
    assert attention.key_splits(1, 32, **{**dream, "capacity": 2048}) == 8
    assert attention.key_splits(1, 32, **{**dream, "capacity": 1024}) == 1  # 4 chunks at most
    assert attention.key_splits(1, 32, **{**dream, "sms": 0}) == 1
    assert attention.key_splits(1, 32, **{**dream, "kv_heads": 2, "head_dim": 64}) == 1  # the embedded model's keys
    llada = dict(groups=1, kv_heads=32, head_dim=128, capacity=8192, sms=132)  # 32 programs a row: 4 chunks at most
    assert attention.key_splits(1, 32, **llada) == 1


def test_load_model_hands_key_splits_to_the_runner(tiny_dream_dir):
    """RunnerConfig.key_splits reaches the runner (None = by the multiprocessors: a CPU has none); 0 is refused."""
    model = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu", key_splits=3))
    assert model.runner.splits_of(1, 32, 8192) == 3 and model.runner.sms == 0
    assert lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu")).runner.splits_of(1, 32, 8192) == 1
    with pytest.raises(lopa.ConfigError, match="key_splits"):
        lopa.RunnerConfig(key_splits=0)


@pytest.mark.parametrize("attn", ["flex", "sdpa"])
def test_static_keys_do_not_depend_on_lengths_under_flex(tiny_dream_dir, attn):
    """Under "flex" a static key holds no prefix length: requests with prompts of very different lengths reuse
    one graph key; under "sdpa" the key span Lb is part of the key. Tokens equal the eager path in both."""
    model = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu"))
    loaded = model.loaded
    runner = ModelRunner(loaded.model, loaded.spec, torch.device("cpu"), torch.float32, max_num_seqs=1, static=True,
                         capture=False, attention=attn, max_positions=1024)  # a fixed pool: no graph is dropped
    static = dataclasses.replace(model, runner=runner, engine=Engine(runner, loaded.spec, 1))
    cfg = lopa.DecodeConfig(strategy="lopa", k=2, gen_length=16, block_size=8, tau=0.5)
    prompts = ["a b", "Tom has 12 apples and " * 30]
    assert [r.token_ids for r in lopa.generate_many(static, prompts, cfg)] == \
        [lopa.generate(model, p, cfg).token_ids for p in prompts]
    spans = {key[2] for key in runner.graphs.statics}
    assert (spans == {runner.slot_capacity()}) if attn == "flex" else len(spans) > 1


def test_warmup_captures_every_key_and_then_nothing_new(tiny_dream_dir):
    """After warmup() the static path never adds a key: steps whose key was not warmed run eagerly (counted), and
    the engine's counters report no capture after start-up. CPU: the bodies run once instead of a capture."""
    model = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu"))
    loaded = model.loaded
    runner = ModelRunner(loaded.model, loaded.spec, torch.device("cpu"), torch.float32, max_num_seqs=2,
                         max_positions=512, static=True, capture=False, attention="flex")
    stats = runner.warmup(max_tokens=64)
    keys = set(runner.graphs.statics)
    assert stats.warmup_graphs == len(keys) == 3  # (B, Qb) in (1, 32), (1, 64), (2, 32): B * Qb <= 64
    warm = dataclasses.replace(model, runner=runner, engine=Engine(runner, loaded.spec, 2))
    cfgs = [lopa.DecodeConfig(strategy="d2f", gen_length=16, block_size=8, tau=0.5),
            lopa.DecodeConfig(strategy="lopa", k=7, gen_length=16, block_size=8, tau=0.5)]  # 8 rows: past 64 queries
    got = lopa.generate_many(warm, ["Tom has 12 apples and", "The cat"], cfgs)
    assert [r.token_ids for r in got] == [lopa.generate(model, p, c).token_ids
                                          for p, c in zip(["Tom has 12 apples and", "The cat"], cfgs)]
    assert set(runner.graphs.statics) == keys
    c = warm.engine.counters
    assert c.captures_after_start == 0 and c.eager_decode_steps > 0
    assert c.as_dict()["eager_decode_steps"] == c.eager_decode_steps
    # the prompts' prefill ran on warmed keys; two prompts of 44 and 2 tokens (key (2, 64), not warmed) prefill as
    # two forwards on warmed keys; a prompt of 88 tokens, past every warmed query bucket, prefills eagerly (counted)
    assert runner.prefill_shapes <= {k[:2] for k in keys} and c.eager_prefill_steps == 0
    prompts = ["Tom has 12 apples and " * 4, "The cat", "Tom has 12 apples and " * 8]
    got = lopa.generate_many(warm, prompts, cfgs[:1] * 3)
    assert [r.token_ids for r in got] == [lopa.generate(model, p, cfgs[0]).token_ids for p in prompts]
    assert runner.prefill_shapes == {(1, 32), (1, 64), (2, 32), (1, 88)} and set(runner.graphs.statics) == keys
    assert warm.engine.counters.eager_prefill_steps == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="start-up capture needs a GPU")
def test_load_model_warms_up_and_nothing_compiles_or_captures_after(tiny_dream_dir):
    """On a GPU load_model captures the graph set; then varied prompts and k run with torch.compile set to fail on
    any recompile, and the counters report no capture or recompile after start-up."""
    model = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cuda", dtype="float32", max_num_seqs=4,
                                                                     max_num_batched_tokens=2048, warmup=True))
    assert model.runner.graphs.attention == "flex"  # "auto" with the warm-up
    stats = model.runner.graphs.stats
    assert stats.warmup_graphs > 0 and stats.captures == stats.warmup_graphs
    # after the first key a query bucket already seen with the same key splits compiles nothing, a new one at most
    # its attention (dynamic in the batch; torch versions that also make it dynamic in the queries compile nothing
    # more at all)
    seen, later = set(), []
    for key, n in zip(model.runner.graphs.statics, stats.warmup_key_compiles):
        splits = model.runner.splits_of(*key[:3])
        later.append((key[:2], splits, n, (key[1], splits) in seen))
        seen.add((key[1], splits))
    assert all(n <= (0 if old else 1) for _, _, n, old in later[1:]), later
    prompts = ["a", "Tom has 12 apples and " * 12, "The cat sat", "one two three four five six seven"]
    cfgs = [lopa.DecodeConfig(strategy=s, k=k, gen_length=24, block_size=8)
            for s, k in (("lopa", 7), ("d2f", 0), ("lopa", 3), ("threshold", 0))]
    ref = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cuda", dtype="float32", cuda_graphs=False,
                                                                   max_num_seqs=4))
    want = [r.token_ids for r in lopa.generate_many(ref, prompts, cfgs)]
    with torch.compiler.set_stance("fail_on_recompile"):
        got = [r.token_ids for r in lopa.generate_many(model, prompts, cfgs)]
    assert got == want
    c = model.engine.counters
    assert c.captures_after_start == 0 and c.recompiles_after_start == 0 and c.eager_decode_steps == 0
    assert c.eager_prefill_steps == 0 and model.runner.prefill_shapes <= {k[:2] for k in model.runner.graphs.statics}


def test_warm_up_order_puts_the_key_of_the_most_queries_first():
    """graphs.largest_first: the key of the most queries (B x Qb; ties to the larger B) leads, every other key
    follows in the order given, none lost or repeated; an empty list stays empty."""
    keys = [(1, 32, 512), (1, 256, 512), (2, 32, 512), (32, 256, 512), (16, 512, 512), (4, 64, 512)]
    assert graphs.largest_first(keys) == [(32, 256, 512), (1, 32, 512), (1, 256, 512), (2, 32, 512),
                                          (16, 512, 512), (4, 64, 512)]
    assert graphs.largest_first([(1, 64, 8), (2, 32, 8)]) == [(2, 32, 8), (1, 64, 8)]
    assert graphs.largest_first(keys[:1]) == keys[:1] and graphs.largest_first([]) == []


def test_warmup_compiles_flex_attention_once_per_query_bucket(tiny_dream_dir):
    """The compiled FlexAttention is dynamic in the batch from its first call: warming B buckets {1, 2, 4} x two
    query buckets traces one graph per query bucket, and buckets padded to one kernel length share its graph
    (dynamo with the eager backend: graphs are traced and counted, nothing is generated). Only the attention is
    compiled here, so graphs.compiles() counts its graphs alone."""
    from lopa.models import fused

    model = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu"))
    loaded = model.loaded
    flex = fused.compiled(backend="eager").flex
    loaded.model.ops = dataclasses.replace(fused.EAGER, flex=flex)
    torch._dynamo.reset()
    try:
        runner = ModelRunner(loaded.model, loaded.spec, torch.device("cpu"), torch.float32, max_num_seqs=4,
                             max_positions=512, static=True, capture=False, attention="flex")
        runner.reserve(4, runner.slot_capacity())
        keys = [k for k in runner.graphs.warmup_keys(max_tokens=4 * 64) if k[0] in (1, 2, 4) and k[1] in (32, 64)]
        assert sorted(k[:2] for k in keys) == [(b, q) for b in (1, 2, 4) for q in (32, 64)]
        stats = runner.graphs.warmup(keys)
        assert stats.warmup_compiles == 2  # one per query bucket (was 4: B = 1, then B >= 2, per query bucket)
        assert len(stats.warmup_key_s) == len(keys) and stats.warmup_key_compiles.count(1) == 2
        # buckets from kernel_pad_min on attend on the next power of two (models/attention.py: kernel_queries): the
        # buckets 96 and 128 share one kernel, 64 keeps its own
        torch._dynamo.reset()
        runner = ModelRunner(loaded.model, loaded.spec, torch.device("cpu"), torch.float32, max_num_seqs=4,
                             max_positions=512, static=True, capture=False, attention="flex")
        runner.reserve(4, runner.slot_capacity())
        runner.kernel_pad_min = 96
        keys = [k for k in runner.graphs.warmup_keys(max_tokens=4 * 128) if k[0] in (1, 2) and k[1] in (64, 96, 128)]
        assert len(keys) == 6 and runner.graphs.warmup(keys).warmup_compiles == 2
    finally:
        loaded.model.ops = fused.EAGER
        torch._dynamo.reset()


def _prefill(slot: int, prompt: torch.Tensor, block: int | None = None, predict_next: bool = False):
    """A prompt prefill as the strategies build it: one row over [0, n), committed whole; with ``block`` under the
    block-causal mask (block diffusion); ``predict_next``: one more mask column predicted (Fast-dLLM v2)."""
    from lopa.decoding.base import ForwardBatch, PredictSpec
    from lopa.runner.step import StepItem

    n = len(prompt)
    tokens = torch.cat([prompt, torch.tensor([7])]) if predict_next else prompt
    cols = torch.tensor([n]) if predict_next else torch.empty(0, dtype=torch.long)
    ids = torch.arange(len(tokens)) // block if block else None
    batch = ForwardBatch(tokens[None].clone(), 0, cols, commit=n, block_ids=ids, prefill=True)
    return StepItem(slot, batch, PredictSpec(suppress_ids=(0,)))


@pytest.mark.parametrize("family", ["dream", "llada"])
def test_static_prefill_equals_eager_and_leaves_running_slots_alone(family, tiny_dream_dir, tiny_llada_dir):
    """Prefill steps on the "flex" static path (rows padded to a query bucket, prompts of lengths that are no multiple
    of the block size) write the same K/V and last hidden states as the eager prefill in float64, predict the same,
    and the padding row laid over a running slot (a prefill over slots 1..5 uses the B = 6 bucket from slot 0)
    changes none of its K/V."""
    from lopa.runner.step import Commit

    folder = tiny_dream_dir if family == "dream" else tiny_llada_dir
    loaded = lopa.load_model(folder, runner=lopa.RunnerConfig(device="cpu", dtype="float64")).loaded
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 200, (n,), generator=g) for n in (5, 8, 13, 21, 3, 30)]
    runners = []
    for static in (False, True):
        r = ModelRunner(loaded.model, loaded.spec, torch.device("cpu"), torch.float64, max_num_seqs=6,
                        max_positions=256, static=static, capture=False, attention="flex")
        r.reserve(6, r.slot_capacity())
        steps = [[_prefill(0, prompts[0])],  # slots 0..: the key's own path
                 [_prefill(1, prompts[1], block=4), _prefill(2, prompts[2]), _prefill(3, prompts[3], predict_next=True),
                  _prefill(4, prompts[4]), _prefill(5, prompts[5], block=8)]]
        preds = []
        for step in steps:
            before = r.pool.kv[:, :, 0].clone()
            with torch.inference_mode():
                preds.append(r.execute(step))
                r.commit([Commit(item.slot, i, 0, item.batch.commit) for i, item in enumerate(step)])
            if step[0].slot:  # slot 0 holds a committed prompt: untouched, trash position included
                assert torch.equal(r.pool.kv[:, :, 0], before)
        runners.append((r, preds))
    (eager, want), (static, got) = runners
    assert static.prefill_shapes == {(1, 32), (6, 32)} and eager.prefill_shapes == {(1, 5), (5, 30)}
    tight = dict(rtol=1e-12, atol=1e-12)
    for slot, p in enumerate(prompts):
        n = len(p)
        torch.testing.assert_close(static.pool.kv[:, :, slot, :, :n], eager.pool.kv[:, :, slot, :, :n], **tight)
        torch.testing.assert_close(static.pool.last_hidden[slot], eager.pool.last_hidden[slot], **tight)
    assert static.pool.lengths == eager.pool.lengths == [5, 8, 13, 21, 3, 30]
    a, b = want[1][2], got[1][2]  # the prediction of the prefill that asks for one
    assert torch.equal(a.tokens, b.tokens) and torch.allclose(a.prob, b.prob, **tight)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA graphs need a GPU"))])
def test_a_prefill_split_into_groups_that_replay_one_graph_keeps_each_groups_hidden(tiny_dream_dir, device):
    """After the warm-up a prefill step without a warmed key is split into groups; a later group laid into rows
    first.. of the warmed graph over slots 0.. may replay the SAME graph as the first group (here: 9 short prompts
    at slots 0..8, key (11, 32); a 150-token prompt that joins no group; one more short prompt at slot 10, laid
    into that key's rows). The replay overwrites the graph's static outputs, so each group's hidden states must be
    taken before the next group runs: every slot's K/V and last hidden state equal the eager prefill's. (The CPU
    path writes into the key's outputs in place, as a replay does; on a GPU the graphs are captured, float32.)"""
    from lopa.runner.step import Commit

    dtype = torch.float64 if device == "cpu" else torch.float32
    loaded = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device=device, dtype=str(dtype)[6:])).loaded
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 200, (n,), generator=g) for n in (5, 8, 13, 21, 3, 30, 9, 17, 4, 150, 11)]
    step = [_prefill(slot, p) for slot, p in enumerate(prompts)]
    runners = []
    for static in (False, True):
        r = ModelRunner(loaded.model, loaded.spec, torch.device(device), dtype, max_num_seqs=11,
                        max_positions=256, static=static, capture=static and device == "cuda", attention="flex")
        if static:
            r.warmup(max_tokens=360)
            assert r.graphs.plan(step) == [step[:9], step[9:10], step[10:]]
        else:
            r.reserve(11, r.slot_capacity())
        with torch.inference_mode():
            r.execute(step)
            r.commit([Commit(item.slot, i, 0, item.batch.commit) for i, item in enumerate(step)])
        runners.append(r)
    eager, static = runners
    assert (11, 32) in static.prefill_shapes  # the first group's key, replayed again by the last group
    tight = dict(rtol=1e-12, atol=1e-12) if device == "cpu" else dict(rtol=1e-4, atol=1e-4)
    for slot, p in enumerate(prompts):
        torch.testing.assert_close(static.pool.kv[:, :, slot, :, :len(p)], eager.pool.kv[:, :, slot, :, :len(p)],
                                   **tight)
        torch.testing.assert_close(static.pool.last_hidden[slot], eager.pool.last_hidden[slot], **tight)


@pytest.mark.parametrize("family", ["dream", "llada"])
def test_prefills_on_the_static_path_decode_as_alone(family, tiny_dream_dir, tiny_llada_dir, monkeypatch):
    """End to end on the "flex" static path (no capture, CPU float32): prompts of several lengths (none a multiple
    of the block size) join at staggered steps, so prefills run over slot 0 and over higher slots beside running
    requests; full and block-causal windows. Tokens equal each request decoded alone on the eager path, and every
    prefill ran on a bucketed shape."""
    folder = tiny_dream_dir if family == "dream" else tiny_llada_dir
    model = lopa.load_model(folder, runner=lopa.RunnerConfig(device="cpu"))
    loaded = model.loaded
    runner = ModelRunner(loaded.model, loaded.spec, torch.device("cpu"), torch.float32, max_num_seqs=2, static=True,
                         capture=False, attention="flex", max_positions=512)
    offsets = []
    run_at = graphs.GraphExecutor._run_at
    monkeypatch.setattr(graphs.GraphExecutor, "_run_at", lambda self, items, key: offsets.append(items[0].slot) or
                        run_at(self, items, key))
    static = dataclasses.replace(model, runner=runner, engine=Engine(runner, loaded.spec, 2))
    prompts = ["a b c", "Tom has 12 apples and " * 3, "The cat sat on the", "one two three four five six seven eight"]
    cfgs = [lopa.DecodeConfig(strategy="lopa", k=2, gen_length=16, block_size=8, tau=0.5, attention=attn)
            for attn in ("full", "block_causal", "block_causal", "full")]
    cfgs[1] = dataclasses.replace(cfgs[1], gen_length=24)
    got = [r.token_ids for r in lopa.generate_many(static, prompts, cfgs)]
    assert got == [lopa.generate(model, p, c).token_ids for p, c in zip(prompts, cfgs)]
    assert offsets, "no prefill ran beside a running request"
    assert all(q in graphs.QUERY_BUCKETS for _, q in runner.prefill_shapes)


@pytest.mark.parametrize("pad_flops", [graphs.PAD_FLOPS, 0.0], ids=["graph", "eager"])
def test_after_warmup_a_prefill_beside_running_requests_replays_the_graph_from_slot_0(tiny_dream_dir, monkeypatch,
                                                                                      pad_flops):
    """After the warm-up a prefill over slots first.. is laid into rows first.. of the warmed graph over slots 0..
    (the rows below padding over the running requests' slots), unless its padding would cost more than PAD_FLOPS
    (then it runs eagerly on its own bucket: _run_at). Either way every request's tokens equal it decoded alone,
    and the running requests' caches are untouched (they decode on to the same tokens)."""
    model = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu"))
    loaded = model.loaded
    runner = ModelRunner(loaded.model, loaded.spec, torch.device("cpu"), torch.float32, max_num_seqs=2, static=True,
                         capture=False, attention="flex", max_positions=512)
    runner.warmup(max_tokens=256)
    monkeypatch.setattr(graphs, "PAD_FLOPS", pad_flops)
    calls = {"wide": [], "eager": []}
    run, run_at = graphs.GraphExecutor.run, graphs.GraphExecutor._run_at
    monkeypatch.setattr(graphs.GraphExecutor, "run", lambda self, items, *a, **k: (
        calls["wide"].append(items[0].slot) if items[0].slot and items[0].batch.prefill else None) or
        run(self, items, *a, **k))
    monkeypatch.setattr(graphs.GraphExecutor, "_run_at", lambda self, items, key: calls["eager"].append(items[0].slot)
                        or run_at(self, items, key))
    static = dataclasses.replace(model, runner=runner, engine=Engine(runner, loaded.spec, 2))
    prompts = ["a b c", "Tom has 12 apples and " * 2, "The cat sat on the", "one two three four five six seven eight"]
    cfgs = [lopa.DecodeConfig(strategy="lopa", k=2, gen_length=16, block_size=8, tau=0.5, attention=attn)
            for attn in ("full", "block_causal", "block_causal", "full")]
    got = [r.token_ids for r in lopa.generate_many(static, prompts, cfgs)]
    assert got == [lopa.generate(model, p, c).token_ids for p, c in zip(prompts, cfgs)]
    assert calls["wide"], "no prefill ran beside a running request"
    assert calls["eager"] == ([] if pad_flops else calls["wide"])
    assert static.engine.counters.eager_prefill_steps == 0 and static.engine.counters.eager_decode_steps == 0


def test_after_warmup_prefills_and_decodes_compile_nothing(tiny_dream_dir, monkeypatch):
    """The GPU start-up's promise, traced on the CPU: with every compiled piece (fused elementwise ops, FlexAttention,
    the batched predict) through dynamo's eager backend, a warm-up over B {1, 2} x Qb {32 .. 128} leaves nothing to
    compile for prompts of several lengths prefilled over slot 0 and beside a running request, and their decode
    steps: torch.compile is set to fail on any recompile. Tokens equal the eager path. The warm-up itself compiles
    each piece once, the attention once per query bucket."""
    from lopa.models import fused

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, **{**kw, "backend": "eager"}))
    model = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu"))
    loaded = model.loaded
    cfg = lopa.DecodeConfig(strategy="lopa", k=1, gen_length=16, block_size=8, tau=0.5)
    prompts = ["a b", "Tom has 12 apples and " * 3, "The cat sat", "one two three four five six seven"]
    want = [lopa.generate(model, p, cfg).token_ids for p in prompts]
    torch._dynamo.reset()
    loaded.model.ops = fused.compiled(backend="eager")
    try:
        runner = ModelRunner(loaded.model, loaded.spec, torch.device("cpu"), torch.float32, max_num_seqs=2,
                             max_positions=256, static=True, capture=False, fuse=True, attention="flex")
        stats = runner.warmup(max_tokens=128)
        # the key of the most queries first (the chains' kernels are tuned at their first call), then the rest
        assert [k[:2] for k in runner.graphs.statics] == [(2, 64), (1, 32), (1, 64), (1, 96), (1, 128), (2, 32)]
        # the first key compiles every piece; later keys only the attention of a new query bucket: each compiled
        # piece is dynamic in the batch and the tokens from its first call (B = 1 after B = 2 included)
        assert stats.warmup_key_compiles[0] > 1 and stats.warmup_key_compiles[1:] == [1, 0, 1, 1, 0]
        assert stats.warmup_key_names == ["forward B=2 Qb=64", "forward B=1 Qb=32", "forward B=1 Qb=64",
                                          "forward B=1 Qb=96", "forward B=1 Qb=128", "forward B=2 Qb=32"]
        warm = dataclasses.replace(model, runner=runner, engine=Engine(runner, loaded.spec, 2))
        with torch.compiler.set_stance("fail_on_recompile"):
            got = [r.token_ids for r in lopa.generate_many(warm, prompts, cfg)]
        c = warm.engine.counters
        assert got == want and c.recompiles_after_start == 0
        assert c.eager_prefill_steps == c.eager_decode_steps == 0 and c.prefill_steps >= 3
    finally:
        loaded.model.ops = fused.EAGER
        torch._dynamo.reset()


def test_decode_take_keeps_a_step_within_the_warmed_shapes(tiny_dream_dir):
    """ModelRunner.decode_take, the step budget's rule: all requests when their (B bucket, Qb) was warmed, else the
    most of the first ones that have a warmed shape and fill their bucket exactly (B 5 would pad to 6 over a
    waiting request's slot), at least one; before the warm-up, all."""
    model = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu"))
    loaded = model.loaded
    runner = ModelRunner(loaded.model, loaded.spec, torch.device("cpu"), torch.float32, max_num_seqs=6,
                         max_positions=512, static=True, capture=False, attention="flex")
    runner.reserve(6, 512)
    assert runner.decode_take([(2, 32)] * 6) == 6  # no warm-up: nothing to fit
    runner.warmup(max_tokens=192)  # B x Qb <= 192: B 4 and 6 at Qb 32, B 3 up to 64, B 2 up to 96, B 1 up to 192
    assert runner.decode_take([(1, 32)] * 6) == 6
    assert runner.decode_take([(2, 32)] * 6) == runner.decode_take([(2, 32)] * 5) == 3  # 64 queries a row
    assert runner.decode_take([(1, 32)] * 5 + [(2, 32)]) == 4  # five would fit at B 6, padded over the sixth
    assert runner.decode_take([(1, 32), (1, 24), (6, 32), (1, 32)]) == 2
    assert runner.decode_take([(8, 32), (1, 32)]) == 1  # 256 queries: no warmed shape even alone; it runs (eagerly)
