"""The window strategies' per-request state (threshold, d2f, sdar, fast_dllm_v2, lopa) as rows of device tensors,
one row per KV slot.

``Slots`` holds, for every slot s, what a WindowState holds for one request (decoding/window.py) plus the
forward it proposed last (the plan the next step runs):

    canvas, pred_tok, pred_prob, pred_conf, pred_ok   [S, Tc]   Tc = the longest canvas loaded so far
    scored                                            [S, Tc]   positions the pending forward scores
    active                                            [S, Tc]   block i of the slot is fully active (i < Tc)
    look                                              [S, kc]   the pending forward's lookahead positions (-1: none)
    ints                                              [S, len(INTS)]   int64 fields, named below
    floats                                            [S, len(FLOATS)] float64 thresholds (compared as on the host)

The blocks of threshold and d2f always lie on one grid, block i = [P + i*bs, min(P + (i+1)*bs, P + G)), so a
slot's block list is ``nblocks`` (how many exist) and ``active``. A block-diffusion slot (``family`` sdar or
fast_dllm_v2, decoding/block_diffusion.py) has the fixed blocks of its strategy's ``initial_blocks`` (aligned at
absolute position 0, all fully active) and its own rules in decoding/batched_blocks.py; ``verify``,
``next_span`` and ``sub_block`` carry verify_lookahead, score_span == "next_region" and sub_block. ``load`` and
``store`` convert one request's host state (and its pending ForwardBatch) to its slot row and back without loss;
decoding/batched.py runs the iteration on the rows (``Rows``: the first n rows' fields by name). A step's updates
read and write the first n rows only (the running requests are slots 0..n-1); rows past them keep whatever left
them.

The iteration reads and writes each row over its step's span only (a bounded run of positions from the committed
length: batched.Geometry, batched_blocks.layout), so a row may hold what the host state no longer does, and the
readers here apply it: masks after the first EOS past the span (a window strategy's settle_eos made them EOS:
``canvas_of``), ``pred_ok`` flags before ``pred_lo`` (the window the predictions belong to) and ``scored`` flags
outside the pending window (both left from older windows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import CONFIDENCES, K_POLICIES
from .base import ForwardBatch, ModelSpec, settle_eos
from .block_diffusion import BlockDiffusionStrategy
from .blocks import Block
from .d2f import D2FStrategy
from .window import WindowState, WindowStrategy

BIG = 1 << 40  # larger than any position
NO_EOS = BIG  # eos_at of a slot whose canvas holds no EOS yet
INTS = ("prompt_len", "gen_length", "block_size", "cached", "rounds", "max_rounds", "nblocks", "eos_at", "k",
        "commit", "width", "rows", "last_fill", "score", "measure", "policy", "branch_m", "d2f", "causal", "done",
        "capped", "family", "verify", "next_span", "sub_block", "pred_lo")
FLOATS = ("tau", "tau_add", "tau_act")
FAMILIES = ("window", "sdar", "fast_dllm_v2")  # the ``family`` field: which rules decode the slot
FIELDS = ("canvas", "pred_tok", "pred_prob", "pred_conf", "pred_ok", "scored", "active", "look", "ints", "floats")
I = {name: i for i, name in enumerate(INTS)}
F = {name: i for i, name in enumerate(FLOATS)}
# branch scores the device iteration computes (decoding/batched.py); "random" draws from the request's own
# CPU generator and stays on the host path
DEVICE_SCORES = ("mean", "lowest", "count", "top_m", "segment", "logsum")


@dataclass
class Slots:
    canvas: torch.Tensor
    pred_tok: torch.Tensor
    pred_prob: torch.Tensor
    pred_conf: torch.Tensor
    pred_ok: torch.Tensor
    scored: torch.Tensor
    active: torch.Tensor
    look: torch.Tensor
    ints: torch.Tensor
    floats: torch.Tensor

    @staticmethod
    def empty(S: int, Tc: int, kc: int, device: torch.device, pdt: torch.dtype) -> "Slots":
        """pdt: the predictions' dtype (float32; float64 for a float64 model)."""
        z = lambda dtype, width: torch.zeros(S, width, dtype=dtype, device=device)  # noqa: E731
        return Slots(z(torch.int64, Tc), z(torch.int64, Tc), z(pdt, Tc), z(pdt, Tc), z(torch.bool, Tc),
                     z(torch.bool, Tc), z(torch.bool, Tc), z(torch.int64, kc) - 1, z(torch.int64, len(INTS)),
                     z(torch.float64, len(FLOATS)))

    @property
    def slots(self) -> int:
        return self.canvas.shape[0]

    @property
    def width(self) -> int:
        return self.canvas.shape[1]

    def grown(self, S: int, Tc: int, kc: int) -> "Slots":
        """At least S slots, Tc canvas positions and kc lookaheads; the rows' contents kept."""
        S, Tc, kc = max(S, self.slots), max(Tc, self.width), max(kc, self.look.shape[1])
        new = Slots.empty(S, Tc, kc, self.canvas.device, self.pred_prob.dtype)
        for name in FIELDS:
            old = getattr(self, name)
            getattr(new, name)[:old.shape[0], :old.shape[1]] = old
        return new

    def move(self, src: list[int], dst: list[int]) -> None:
        """Rows src to dst, every source row read before any is written (a rotation); the indices go to the device
        in one copy (not two a field, as indexing with lists does)."""
        index = torch.tensor([src, dst], dtype=torch.int64).to(self.canvas.device)
        for name in FIELDS:
            t = getattr(self, name)
            t.index_copy_(0, index[1], t.index_select(0, index[0]))

    # -- host state <-> slot row ---------------------------------------------------------------------
    def load(self, slot: int, strategy: WindowStrategy, state: WindowState, batch: ForwardBatch,
             score: int) -> None:
        """Write a request's state (after its propose) and its pending decode batch into ``slot``."""
        self.load_many([slot], [(strategy, state, batch, score)])

    def load_many(self, slots: list[int],
                  requests: list[tuple[WindowStrategy, WindowState, ForwardBatch, int]]) -> None:
        """``load`` for several requests (strategy, state, pending batch, branch score) into their slots: each
        field's rows built on the host for all of them at once (a few tensor ops a request: its canvas and
        predictions copied into place; the rest gathered as Python lists) and written in one copy (requests joining
        together cost one transfer a field, not one per request)."""
        rows = self._rows(requests)
        dev = self.canvas.device
        index = torch.tensor(slots, dtype=torch.int64).to(dev)
        for name in FIELDS:
            getattr(self, name)[index] = rows[name].to(dev)

    def _rows(self, requests: list[tuple[WindowStrategy, WindowState, ForwardBatch, int]]) -> dict:
        """The requests' slot rows, field by field ([m, ...] each), on the host."""
        m, width, kc, pdt = len(requests), self.width, self.look.shape[1], self.pred_prob.dtype
        out = {name: torch.zeros(m, width, dtype=dtype) for name, dtype in (
            ("canvas", torch.int64), ("pred_tok", torch.int64), ("pred_prob", pdt), ("pred_conf", pdt),
            ("pred_ok", torch.bool))}
        marks, active, look, ints, floats = ([], []), ([], []), [], [], []
        for i, (strategy, state, batch, score) in enumerate(requests):
            cfg, T = strategy.cfg, len(state.canvas)
            for name in ("canvas", "pred_tok", "pred_prob", "pred_conf", "pred_ok"):
                out[name][i, :T] = getattr(state, name)
            scored, extra = state.pending
            marks[0].extend([i] * len(scored))
            marks[1].extend(scored)
            fully = [j for j, b in enumerate(state.blocks) if b.fully_active]
            active[0].extend([i] * len(fully))
            active[1].extend(fully)
            look.append(list(extra[1:]) + [-1] * (kc - len(extra) + 1))
            K, W = batch.tokens.shape
            values = dict(prompt_len=state.prompt_len, gen_length=cfg.gen_length, block_size=cfg.block_size,
                          cached=state.cached, rounds=state.rounds, max_rounds=strategy.max_rounds,
                          nblocks=len(state.blocks), eos_at=NO_EOS if state.eos_at is None else state.eos_at,
                          k=strategy.lookahead, commit=batch.commit, width=W, rows=K, last_fill=state.last_fill,
                          score=score, measure=CONFIDENCES.index(cfg.confidence),
                          policy=K_POLICIES.index(cfg.k_policy), branch_m=cfg.branch_m,
                          d2f=int(isinstance(strategy, D2FStrategy)),
                          causal=int(batch.block_ids is not None), done=0, capped=0, family=family(strategy),
                          verify=int(cfg.verify_lookahead), next_span=int(cfg.score_span == "next_region"),
                          sub_block=cfg.sub_block, pred_lo=0)
            ints.append([values[name] for name in INTS])
            floats.append([cfg.tau, cfg.add_threshold, cfg.complete_threshold])
        for name, (rows, cols) in (("scored", marks), ("active", active)):
            out[name] = torch.zeros(m, width, dtype=torch.bool)
            out[name][rows, cols] = True
        out["look"] = torch.tensor(look, dtype=torch.int64)
        out["ints"] = torch.tensor(ints, dtype=torch.int64)
        out["floats"] = torch.tensor(floats, dtype=torch.float64)
        return out

    def canvas_of(self, slot: int, T: int, spec: ModelSpec) -> torch.Tensor:
        """The request's canvas [T] on the CPU, as the host holds it: the iteration settles EOS over its span, so
        a window strategy's masks after the first EOS beyond it become EOS here (base.settle_eos; a
        block-diffusion strategy leaves them: BlockDiffusionStrategy.settle_eos)."""
        return _settled(self.canvas[slot, :T].cpu().clone(), self.ints[slot].tolist(), spec)

    def store(self, slot: int, strategy: WindowStrategy, state: WindowState) -> ForwardBatch | None:
        """Write ``slot`` back into the request's host state; returns its pending batch (None when done),
        exactly as the host strategy's propose would have left them."""
        return self.store_many([slot], [strategy], [state])[0]

    def store_many(self, slots: list[int], strategies: list[WindowStrategy],
                   states: list[WindowState]) -> list[ForwardBatch | None]:
        """``store`` for several slots: each field's rows copied to the host at once (one transfer a field, not
        one per request), then each request's state written from its rows."""
        index = torch.tensor(slots, dtype=torch.int64).to(self.canvas.device)
        fields = {name: getattr(self, name)[index].cpu() for name in FIELDS}  # [m, ...] each, copies
        return [self._unrow({name: t[i] for name, t in fields.items()}, strategy, state)
                for i, (strategy, state) in enumerate(zip(strategies, states))]

    def store_done(self, slots: list[int], strategies: list[WindowStrategy], states: list[WindowState]) -> None:
        """``store_many`` for requests the iteration finished: only what their results read (the canvas, settled,
        and the int fields: lengths, rounds, EOS, done, the round cap), in one copy; the rest of their host states
        (predictions, blocks) is left as it was, since a finished request never decodes again."""
        index = torch.tensor(slots, dtype=torch.int64).to(self.canvas.device)
        rows = torch.cat([self.canvas.index_select(0, index), self.ints.index_select(0, index)], 1).cpu()
        for row, strategy, state in zip(rows, strategies, states):
            ints = row[self.width:].tolist()
            state.canvas = _settled(row[:len(state.canvas)].clone(), ints, strategy.spec)
            _scalars(state, dict(zip(INTS, ints)))
            assert state.done, "store_done: the request is not finished"
            state.pending = ()

    @staticmethod
    def _unrow(row: dict, strategy: WindowStrategy, state: WindowState) -> ForwardBatch | None:
        """One slot row (on the host) into the request's state; its pending batch."""
        T = len(state.canvas)
        ints = row["ints"].tolist()
        v = dict(zip(INTS, ints))
        state.canvas = _settled(row["canvas"][:T].clone(), ints, strategy.spec)
        state.pred_tok = row["pred_tok"][:T].clone()
        state.pred_prob = row["pred_prob"][:T].clone()
        state.pred_conf = row["pred_conf"][:T].clone()
        state.pred_ok = row["pred_ok"][:T] & (torch.arange(T) >= v["pred_lo"])
        P, G, bs = v["prompt_len"], v["gen_length"], v["block_size"]
        if v["family"]:  # block diffusion: the strategy's fixed blocks
            state.blocks = strategy.initial_blocks(P)
        else:
            active = row["active"][:v["nblocks"]].tolist()
            state.blocks = [Block(P + i * bs, min(P + (i + 1) * bs, P + G), a) for i, a in enumerate(active)]
        _scalars(state, v)
        if state.done:
            state.pending = ()
            return None
        lo, W = v["cached"], v["width"]
        look = row["look"][:v["rows"] - 1].tolist()
        scored = (row["scored"][lo:lo + W].nonzero()[:, 0] + lo).tolist()  # bits outside the window are stale
        state.pending = (scored, [None] + look)
        anchor = state.canvas[lo:lo + W]
        rows = anchor[None].repeat(len(look) + 1, 1)
        for r, pos in enumerate(look, start=1):
            rows[r, pos - lo] = state.pred_tok[pos]
        origin = 0 if v["family"] else P  # block-diffusion blocks are aligned at absolute position 0
        block_ids = (torch.arange(lo, lo + W) - origin) // bs if v["causal"] else None
        cols = (anchor == strategy.spec.mask_id).nonzero()[:, 0]
        return ForwardBatch(rows, lo, cols, commit=v["commit"], block_ids=block_ids)


@dataclass
class Rows:
    """Views of the first n rows' int fields and thresholds (writes land in the slots)."""

    st: Slots
    n: int

    def __getattr__(self, name: str) -> torch.Tensor:
        if name in I:
            return self.st.ints[:self.n, I[name]]
        if name in F:
            return self.st.floats[:self.n, F[name]]
        raise AttributeError(name)

    def set(self, name: str, value: torch.Tensor) -> None:
        self.st.ints[:self.n, I[name]] = value


def family(strategy: WindowStrategy) -> int:
    """The slot's ``family`` index: which rules the device iteration applies to it."""
    return FAMILIES.index(type(strategy).name) if isinstance(strategy, BlockDiffusionStrategy) else 0  # lopa renames


def _scalars(state: WindowState, v: dict) -> None:
    """A slot's int fields (by name) into the request's host state: lengths, rounds, EOS, done, the round cap."""
    state.cached, state.rounds, state.last_fill = v["cached"], v["rounds"], v["last_fill"]
    state.eos_at = None if v["eos_at"] == NO_EOS else v["eos_at"]
    state.done, state.hit_round_cap = bool(v["done"]), bool(v["capped"])
    state.prefilled = True


def _settled(canvas: torch.Tensor, ints: list[int], spec: ModelSpec) -> torch.Tensor:
    """A slot's canvas (on the host, owned) as the host holds it (Slots.canvas_of), given the slot's int fields."""
    if not ints[I["family"]]:
        settle_eos(canvas, ints[I["prompt_len"]], spec)
    return canvas
