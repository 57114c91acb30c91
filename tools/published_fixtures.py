"""Record what the published LoPA code decodes, as JSON fixtures for lopa's `published` compatibility mode.

The published code (zhijie-group/LoPA, `scale_dream_d2f/scale_dream_d2f.py`) is run as is, on CPU, in its
own virtualenv with the library versions it was written for; none of it is copied here. Only its outputs
are recorded: for every setting of a grid and every prompt, the generated ids, the step count it reports,
and per round the number of branch forwards and the winning branch (its index in the round's run order).
Runs that never end (the published loop has no round cap) are stopped after ``--cap`` rounds and recorded
as non-terminating, with the base branch's tokens at that point.

Usage (from the repository root):

    git -C /path/to/LoPA archive 433177a scale_dream_d2f | tar -x -C /tmp/published
    python3 -m venv /tmp/pubvenv && /tmp/pubvenv/bin/pip install torch transformers==4.49.0 \\
        accelerate datasets peft lm-eval==0.4.8
    .venv/bin/python tools/published_fixtures.py --python /tmp/pubvenv/bin/python \\
        --source /tmp/published/scale_dream_d2f --commit 433177a608dee8901bae0e7c02f9b6f341a6f6d0 \\
        --out tests/fixtures/published_lopa.json

The first stage (lopa's environment) writes the random Dream-format checkpoints with
`lopa.models.tiny.write_tiny_checkpoint`, exactly as tests/decoding/test_published.py rebuilds them, and the
second stage (``--worker``, the published environment) decodes with them. The worker imports nothing from lopa.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

# The grid. Threshold sets (tau, block_add_threshold, decoded_token_threshold): the published scripts' GSM8K/MATH
# and MBPP/HumanEval rows, then lower ones that fill more per round on a random checkpoint.
THRESHOLDS = [(0.9, 0.1, 0.95), (0.95, 0.3, 0.95), (0.7, 0.5, 0.8), (0.5, 0.2, 0.6), (0.3, 0.05, 0.3)]
BLOCKS = [8, 16]
GEN_LENGTHS = [32, 64]
LOOKAHEADS = [0, 2, 3, 7]  # lopa's k; the published branching factor is 1 for k = 0 and k otherwise
CHECKPOINTS = [  # write_tiny_checkpoint arguments
    {"seed": 1, "weight_std": 0.4, "logit_scale": 1.0},
    {"seed": 2, "weight_std": 0.2, "logit_scale": 2.0},
    {"seed": 3, "weight_std": 0.4, "logit_scale": 1.0, "special_scale": 1.6},  # EOS and the mask id predicted often
]
PROMPT_LENGTHS = [5, 12]


def branching_factor(k: int) -> int:
    if k == 1:
        raise ValueError("the published code cannot run exactly one lookahead")
    return 1 if k == 0 else k


def prompts_for(seed: int, vocab: int, specials: set[int]) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    ordinary = [t for t in range(vocab) if t not in specials]
    return [[rng.choice(ordinary) for _ in range(n)] for n in PROMPT_LENGTHS]


# ---------------------------------------------------------------------------------------------------------
# Worker: runs inside the published code's environment.
# ---------------------------------------------------------------------------------------------------------
class RoundCap(Exception):
    pass


def worker(job: dict) -> dict:
    import torch

    sys.path.insert(0, job["source"])
    import scale_dream_d2f as S  # noqa: E402  (the published module)
    from model_cache.dream.model_dream import DreamModel  # noqa: E402

    dtype = getattr(torch, job["dtype"])
    torch.set_num_threads(1)
    results = []
    for ckpt in job["checkpoints"]:
        model = DreamModel.from_pretrained(ckpt["path"], torch_dtype=dtype).eval()
        for setting in job["settings"]:
            for prompt in ckpt["prompts"]:
                results.append(decode_once(S, model, dtype, ckpt, setting, prompt, job["cap"]))
                print(".", end="", flush=True, file=sys.stderr)
    print(file=sys.stderr)
    import transformers

    return {"results": results, "transformers": transformers.__version__, "torch": torch.__version__}


def decode_once(S, model, dtype, ckpt: dict, setting: dict, prompt: list[int], cap: int) -> dict:
    import types

    import torch

    lm = S.DreamLoRA.__new__(S.DreamLoRA)  # the lm-eval wrapper without its loader: attributes as its __init__ sets them
    counter = types.SimpleNamespace(n=0)

    class CountingModel:
        def __call__(self, *args, **kwargs):
            counter.n += 1
            return model(*args, **kwargs)

        def eval(self):
            return model.eval()

    lm.model = CountingModel()
    lm._device = torch.device("cpu")
    lm.tokenizer = types.SimpleNamespace(eos_token_id=ckpt["eos_id"])
    lm.target_dtype = dtype
    lm.max_length = 512
    lm.max_new_tokens = setting["gen_length"]
    lm.block_size = setting["block_size"]
    lm.mask_token_id = ckpt["mask_id"]
    lm.skip_threshold = setting["tau"]
    lm.block_add_threshold = setting["add_threshold"]
    lm.decoded_token_threshold = setting["complete_threshold"]
    lm.branching_factor = branching_factor(setting["k"])
    # test_dream_d2f_LoPA.sh's values (after lm-eval's string parsing) and the constructor's defaults
    lm.sampling_strategy = "neg_entropy"
    lm.temperature, lm.top_p, lm.top_k = 0, None, None
    lm.branch_topp, lm.selection_conf_alpha = 1, 0
    lm.max_branches_kept, lm.branch_confidence_decay = 1, 0.8
    lm.branch_verification_mode, lm.base_branch_competition, lm.verification_force_base_winner = True, True, False
    lm.use_full_attention, lm.use_uncertainty_logic, lm.debug_print = True, True, False
    lm.shared_past_key_values, lm.shared_last_logits = None, None

    rounds: list[dict] = []
    at_cap: list[int] | None = None
    find_shared_prefix_end = S.find_shared_prefix_end
    evaluate_branch_confidence = S.evaluate_branch_confidence
    generate_additional = lm._generate_additional_branches

    def round_start(branches):  # called once per round that runs forwards
        nonlocal at_cap
        if len(rounds) == cap:
            base = next((b for b in branches if b.is_base), branches[0])
            at_cap = base.x_t[0].tolist()
            raise RoundCap
        rounds.append({"order": [], "forwards_before": counter.n, "winner": 0})
        return find_shared_prefix_end(branches)

    def scored(logits, branch, *args, **kwargs):
        rounds[-1]["order"].append(branch)
        return evaluate_branch_confidence(logits, branch, *args, **kwargs)

    def spawn(newly, winner, *args):
        order = rounds[-1]["order"]
        rounds[-1]["winner"] = next(i for i, b in enumerate(order) if b is winner)
        return generate_additional(newly, winner, *args)

    S.find_shared_prefix_end, S.evaluate_branch_confidence = round_start, scored
    lm._generate_additional_branches = spawn
    record = {"checkpoint": ckpt["index"], "setting": setting, "prompt": prompt}
    try:
        ids, steps, tokens, stats = lm._generate_enhanced_speculative(torch.tensor([prompt]))
        record.update(terminated=True, output=ids, steps=steps, tokens=tokens, parallel_steps=stats["parallel_steps"])
    except RoundCap:
        record.update(terminated=False, at_cap=at_cap)
    finally:
        S.find_shared_prefix_end, S.evaluate_branch_confidence = find_shared_prefix_end, evaluate_branch_confidence
    ends = [r["forwards_before"] for r in rounds[1:]] + [counter.n]  # the cap stops a round before its forwards
    for r, end in zip(rounds, ends):
        r["forwards"] = end - r["forwards_before"]
        assert r["forwards"] == len(r["order"]), "every forward of a round is scored once"
    record["forwards"] = [r["forwards"] for r in rounds]
    record["winners"] = [r["winner"] for r in rounds]
    return record


# ---------------------------------------------------------------------------------------------------------
# Driver: runs in lopa's environment.
# ---------------------------------------------------------------------------------------------------------
def settings() -> list[dict]:
    out = []
    for (tau, add, complete), block, gen, k in itertools.product(THRESHOLDS, BLOCKS, GEN_LENGTHS, LOOKAHEADS):
        out.append({"tau": tau, "add_threshold": add, "complete_threshold": complete, "block_size": block,
                    "gen_length": gen, "k": k})
    return out


def write_checkpoints(folder: Path) -> list[dict]:
    from lopa.models.config import ModelConfig
    from lopa.models.tiny import write_tiny_checkpoint

    out = []
    for i, kwargs in enumerate(CHECKPOINTS):
        path = write_tiny_checkpoint(folder / f"ckpt{i}", **kwargs)
        cfg = ModelConfig.from_file(path / "config.json")
        specials = {cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id}
        out.append({"index": i, "path": str(path), "args": kwargs, "mask_id": cfg.mask_token_id,
                    "eos_id": cfg.eos_token_id, "prompts": prompts_for(100 + i, cfg.vocab_size, specials),
                    "sha256": hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", help="interpreter of the published code's virtualenv")
    ap.add_argument("--source", help="folder holding scale_dream_d2f.py (an archive of the published repo)")
    ap.add_argument("--commit", help="commit of the published code the source came from")
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/published_lopa.json"))
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--cap", type=int, default=200, help="rounds after which a run counts as non-terminating")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # job file (internal: second stage)
    args = ap.parse_args()
    if args.worker:
        job = json.loads(args.worker.read_text())
        args.worker.with_suffix(".out.json").write_text(json.dumps(worker(job)))
        return
    if not (args.python and args.source and args.commit):
        ap.error("--python, --source and --commit are required")
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = write_checkpoints(Path(tmp))
        job = {"source": str(Path(args.source).resolve()), "dtype": args.dtype, "cap": args.cap,
               "checkpoints": ckpts, "settings": settings()}
        job_file = Path(tmp) / "job.json"
        job_file.write_text(json.dumps(job))
        subprocess.run([args.python, __file__, "--worker", str(job_file)], check=True)
        done = json.loads(job_file.with_suffix(".out.json").read_text())
    for c in ckpts:
        del c["path"]
    fixture = {
        "meta": {"source": "github.com/zhijie-group/LoPA", "commit": args.commit,
                 "entry": "scale_dream_d2f.py: DreamLoRA._generate_enhanced_speculative",
                 "transformers": done["transformers"], "torch": done["torch"], "dtype": args.dtype, "device": "cpu",
                 "cap": args.cap, "date": date.today().isoformat(),
                 "fixed": "sampling_strategy=neg_entropy, temperature=0, branch_topp=1, selection_conf_alpha=0, "
                          "branch_verification_mode, base_branch_competition, use_full_attention",
                 "tool": "tools/published_fixtures.py"},
        "checkpoints": ckpts,
        "runs": done["results"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(fixture, separators=(",", ":")))
    runs = fixture["runs"]
    stuck = sum(not r["terminated"] for r in runs)
    print(f"{len(runs)} runs ({stuck} non-terminating) -> {args.out} ({args.out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
