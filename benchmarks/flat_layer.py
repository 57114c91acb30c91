"""One whole decoder layer of a step of requests of different widths: the static path's padded rows against a flat
query axis, side by side in one run (flat_attention.py times the attention alone; this times what the padding costs
around it: the projections, the MLP, the norms, RoPE and the K/V write).

The same DecoderLayer (models/transformer.py, random weights at --shape, the runner's fused ops on a GPU) runs both
layouts of one step; only the cache view differs:

    padded  the engine's: x [n, Qb, E] (every request padded to the widest one's query bucket), a CacheView of the
            slot-major pool [2, L, n, Hkv, capacity, D], step_block_mask
    flat    x [1, T, E] (each request's K*W queries back to back, segments padded to --q-tile), a view of a pool laid
            out [2, L, Hkv, n x capacity, D] (its KV heads outermost: one layer's keys are a single view of every
            slot), flat_attention.flat_block_mask; the layer's code runs unchanged (FlatView gives it the rows its
            K/V write fills and the keys its FlexAttention reads)

The layer's output (residual included) is checked on every real query against the padded one (the script exits
non-zero past --tol). On a GPU: the median of CUDA-graph replays of each layer call (masks and views built once).

    PYTHONPATH=src python3 benchmarks/flat_layer.py --out benchmarks/results/flat_layer_h100     # Dream-7B, embedded
    PYTHONPATH=src python3 benchmarks/flat_layer.py --device cpu --tiny --out /tmp/fl            # eager, float32
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import sys
from pathlib import Path

import torch

from lopa.cache import KVPool
from lopa.models.attention import step_block_mask
from lopa.models.config import ModelConfig
from lopa.models.transformer import DecoderLayer, rope

from flat_attention import (add_workload_args, columns, flat_block_mask, flat_layout, flat_tiles, markdown,
                            padded_layout, parse_workload, title, workload)

# hidden, intermediate, query heads, KV heads (head dim = hidden / heads): Dream-7B, the embedded model, the tests'
SHAPES = {"dream-7b": (3584, 18944, 28, 4), "default": (256, 768, 4, 2), "tiny": (64, 128, 4, 2)}


class FlatView:
    """What Attention.forward asks of a cache view, over a pool [2, L, Hkv, slots * capacity, D]: ``rows`` (a layer's
    K and V as [Hkv * slots * capacity, D], where the K/V write puts each query's at ``index`` [1, T, Hkv]) and
    ``keys`` (the layer's keys and values as [1, Hkv, slots * capacity, D]: one batch of every slot)."""

    def __init__(self, kv: torch.Tensor, index: torch.Tensor) -> None:
        self.kv, self.index = kv, index

    def rows(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        D = self.kv.shape[-1]
        return self.kv[0, layer].view(-1, D), self.kv[1, layer].view(-1, D)

    def keys(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv[0, layer][None], self.kv[1, layer][None]


def run_case(n, k, widths, prefixes, capacity, shape, q_tile, device, dtype, ops, flat_ops, timer) -> dict:
    """One step of n requests (lopa k, widths cycled) through the layer in both layouts (``ops`` / ``flat_ops``: the
    fused ops of each; the flat one's FlexAttention may use smaller query tiles)."""
    E, I, H, HKV = SHAPES[shape]
    D, groups = E // H, H // HKV
    cfg = ModelConfig("dream", 1000, E, I, 1, H, HKV, 1e6, 1e-6, capacity, 0, 1)
    torch.manual_seed(n * 131 + k)
    layer = DecoderLayer(cfg).to(device, dtype)
    queries, Ps = workload(n, k, widths, prefixes)
    branch, block, Qb = padded_layout(queries, k, device)
    P = torch.tensor(Ps, device=device)
    real = branch >= 0  # [n, Qb]
    W = torch.tensor([q // (k + 1) for q in queries], device=device)
    q_idx = torch.arange(Qb, device=device)
    col = torch.where(real, q_idx - branch.clamp(min=0) * W[:, None], 0)  # window column of each query
    x = torch.randn(n, Qb, E, device=device, dtype=dtype) * real[..., None]
    pool = KVPool(1, HKV, D, E, n, capacity, device, dtype)
    pool.kv.normal_()  # the prefixes' keys and values (the step's own are written by the layer)
    # the padded step, as the static path lays it out (runner/step.py, model_runner body): a padding query writes its
    # slot's trash position
    write = torch.where(real, P[:, None] + q_idx, capacity - 1)
    view = pool.view(0, n, capacity, write)
    cos, sin = rope(P[:, None] + col, D, cfg.rope_theta)
    pm = step_block_mask(P, branch, block, capacity, groups=groups)
    # the flat step: the same queries back to back, the same keys in the heads-outermost pool
    owner, fcol, starts, T = flat_layout(queries, q_tile, device)
    qc = fcol.clamp(max=Qb - 1)
    freal = (fcol < Qb) & real[owner, qc]
    xf = torch.where(freal[:, None], x[owner, qc], 0)[None]  # [1, T, E]
    kvf = pool.kv.permute(0, 1, 3, 2, 4, 5).reshape(2, 1, HKV, n * capacity, D).contiguous()
    pos = torch.where(freal, P[owner] + qc, capacity - 1) + owner * capacity  # [T] position among all slots
    index = (torch.arange(HKV, device=device) * n * capacity + pos[:, None])[None]  # [1, T, Hkv] rows of FlatView
    fview = FlatView(kvf, index)
    fcos, fsin = rope((P[owner] + torch.where(freal, col[owner, qc], 0))[None], D, cfg.rope_theta)
    fm = flat_block_mask(P, torch.arange(n, device=device), branch, block, owner, fcol, capacity, n, groups, q_tile)
    with torch.inference_mode():
        padded = lambda: sum(layer(x, None, cos, sin, pm, view, 0, ops))  # noqa: E731 - (x, delta): x + delta
        flat = lambda: sum(layer(xf, None, fcos, fsin, fm, fview, 0, flat_ops))  # noqa: E731
        out_p, out_f = padded(), flat()
        ref = torch.cat([out_p[r, :Q] for r, Q in enumerate(queries)])  # [sum Q, E] the real queries
        got = torch.cat([out_f[0, starts[r]:starts[r] + Q] for r, Q in enumerate(queries)])
        err = float((got - ref).float().norm() / ref.float().norm())
        row = {"n": n, "k": k, "Qb": Qb, "real": sum(queries), "padded": n * Qb, "flat": T, "err": err}
        if timer is not None:
            row["padded_ms"], row["flat_ms"] = timer(padded), timer(flat)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/flat_layer"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", default="dream-7b,default", help=f"comma-separated, of {', '.join(SHAPES)}")
    add_workload_args(ap)
    ap.add_argument("--tol", type=float, default=None, help="largest relative error (default: 1e-5 in float32, "
                    "3e-2 in bfloat16)")
    args = ap.parse_args()
    if args.tiny:
        args.shapes = "tiny"
    device, cuda, dtype, widths, prefixes, ks = parse_workload(ap, args)
    if cuda:  # the runner's fused ops: compiled chains and FlexAttention (models/fused.py)
        from lopa.models.fused import compiled

        from gemm_rows import median_ms as timer
        ops = compiled()
    else:
        from lopa.models.fused import EAGER as ops
        timer = None
    tol = args.tol if args.tol is not None else (3e-2 if dtype == torch.bfloat16 else 1e-5)
    rows = []
    for shape in args.shapes.split(","):
        flat_ops = ops
        if cuda and args.q_tile < 128:  # the flat kernel's query tile within a segment (the padded one keeps the
            # engine's tiles)
            E, _, H, _ = SHAPES[shape]
            flat_ops = dataclasses.replace(ops, flex=functools.partial(ops.flex,
                                                                       kernel_options=flat_tiles(E // H, args.q_tile)))
        for n in [int(x) for x in args.ns.split(",")]:
            for k in ks:
                row = {"shape": shape, **run_case(n, k, widths, prefixes, args.capacity, shape, args.q_tile, device,
                                                  dtype, ops, flat_ops, timer)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta = {"device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype), "torch": torch.__version__,
            "capacity": args.capacity, "widths": args.widths, "prefixes": args.prefixes, "q_tile": args.q_tile,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "flat_layer.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = "\n".join(markdown(title(meta, f"one {shape} layer"), [r for r in rows if r["shape"] == shape],
                               columns("padded_ms" in rows[0])) for shape in args.shapes.split(","))
    (args.out / "flat_layer.md").write_text(table)
    print(table)
    bad = [r for r in rows if not r["err"] <= tol]
    if bad:
        sys.exit(f"the flat layer differs from the padded one past {tol}: "
                 f"{[(r['shape'], r['n'], r['k'], r['err']) for r in bad]}")


if __name__ == "__main__":
    main()
