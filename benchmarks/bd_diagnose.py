"""Why LoPA loses accuracy over a block-diffusion loop with small blocks: what its winners wrote.

For each branching iteration of LoPA (the paper's scoring: Eq. 2 over the active region, every branch
competes) it counts the lookahead wins, the winners that emptied their score set (+inf), and the lookahead rows
whose token the anchor row of the same forward does not predict at that position (what
``DecodeConfig.verify_lookahead`` vetoes), in all and among the winners. It observes the branch scores by
wrapping the strategy class's ``branch_scores`` for this process (decoding is unchanged). ``--d2f`` does the same
for LoPA over D2F on the default model and also decodes with the veto applied there (window.py has no such
option: this measures whether it would help).

    PYTHONPATH=src python3 benchmarks/bd_diagnose.py --model runs/bd4 --n 100 --device cpu --dtype float32
    PYTHONPATH=src python3 benchmarks/bd_diagnose.py --d2f --n 100 --device cpu --dtype float32
"""

from __future__ import annotations

import argparse
import json
import math

import torch

import lopa
from lopa.config import decode_config
from lopa.decoding.block_diffusion import BlockDiffusionStrategy
from lopa.decoding.window import WindowStrategy
from lopa.eval.harness import score
from lopa.eval.tasks import gsm8k

PLAIN = WindowStrategy.branch_scores  # Eq. 2 over the scored set, before anything here wraps it
COUNTS = ("iterations", "lookahead_wins", "empty_set_wins", "rows", "rows_disagree", "wins_disagree",
          "empty_set_wins_disagree")


def observe(counts: dict, veto: bool):
    """A branch_scores that counts what the winners wrote (and vetoes disagreeing lookaheads if ``veto``)."""
    def branch_scores(self, batch, preds, scored, extra):
        scores = PLAIN(self, batch, preds, scored, extra)  # [K] Eq. 2 (the block-diffusion subclass's check off)
        look = torch.tensor(extra[1:]) - batch.start  # [K-1] window column of each lookahead
        anchor = preds.tokens[0, torch.searchsorted(batch.logit_cols, look)]  # [K-1] the anchor's token there
        agree = torch.cat([torch.ones(1, dtype=torch.bool), anchor == batch.tokens[1:].gather(1, look[:, None])[:, 0]])
        if veto:
            scores = scores.masked_fill(~agree, float("-inf"))
        w = int(torch.argmax(scores))
        empty = math.isinf(float(scores[w])) and float(scores[w]) > 0
        for name, add in (("iterations", 1), ("rows", len(extra) - 1), ("rows_disagree", int((~agree).sum())),
                          ("lookahead_wins", w > 0), ("empty_set_wins", w > 0 and empty),
                          ("wins_disagree", w > 0 and not agree[w]),
                          ("empty_set_wins_disagree", w > 0 and empty and not agree[w])):
            counts[name] += int(add)
        return scores
    return branch_scores


def run(model, problems, cfg, veto: bool) -> dict:
    counts = dict.fromkeys(COUNTS, 0)
    WindowStrategy.branch_scores = BlockDiffusionStrategy.branch_scores = observe(counts, veto)
    results = lopa.generate_many(model, [p.prompt for p in problems], cfg)
    tokens = sum(r.stats.generated_tokens for r in results)
    forwards = sum(r.stats.decode_forwards for r in results)
    correct = [score(p, r.text)[0] for p, r in zip(problems, results)]
    return {"veto": veto, "accuracy": sum(correct) / len(problems), "tpf": tokens / forwards, **counts,
            "correct": correct}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a block-diffusion model folder (runs/bd4)")
    ap.add_argument("--d2f", action="store_true", help="LoPA over D2F on the default model instead")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--k", type=int, default=None, help="lookaheads (default: 3 for a block-diffusion model, 14)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    if bool(args.model) == args.d2f:
        raise SystemExit("give --model FOLDER or --d2f")
    model = lopa.load_model(args.model, runner=lopa.RunnerConfig(device=args.device, dtype=args.dtype, max_num_seqs=16))
    problems = gsm8k(None, args.n)
    if args.d2f:
        cfg = decode_config(None, model.model_type, k=args.k or 14, gen_length=128)
    else:
        cfg = decode_config(None, model.model_type, strategy="lopa", base=model.model_type, k=args.k or 3,
                            block_size=model.loaded.spec.block_size, score_span="active", verify_lookahead=False)
    out = [run(model, problems, cfg, veto) for veto in ((False, True) if args.d2f else (False,))]
    for r in out:
        print(json.dumps({k: v for k, v in r.items() if k != "correct"}))
    if args.d2f:
        a, b = out[0]["correct"], out[1]["correct"]
        gained, lost = sum(y and not x for x, y in zip(a, b)), sum(x and not y for x, y in zip(a, b))
        print(f"veto vs none: gained {gained}, lost {lost}")
    model.close()


if __name__ == "__main__":
    main()
