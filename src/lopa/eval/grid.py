"""`lopa eval`'s runs and pairs: the grid of DecodeConfigs a command line asks for, and which runs are compared.

Runs: each strategy at each τ (and, for lopa, each k and each combination of the VARIANTS lists: branch score x
branch budget x score span x verify_lookahead), then the random
token-filling-order runs at the first k and τ. Every other DecodeConfig field the command sets applies to
every run. Pairs: ``--compare A,B``, else each branched run (lopa / published / random-tfo) against the d2f run
of its τ (never a run against itself: without a d2f run there is no default pair), plus each branch variant
against the first variant.
"""

from __future__ import annotations

import dataclasses

from ..config import DecodeConfig, decode_config
from ..errors import ConfigError
from ..request import check_config
from .harness import paired_difference

SWEEPS = tuple(f.name for f in dataclasses.fields(DecodeConfig) if f.metadata["sweep"])  # config.py: sweep=True
# the sweeps that make lopa variants (each combination a run, paired with the first), and their label names
VARIANTS = {"branch_confidence": "score", "k_policy": "budget", "score_span": "span", "verify_lookahead": "verify"}
assert set(SWEEPS) == {"k", "tau", *VARIANTS}, SWEEPS
BRANCHED = ("lopa", "published", "random-tfo")  # label prefixes of runs that branch (paired with d2f)


def branch_variants(decode: dict) -> list[tuple[str, dict]]:
    """(label suffix, DecodeConfig fields) for each combination of the lopa variant lists ``decode`` holds, in
    VARIANTS order (e.g. " score=count budget=text"); [("", {})] for none."""
    out = [("", {})]
    for name, short in VARIANTS.items():
        values = decode.get(name) or []
        out = [(label + f" {short}={str(v).lower() if isinstance(v, bool) else v}", {**fields, name: v})
               for label, fields in out for v in values] or out
    return out


def eval_configs(model_type: str, preset: str | None, strategies: list[str], decode: dict, random_tfo: int,
                 step_rows: int | None = None) -> tuple[dict, dict]:
    """(run label -> DecodeConfig, label -> the label it is also paired with). ``decode``: the command's
    DecodeConfig fields, the SWEEPS as lists. Every config is checked against the model family and the
    engine's ``step_rows`` before anything runs."""
    ks, taus = decode.get("k", []), decode.get("tau", [])
    variants = branch_variants(decode)
    common = {name: value for name, value in decode.items() if name not in SWEEPS}
    if len(set(strategies)) != len(strategies) or not strategies:
        raise ConfigError(f"strategies: must be a list of distinct strategy names, got {','.join(strategies)!r}")
    configs, refs = {}, {}
    for name in strategies:
        for t in taus or [None]:
            branching = name in ("lopa", "published")
            for kk in (ks or [None]) if branching else [0]:
                for variant, fields in (variants if name == "lopa" else [("", {})]):
                    extra = {k: v for k, v in (("tau", t), ("k", kk)) if v is not None}
                    if name == "published":
                        extra.update(strategy="lopa", compat="published")
                    cfg = decode_config(preset, model_type, **{"strategy": name, **common, **fields, **extra})
                    label = (name + (f" k={cfg.k}" if branching else "") + variant
                             + (f" tau={t}" if t is not None else ""))
                    configs[label] = cfg
                    if name == "lopa" and variant != variants[0][0]:  # also paired with the first variant
                        refs[label] = label.replace(variant, variants[0][0], 1)
    first = {k: v for k, v in (("k", ks[0] if ks else None), ("tau", taus[0] if taus else None)) if v is not None}
    first_k = decode_config(preset, model_type, **first).k
    for seed in range(random_tfo):
        label = f"random-tfo k={first_k} seed={seed}" + (f" tau={taus[0]}" if taus else "")
        configs[label] = decode_config(preset, model_type, **{**common, **first, "strategy": "lopa",
                                                              "branch_confidence": "random", "seed": seed})
    for cfg in configs.values():
        check_config(cfg, model_type=model_type, step_rows=step_rows)
    return configs, refs


def check_compare(compare: str | None, labels) -> tuple[str, str] | None:
    """``--compare A,B`` as two different run labels, or None."""
    if compare is None:
        return None
    named = compare.split(",")
    if len(named) != 2 or named[0] == named[1] or not set(named) <= set(labels):
        raise ConfigError(f"compare: must be two different run labels of {sorted(labels)}, got {compare!r}")
    return named[0], named[1]


def pairs(reports: list, refs: dict, compare: tuple[str, str] | None) -> tuple[list, str | None]:
    """(the paired differences to report, a note when the default baseline is missing)."""
    by_label = {r.label: r for r in reports}
    if compare:
        return [paired_difference(by_label[compare[0]], by_label[compare[1]])], None
    d2f = [r for r in reports if r.config["strategy"] == "d2f"]

    def base_for(report):  # the d2f run with the same τ, else the first d2f run (never the run itself)
        same_tau = [r for r in d2f if r.config["tau"] == report.config["tau"]]
        return (same_tau or d2f)[0]

    branched = [r for r in reports if r.label.startswith(BRANCHED)]
    out = [paired_difference(base_for(r), r) for r in branched] if d2f else []
    out += [paired_difference(by_label[ref], by_label[label]) for label, ref in refs.items()]
    note = None
    if branched and not d2f:
        note = ("No paired line against the default baseline: no d2f run (add d2f to --strategies, or name two "
                "runs with --compare A,B).")
    return out, note
