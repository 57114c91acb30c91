"""The model runner: owns the model, its device and the KV pool; runs one engine step's forward.

    preds = runner.execute(items)      # ONE forward for every request of the step -> Predictions per request
    runner.commit(commits)             # each winner's leading K/V become committed positions of its slot

Under Branch Parallel (runner/group.py) the runner computes only this rank's rows of each request (the group's
``split``; the device path's ``local_rows``), the group gathers every row's predictions after the forward, and
``commit`` takes a winner's K/V from this rank's rows or from the owner's broadcast. One process uses a
LocalGroup: every row here, nothing sent. The runner never asks which rank it is.

A step runs eagerly with exact shapes (sampled requests, steps without a static path), or on the static path
(runner/graphs.py: bucketed shapes, replayed from CUDA graphs on a GPU; prefill steps too under "flex"). Both
run ``body``, the same device code, so the static path is checked against the eager one on the CPU by running
it without capture.
"""

from __future__ import annotations

import time

import torch

from ..cache import FlatView, KVPool
from ..decoding.base import Predictions
from ..models.spec import ModelSpec
from ..decoding.confidence import predict
from ..models.attention import KERNEL_PAD_MIN, kernel_queries, key_splits, step_block_mask, step_mask
from .graphs import KEY_STEP, GraphExecutor, bucket, predict_rows, round_up
from .group import LocalGroup
from .memory import kv_budget
from .step import FIELDS, Commit, StepItem, flatten, pack, unpack, unpack_flat


class ModelRunner:
    def __init__(self, model: torch.nn.Module, spec: ModelSpec, device: torch.device, dtype: torch.dtype, *,
                 max_num_seqs: int = 1, max_positions: int | None = None, static: bool = False,
                 capture: bool | None = None, fuse: bool = False, group=None,
                 kv_cache_bytes: int | None = None, attention: str | None = None,
                 key_splits: int | None = None) -> None:
        self.model, self.spec, self.device, self.dtype = model, spec, device, dtype
        self.fuse = fuse  # compiled kernels (RunnerConfig.fuse on a GPU): the predict here, the device path's update
        # where RunnerConfig.compile_update is on too
        self.group = group or LocalGroup()  # LocalGroup | BranchGroup (runner/group.py)
        self.max_num_seqs = max_num_seqs
        self.max_positions = max_positions  # None: the pool grows on demand; else every slot holds this many
        self.kv_budget = kv_budget(kv_cache_bytes, device)  # bytes the pool may take (RunnerConfig.kv_cache_bytes)
        self.pool: KVPool | None = None
        self.peak_slots = self.peak_bytes = 0  # the largest pool held so far (tests, benchmarks)
        attention = attention or "sdpa"  # of the static path (runner/graphs.py): "sdpa" | "flex"
        # "flex": the keys of a step too small to fill the GPU in chunks (RunnerConfig.key_splits; None = by the
        # multiprocessors' count, models/attention.py: key_splits; a CPU never splits)
        self.key_splits = key_splits
        self.sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0
        self.kernel_pad_min = KERNEL_PAD_MIN  # "flex": query buckets from this one attend padded (kernel_queries)
        self.graphs = GraphExecutor(self, capture=device.type == "cuda" if capture is None else capture,
                                    fuse=fuse, attention=attention) if static else None
        self.hidden: torch.Tensor | None = None  # [B, Qb, E] of the last forward (commit reads the winners)
        self.flat_start: torch.Tensor | None = None  # [B]: forward_flat's rows' first flat queries (hidden [1, T, E])
        self._shapes: list[tuple[int, int, bool]] = []  # (K, W, replicated) per request of the last forward
        self._prefill = False  # the last forward was a prefill step
        self.prefill_shapes: set[tuple[int, int]] = set()  # (rows, queries a row) of the prefill forwards so far:
        # the static path's bucketed key, or the exact shape of an eager prefill (each new one meets cold kernels)

    def new_generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    # -- the KV pool ----------------------------------------------------------------------------------
    def slot_capacity(self) -> int | None:
        """Positions a slot can hold when that is fixed (RunnerConfig.max_positions), else None (it grows)."""
        return None if self.max_positions is None else round_up(self.max_positions, KEY_STEP)

    def slot_bytes(self, positions: int) -> int:
        """Bytes of one pool slot of ``positions`` positions: K and V in every layer, plus its last hidden state."""
        cfg = self.model.config
        per_position = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim
        return (positions * per_position + cfg.hidden_size) * self.dtype.itemsize

    def fits(self, slots: int, positions: int) -> bool:
        """Whether a pool of ``slots`` slots for requests needing ``positions`` KV positions stays in the budget."""
        return slots * self.slot_bytes(self.slot_capacity() or round_up(positions, KEY_STEP)) <= self.kv_budget

    def reserve(self, slots: int, positions: int) -> None:
        """Make the pool hold ``slots`` slots of at least ``positions`` positions (between steps, after the moves:
        live slots are 0..slots-1). It grows with headroom (x2 slots, x1.5 positions) as far as the budget allows;
        a new pool drops the captured graphs, which read the old tensor."""
        fixed = self.slot_capacity()
        cap = fixed or round_up(positions, KEY_STEP)
        if positions > cap:
            raise RuntimeError(f"a request needs {positions} KV positions; slots hold {cap}")
        if self.pool is not None and slots <= self.pool.slots and cap <= self.pool.capacity:
            return
        S, C = (self.pool.slots, self.pool.capacity) if self.pool is not None else (0, 0)
        grow_s = min(self.max_num_seqs, max(slots, 2 * S)) if slots > S else S
        grow_c = max(cap, round_up(C + C // 2, KEY_STEP)) if cap > C and C else max(cap, C)
        for s, c in ((grow_s, grow_c), (slots, grow_c), (slots, cap)):  # the last always fits (admission)
            if s * self.slot_bytes(c) <= self.kv_budget:
                break
        self._new_pool(s, c)

    def shrink(self) -> None:
        """The engine went idle: give the pool back (the next step allocates what it needs), unless captured CUDA
        graphs read it (uncaptured static buffers never hold the pool tensor) or the start-up warm-up sized it."""
        if self.graphs is None or not (self.graphs.capture or self.graphs.frozen):
            self.pool = None

    def _new_pool(self, slots: int, capacity: int) -> None:
        """Replace the pool, keeping the committed K/V of slots 0..slots-1."""
        if self.graphs is not None:
            self.graphs.clear()
        cfg = self.model.config
        self.pool = (self.pool.resized(slots, capacity) if self.pool is not None else  # an OOM here keeps the old
                     KVPool(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size, slots, capacity,
                            self.device, self.dtype))
        self.peak_slots = max(self.peak_slots, slots)
        self.peak_bytes = max(self.peak_bytes, slots * self.slot_bytes(capacity))

    def warmup(self, max_tokens: int, on_graph=None):
        """Start-up on the "flex" static path with a fixed slot size: the pool at its final size and every static
        key (runner/graphs.py) captured now, so nothing captures while requests run. Returns the graph stats,
        or None where there is nothing to warm (no static path, "sdpa" keys depend on lengths, or the pool grows)."""
        if self.graphs is None or self.graphs.attention != "flex" or self.max_positions is None:
            return None
        self.reserve(self.max_num_seqs, self.slot_capacity())
        keys = self.graphs.warmup_keys(max_tokens)
        return self.graphs.warmup(keys, on_graph)

    def release(self, slot: int) -> None:
        """A request left this slot: nothing in it is committed any more."""
        if self.pool is not None:
            self.pool.lengths[slot] = 0

    def move(self, moves: list[tuple[int, int]]) -> None:
        """Plan.moves: (from slot, to slot), applied all at once (KVPool.move)."""
        if moves:
            self.pool.move(moves)

    def decode_take(self, shapes: list[tuple[int, int]]) -> int:
        """How many of the first requests of slots 0.. ((K, W) of each one's next forward, in slot order) the next
        decode step runs: all of them, unless after the warm-up their step would have no warmed shape; then the
        most of the first ones that have one together and fill their batch bucket exactly (the rows past a step's
        requests must be free slots: the device path clears them), at least one. Queries as the static path's key
        counts them (rank_queries; every rank takes the same)."""
        n = len(shapes)
        if self.graphs is None or not self.graphs.frozen:
            return n
        queries = [self.rank_queries(K, W) for K, W in shapes]
        if self.graphs.warmed(n, max(queries)):
            return n
        fits = [m for m in range(1, n) if bucket(m, self.pool.slots) == m and self.graphs.warmed(m, max(queries[:m]))]
        return max(fits, default=1)

    def rank_queries(self, K: int, W: int) -> int:
        """Queries of the largest share of a request's K x W rows a rank computes (Branch Parallel: split_rows'
        parts differ by at most one row, so ceil(K / N) rows; one process: K*W): the same on every rank, so every
        rank's forward has one shape and the predictions gather as one tensor."""
        return -(-K // self.group.world) * W

    # -- one step ---------------------------------------------------------------------------------------
    def execute(self, items: list[StepItem]) -> list[Predictions]:
        """ONE forward over every item's rows; Predictions [K, C] per item for its batch.logit_cols (CPU)."""
        first = items[0].slot
        for b, item in enumerate(items):
            batch = item.batch
            if item.slot != first + b:
                raise RuntimeError(f"step slots must be contiguous, got {[i.slot for i in items]}")
            if batch.start != self.pool.lengths[item.slot]:
                raise RuntimeError(f"strategy window starts at {batch.start} but slot {item.slot} holds "
                                   f"{self.pool.lengths[item.slot]} positions")
            if batch.start + item.queries >= self.pool.capacity:
                raise RuntimeError(f"a forward needs {batch.start + item.queries + 1} KV positions; the slot holds "
                                   f"{self.pool.capacity}")
            shift = self.model.config.logit_shift
            if shift and batch.start == 0 and bool((batch.logit_cols < shift).any()):
                raise ValueError("position 0 of the window needs the last committed hidden state (none cached)")
        t0 = time.perf_counter()
        self._shapes = [(*item.batch.tokens.shape, item.pspec.temperature == 0) for item in items]
        local, layouts = self.group.split(items, self._shapes)  # this rank's rows; how the static path gathers
        queries = max(self.rank_queries(K, W) for K, W, _ in self._shapes)
        bp = self.group.counters
        t1 = time.perf_counter()
        gather_before = bp.gather_s  # the static path gathers inside its run: not forward time
        # every rank takes the same path (plan() reads only what all ranks share), so the collectives match
        self._prefill = all(item.batch.prefill for item in items)  # the counters count decode steps only
        self.flat_start = None  # self.hidden below is [B, Qb, E]
        groups = self.graphs.plan(local, queries) if self.graphs is not None else []
        if groups and self._prefill:  # replicated under Branch Parallel: nothing to gather
            (self.hidden, preds), gathered = self._static_prefill(groups), True
        elif groups:
            (self.hidden, preds), gathered = self.graphs.run(local, layouts, queries), True
        elif not any(item.queries for item in local):  # eager, and no row of this step is this rank's (K < N)
            self.hidden, preds, gathered = None, [self._empty(item) for item in local], False
        else:
            (self.hidden, preds), gathered = self._eager(local), False
        t2 = time.perf_counter()
        if not self._prefill:
            bp.prepare_s += t1 - t0
            bp.forward_s += t2 - t1 - (bp.gather_s - gather_before)
            L, Hkv, D = self.pool.kv.shape[1], self.pool.kv.shape[3], self.pool.kv.shape[5]
            bp.prewrite_bytes += sum(item.queries for item in local) * 2 * L * Hkv * D * self.pool.kv.element_size()
        if gathered:
            return preds
        shapes = [(K, item.batch.logit_cols.numel(), rep) for (K, _, rep), item in zip(self._shapes, items)]
        return self.group.gather(preds, shapes, torch.promote_types(self.dtype, torch.float32))

    def _static_prefill(self, groups: list[list[StepItem]]) -> tuple[torch.Tensor, list[Predictions]]:
        """A prefill step as one static forward per group (runner/graphs.py: plan; several when its prompts
        have no warmed key together); the hidden states of all its requests as one [n, Q, E] tensor, rows in
        step order, padded to the widest group (commit reads them)."""
        hidden, preds = [], []
        for group in groups:
            self.prefill_shapes.add(self.graphs.key(group)[:2])
            h, p = self.graphs.run(group)
            # a view of the graph's static outputs: a later group may replay the same graph (laid into its rows)
            hidden.append(h[:len(group)] if len(groups) == 1 else h[:len(group)].clone())
            preds += p
        if len(hidden) == 1:
            return hidden[0], preds
        Q = max(h.shape[1] for h in hidden)
        return torch.cat([torch.nn.functional.pad(h, (0, 0, 0, Q - h.shape[1])) for h in hidden]), preds

    def _empty(self, item: StepItem) -> Predictions:
        empty = torch.empty(item.batch.tokens.shape[0], item.batch.logit_cols.numel(),
                            dtype=torch.promote_types(self.dtype, torch.float32))
        return Predictions(empty.long(), empty, empty)

    def splits_of(self, B: int, Qb: int, Lb: int) -> int:
        """The key chunks of a "flex" step of B rows of Qb queries over slots of Lb positions (split_attention):
        RunnerConfig.key_splits, or by the rule (models/attention.py: key_splits)."""
        cfg = self.model.config
        return self.key_splits or key_splits(B, Qb, cfg.num_heads // cfg.num_kv_heads, cfg.num_kv_heads, cfg.head_dim,
                                             Lb, self.sms)

    def body(self, inputs: torch.Tensor, first: int, Lb: int, flex: bool = False) -> torch.Tensor:
        """The forward of a packed step (runner/step.py) over slots [first, first + B): hidden [B, Qb, E].
        Positions, write slots and the mask are built here on the device (graph-capturable): an additive mask
        over the first Lb keys (SDPA), or with ``flex`` a block mask over the whole slot (Lb = capacity)."""
        tokens, col, branch, block, P, _, _ = unpack(inputs)
        B, Qb = tokens.shape
        q = torch.arange(Qb, device=inputs.device)
        trash = self.pool.capacity - 1  # padding queries write only there (their rows may lie over running slots)
        write = torch.where(branch >= 0, (P[:, None] + q).clamp(max=trash), trash)
        if flex:
            mask, Qk = self._flex_mask(P, branch, block, Lb)
        else:
            allowed = step_mask(P, branch, block, Lb)  # [B, Qb, Lb]
            # additive, in the model's dtype, built once: SDPA would turn a bool mask into this in every layer
            mask = torch.zeros(B, 1, Qb, Lb, dtype=self.dtype, device=inputs.device)
            mask.masked_fill_(~allowed[:, None], float("-inf"))
            Qk = Qb
        view = self.pool.view(first, B, Lb, write, Qk)
        return self.model(tokens, cache=view, attn_mask=mask, positions=P[:, None] + col)

    def _flex_mask(self, P: torch.Tensor, branch: torch.Tensor, block: torch.Tensor, Lb: int):
        """The FlexAttention block mask of a step's [B, Qb] rows (step_block_mask) over Qk = kernel_queries(Qb)
        queries a row, the rest padding (branch -1) -> (mask, Qk)."""
        B, Qb = branch.shape
        Qk = kernel_queries(Qb, self.kernel_pad_min)
        if Qk > Qb:
            branch = torch.nn.functional.pad(branch, (0, Qk - Qb), value=-1)
            block = torch.nn.functional.pad(block, (0, Qk - Qb))
        cfg = self.model.config  # the query heads of a KV head share the query axis (models/transformer.py)
        mask = step_block_mask(P, branch, block, Lb, groups=cfg.num_heads // cfg.num_kv_heads,
                               splits=self.splits_of(B, Qk, Lb), kv_heads=cfg.num_kv_heads)
        return mask, Qk

    def flat_body(self, inputs: torch.Tensor, flat: torch.Tensor, T: int, first: int = 0) -> torch.Tensor:
        """``body`` on the flat query axis: a packed step over slots [first, first + B) (``inputs``) and its flat
        layout of T queries (``flat``: runner/step.py, flatten; the rows back to back) -> hidden [1, T, E]. The
        projections, norms and MLP run over the T flat queries, not the B x Qb padded ones; the attention runs on
        the padded rows as ``body``'s (cache.FlatView lays the queries into them and takes their outputs back), under
        the same block mask. Each query writes its K/V where ``body`` writes them (P + its column; a padding query:
        its row's slot's trash position)."""
        _, _, branch_p, block_p, P_p, _, _ = unpack(inputs)
        tokens, col, branch, _, owner, slot, P, start, _, _, _ = unpack_flat(flat, T)
        B = branch_p.shape[0]
        pool, cfg = self.pool, self.model.config
        column = torch.arange(T, device=inputs.device) - start[owner]  # [T] each flat query's column in its row
        real = branch >= 0
        position = torch.where(real, P[owner] + column, pool.capacity - 1)
        mask, Qk = self._flex_mask(P_p, branch_p, block_p, pool.capacity)
        view = FlatView(pool, first, B, Qk, cfg.num_heads, slot[owner], position,
                        torch.where(real, owner * Qk + column, -1))
        return self.model(tokens[None], cache=view, attn_mask=mask, positions=(P[owner] + col)[None])

    def _eager(self, items: list[StepItem]) -> tuple[torch.Tensor, list[Predictions]]:
        """Exact shapes; each request's logits for its own columns and its own predict (and generator)."""
        Qb = max(item.queries for item in items)
        Lb = min(max(item.batch.start + item.queries for item in items), self.pool.capacity)
        if all(item.batch.prefill for item in items):
            self.prefill_shapes.add((len(items), Qb))
        host = torch.empty(len(items), FIELDS * Qb + 3, dtype=torch.long)
        pack(items, host, self.spec.mask_id)
        hidden = self.body(host.to(self.device, non_blocking=True), items[0].slot, Lb)
        preds = []
        for b, item in enumerate(items):
            K, W = item.batch.tokens.shape
            cols = item.batch.logit_cols
            if cols.numel() == 0 or K == 0:
                preds.append(self._empty(item))
                continue
            h = hidden[b, :K * W].view(K, W, -1)
            logits = self.model.logits(h, cols.to(self.device), self.pool.last_hidden[item.slot])  # [K, C, V]
            preds.append(predict(logits, item.pspec, item.generator))
        return hidden, preds

    def commit(self, commits: list[Commit]) -> None:
        """Each winner's first n window columns become committed positions of its slot, with its last hidden
        state: from this rank's own rows (one gather-scatter for all requests whose source is not the anchor
        row), or, for a winner another rank computed, from that rank's broadcast (Commit-Winner-Cache)."""
        t0 = time.perf_counter()
        work = [c for c in commits if c.n > 0]
        if not work:
            return
        slots, src, dst, picks, remote = [], [], [], [], []
        for c in work:
            K, W, rep = self._shapes[c.index]
            P = self.pool.lengths[c.slot]
            source = self.group.source(K, c.row, rep)
            row = source.local_row
            if row is not None:
                picks.append((c.slot, c.index, row * W + c.n - 1))
                if row:  # source starts at P + row*W >= P + n: never overlaps its destination
                    slots += [c.slot] * c.n
                    src += range(P + row * W, P + row * W + c.n)
                    dst += range(P, P + c.n)
            if source.broadcast:
                remote.append((c.slot, c.index, row, source.owner, W, P, c.n))
        if remote:  # the owners read their windows before any local copy can overwrite [P, P + n)
            self.group.broadcast(self.pool, self.hidden, remote)
        if slots:
            as_index = lambda xs: torch.tensor(xs, dtype=torch.long).to(self.device, non_blocking=True)  # noqa: E731
            self.pool.commit(as_index(slots), as_index(src), as_index(dst))
        if picks:
            index = torch.tensor([i for _, i, _ in picks], device=self.device)
            query = torch.tensor([q for _, _, q in picks], device=self.device)
            self.pool.last_hidden[[s for s, _, _ in picks]] = self.hidden[index, query]
        for c in work:
            self.pool.lengths[c.slot] += c.n
        if self.group.sync_timers and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if not self._prefill:
            self.group.counters.commit_s += time.perf_counter() - t0

    # -- a step built on the device (engine/device.py) ---------------------------------------------------
    def packed_shape(self, n: int, queries: int, span: int, eager: bool = False) -> tuple[int, int, int | None]:
        """(B, Qb, Lb) of a decode step over slots 0..n-1 whose longest row has ``queries`` queries and whose
        queries reach position ``span``: the static path's buckets, or exact shapes without one. Under "flex"
        Lb is None (FlexAttention over the whole slot: nothing in the shape depends on a length), unless
        ``eager``: a step whose key the warm-up did not capture runs on the same buckets with SDPA over the span
        (no new FlexAttention shape to compile while serving)."""
        if span >= self.pool.capacity:
            raise RuntimeError(f"a forward needs {span + 1} KV positions; the slot holds {self.pool.capacity}")
        if self.graphs is None:
            return n, queries, span
        B, Lb = bucket(n, self.pool.slots), min(round_up(span, KEY_STEP), self.pool.capacity)
        flex = self.graphs.attention == "flex"
        return B, self.graphs.bucket_queries(queries), None if flex and not eager else Lb

    def forward_packed(self, inputs: torch.Tensor, Lb: int | None, measures: tuple[str, ...],
                       suppress: tuple[int, ...]) -> torch.Tensor:
        """ONE greedy forward of a step packed on the device (runner/step.py layout, slots 0..B-1) and the
        batched predict of every query: [B, Qb, 3] (token, prob, conf) on the device; the hidden states stay
        for commit_winners. ``Lb``: the key span of an SDPA mask, or None: FlexAttention over the whole slot
        (packed_shape). Graph-capturable: the device path (engine/device.py) captures it with its update."""
        flex = Lb is None
        self.hidden, self.flat_start = self.body(inputs, 0, self.pool.capacity if flex else Lb, flex=flex), None
        return self.predict_packed(self.hidden, inputs, 0, measures, suppress)

    def predict_packed(self, hidden: torch.Tensor, inputs: torch.Tensor, start: int, measures: tuple[str, ...],
                       suppress: tuple[int, ...]) -> torch.Tensor:
        """The head and batched predict of a packed step's hidden states [B, Qb, E] over slots [start, start + B)
        -> [B, Qb, 3] (token, prob, conf). Graph-capturable."""
        _, col, branch, _, _, measure, suppressed = unpack(inputs)
        first = (col == 0) & (branch >= 0)  # each branch's column 0 reads the slot's last committed state
        last = self.pool.last_hidden[start:start + hidden.shape[0]]
        logits = self.model.lm_head(self.model.predicting_hidden(hidden, last, first))  # [B, Qb, V]
        predict = self.graphs.predict if self.graphs is not None else predict_rows  # fused when compiled
        return predict(logits, measure, suppressed, measures, suppress)

    def forward_flat(self, inputs: torch.Tensor, T: int, q_tile: int, measures: tuple[str, ...],
                     suppress: tuple[int, ...]) -> torch.Tensor:
        """forward_packed on the flat query axis (runner/step.py: flatten; T flat queries, each row padded only to
        a multiple of ``q_tile``): the same [B, Qb, 3] predictions (its queries past a row's own are not computed:
        what lies there is never read), the hidden states kept flat for commit_winners. Graph-capturable."""
        flat = flatten(inputs, T, q_tile, self.spec.mask_id)
        self.hidden = self.flat_body(inputs, flat, T)  # [1, T, E]
        _, col, branch, _, owner, slot, _, start, _, measure, suppressed = unpack_flat(flat, T)
        self.flat_start = start
        first = (col == 0) & (branch >= 0)
        last = self.pool.last_hidden[slot[owner]]  # [T, E] each query's request's last committed state
        logits = self.model.lm_head(self.model.predicting_hidden(self.hidden, last[None], first[None]))  # [1, T, V]
        predict = self.graphs.predict if self.graphs is not None else predict_rows
        # each flat query as a row of one: its own request's measure and suppression
        packed = predict(logits.view(T, 1, -1), measure[owner], suppressed[owner], measures, suppress)  # [T, 1, 3]
        Qb = inputs.shape[1] // FIELDS
        index = (start[:, None] + torch.arange(Qb, device=inputs.device)).clamp(max=T - 1)  # [B, Qb]
        return packed[index, 0]

    def commit_winners(self, P: torch.Tensor, row: torch.Tensor, K: torch.Tensor, W: torch.Tensor, n: torch.Tensor,
                       cols: int) -> None:
        """commit for slots 0..len(P)-1 from device tensors [len(P)] after forward_packed: the first n[b] window
        columns of row[b] (of K[b] rows of W[b] columns, at P + row*W) become positions P.. of slot b, with the last
        one's hidden state. One process: one gather-scatter on the device over ``cols`` columns a slot (at least
        every n[b] whose row[b] > 0: row 0's columns already sit there; graph-capturable), the host lengths set
        apart (set_lengths). Branch Parallel: the winners are read back (a
        second small copy, timed as select: it waits for accept) and ``commit`` takes each winner's K/V from this
        rank's rows or its owner's broadcast."""
        if self.group.distributed:
            t0 = time.perf_counter()
            rows, counts, Ks, Ws = torch.stack([row, n, K, W]).tolist()
            self.group.counters.select_s += time.perf_counter() - t0
            self._shapes, self._prefill = [(k, w, True) for k, w in zip(Ks, Ws)], False  # as execute records them
            self.commit([Commit(b, b, r, c) for b, (r, c) in enumerate(zip(rows, counts))])
            return
        S = P.shape[0]
        dev = P.device
        j = torch.arange(cols, device=dev)[None]
        moving = (j < n[:, None]) & (row[:, None] > 0)
        trash = self.pool.capacity - 1  # inactive entries copy the trash position onto itself
        src = torch.where(moving, P[:, None] + row[:, None] * W[:, None] + j, trash).reshape(-1)
        dst = torch.where(moving, P[:, None] + j, trash).reshape(-1)
        slots = torch.arange(S, device=dev)[:, None].expand(S, cols).reshape(-1)
        self.pool.commit(slots, src, dst)
        query = (row * W + n - 1).clamp(min=0)
        if self.flat_start is not None:  # forward_flat's: row b's queries from flat_start[b]
            last = self.hidden[0, (self.flat_start[:S] + query).clamp(max=self.hidden.shape[1] - 1)]
        else:
            last = self.hidden[torch.arange(S, device=dev), query]  # [S, E]
        self.pool.last_hidden[:S] = torch.where((n > 0)[:, None], last, self.pool.last_hidden[:S])

    def set_lengths(self, lengths: list[int]) -> None:
        """Committed lengths of slots 0..len(lengths)-1, as the device step left them."""
        self.pool.lengths[:len(lengths)] = lengths

    def verify(self, slots: list[int], canvases: list[torch.Tensor]) -> None:
        """RunnerConfig.bp_check: every rank's cache and canvases agree after the commit (no-op in one process)."""
        if self.group.check:
            self.group.verify(self.pool, slots, canvases)
