"""Small Python function tasks in HumanEval's shape: prompt (signature + docstring), canonical solution,
test code defining check(candidate), entry point. Seeded; splits share no task (hash of the prompt)."""

from __future__ import annotations

import random

from .gsm import SPLITS, split_of

VERBS = ["Compute", "Return", "Find", "Give back"]
NUM = ["x", "n", "value", "num", "k"]
SEQ = ["xs", "values", "nums", "items"]
TEXT = ["s", "text", "word", "line"]


def _scale(rng: random.Random) -> dict:
    name, k, x = rng.choice(["scale", "times", "multiply_by"]), rng.randint(2, 9), rng.choice(NUM)
    fn = f"{name}_{k}"
    cases = [(v, v * k) for v in rng.sample(range(-9, 20), 4)]
    return dict(entry_point=fn, signature=f"def {fn}({x}: int) -> int:",
                doc=f"{rng.choice(VERBS)} {x} multiplied by {k}.", body=f"    return {x} * {k}\n", cases=cases)


def _sum_above(rng: random.Random) -> dict:
    t, xs_name = rng.randint(0, 9), rng.choice(SEQ)
    fn = f"sum_above_{t}"
    cases = []
    for _ in range(4):
        xs = [rng.randint(-5, 15) for _ in range(rng.randint(0, 6))]
        cases.append((xs, sum(v for v in xs if v > t)))
    return dict(entry_point=fn, signature=f"def {fn}({xs_name}: list) -> int:",
                doc=f"{rng.choice(VERBS)} the sum of the numbers in {xs_name} that are greater than {t}.",
                body=f"    return sum(v for v in {xs_name} if v > {t})\n", cases=cases)


def _count_char(rng: random.Random) -> dict:
    ch, s_name = rng.choice("aeiouxyz"), rng.choice(TEXT)
    fn = f"count_{ch}"
    words = ["banana", "apple", "xylophone", "queue", "zebra", "yoyo", "", "aeiou", "fizz"]
    cases = [(w, w.count(ch)) for w in rng.sample(words, 4)]
    return dict(entry_point=fn, signature=f"def {fn}({s_name}: str) -> int:",
                doc=f"Count how many times the letter '{ch}' occurs in {s_name}.",
                body=f"    return {s_name}.count('{ch}')\n", cases=cases)


def _clip(rng: random.Random) -> dict:
    lo, x = rng.randint(-5, 3), rng.choice(NUM)
    hi = lo + rng.randint(2, 9)
    fn = f"clip_{abs(lo)}_{hi}" if lo >= 0 else f"clip_m{abs(lo)}_{hi}"
    cases = [(v, min(max(v, lo), hi)) for v in rng.sample(range(-12, 18), 4)]
    return dict(entry_point=fn, signature=f"def {fn}({x}: int) -> int:",
                doc=f"{rng.choice(VERBS)} {x} limited to the range [{lo}, {hi}].",
                body=f"    return min(max({x}, {lo}), {hi})\n", cases=cases)


def _every_nth(rng: random.Random) -> dict:
    n, xs_name = rng.randint(2, 4), rng.choice(SEQ)
    fn = f"every_{n}th"
    cases = []
    for _ in range(4):
        xs = [rng.randint(0, 9) for _ in range(rng.randint(0, 9))]
        cases.append((xs, xs[::n]))
    return dict(entry_point=fn, signature=f"def {fn}({xs_name}: list) -> list:",
                doc=f"{rng.choice(VERBS)} every {n}th element of {xs_name}, starting with the first.",
                body=f"    return {xs_name}[::{n}]\n", cases=cases)


TEMPLATES = [_scale, _sum_above, _count_char, _clip, _every_nth]


def code_split(split: str, n: int, seed: int = 0) -> list[dict]:
    """n distinct tasks: {"task_id", "prompt", "canonical_solution", "test", "entry_point"} (HumanEval's fields)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"code-{split}-{seed}")
    seen: set[str] = set()
    out: list[dict] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n + 1000:
            raise ValueError(f"only {len(out)} distinct {split} code tasks exist; asked for {n}")
        t = rng.choice(TEMPLATES)(rng)
        prompt = f'{t["signature"]}\n    """{t["doc"]}"""\n'
        if prompt in seen or split_of(prompt) != split:
            continue
        seen.add(prompt)
        checks = "".join(f"    assert candidate({a!r}) == {b!r}\n" for a, b in t["cases"])
        out.append({"task_id": f"lopa-code/{split}/{len(out)}", "prompt": prompt, "canonical_solution": t["body"],
                    "test": f"def check(candidate):\n{checks}", "entry_point": t["entry_point"]})
    return out
