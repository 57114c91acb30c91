"""Grade-school math word problems in GSM8K's format, seeded and reproducible.

Each problem is a question, worked reasoning with the intermediate equations, and a final `#### <number>`
line. The reasoning has genuine free choices, as real model answers do: several phrasings per step, an
optional opening and closing line, independent steps in random order. That is what gives a diffusion
model a confidence landscape like Dream's (several valid fillings per position), where the token
filling order matters. Numbers stay small so the arithmetic is learnable by a small model.

Splits never share a question: a question's split is fixed by a hash of its text.
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Callable

NAMES = ["Mia", "Leo", "Ava", "Sam", "Zoe", "Max", "Lily", "Ben", "Nora", "Eli", "Ruby", "Owen", "Ivy", "Jack",
         "Emma", "Noah", "Ella", "Luke", "Anna", "Tom"]
ITEMS = [("apple", "apples"), ("pen", "pens"), ("book", "books"), ("card", "cards"), ("cookie", "cookies"),
         ("shell", "shells"), ("marble", "marbles"), ("sticker", "stickers"), ("cup", "cups"), ("ball", "balls")]
OPENINGS = ["", "", "Let's think step by step.", "We solve it step by step.", "Let's work it out.",
            "Here is the solution.", "We work through it one step at a time."]
CLOSINGS = ["", "So the answer is {z}.", "The answer is {z}.", "In total that is {z}.", "That makes {z}.",
            "Therefore the answer is {z}."]
SPLITS = ("train", "validation", "test")


def split_of(question: str) -> str:
    """test: 5% of questions, validation: 5%, train: the rest; fixed by the question's text."""
    bucket = int(hashlib.sha256(question.encode()).hexdigest(), 16) % 100
    return "test" if bucket < 5 else "validation" if bucket < 10 else "train"


def _say(rng: random.Random, options: list[str], **kw) -> str:
    return rng.choice(options).format(**kw)


def _finish(rng: random.Random, steps: list[str], z: int) -> str:
    lines = [line for line in [rng.choice(OPENINGS), *steps, rng.choice(CLOSINGS).format(z=z)] if line]
    return "\n".join(lines + [f"#### {z}"])


def shopping(rng: random.Random) -> tuple[str, str]:
    name = rng.choice(NAMES)
    (i1, p1), (i2, p2) = rng.sample(ITEMS, 2)
    a, b, x, y = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 9)
    q = f"{name} buys {a} {p1} for {x} dollars each and {b} {p2} for {y} dollars each. How many dollars does {name} spend?"
    s1 = _say(rng, ["The {p} cost {a} * {x} = {r} dollars.", "{n} pays {a} * {x} = {r} dollars for the {p}.",
                    "{a} {p} at {x} dollars each is {a} * {x} = {r} dollars.", "For the {p}: {a} * {x} = {r} dollars."], p=p1, a=a, x=x, r=a * x, n=name)
    s2 = _say(rng, ["The {p} cost {a} * {x} = {r} dollars.", "{n} pays {a} * {x} = {r} dollars for the {p}.",
                    "{a} {p} at {x} dollars each is {a} * {x} = {r} dollars.", "For the {p}: {a} * {x} = {r} dollars."], p=p2, a=b, x=y, r=b * y, n=name)
    steps = [s1, s2] if rng.random() < 0.5 else [s2, s1]
    z = a * x + b * y
    steps.append(_say(rng, ["Together {n} spends {u} + {v} = {z} dollars.", "In all it costs {u} + {v} = {z} dollars.",
                            "{u} + {v} = {z} dollars are spent.", "The total is {u} + {v} = {z} dollars."], n=name, u=a * x, v=b * y, z=z))
    return q, _finish(rng, steps, z)


def rates(rng: random.Random) -> tuple[str, str]:
    name = rng.choice(NAMES)
    r, d, extra = rng.randint(2, 9), rng.randint(2, 7), rng.randint(1, 9)
    q = (f"{name} reads {r} pages every day for {d} days, then reads {extra} more pages. "
         f"How many pages does {name} read in total?")
    steps = [_say(rng, ["In {d} days {n} reads {r} * {d} = {p} pages.", "{r} pages a day for {d} days is {r} * {d} = {p} pages.",
                        "Each day is {r} pages, so {d} days give {r} * {d} = {p} pages.", "First, {r} * {d} = {p} pages."], n=name, r=r, d=d, p=r * d)]
    z = r * d + extra
    steps.append(_say(rng, ["Then {p} + {e} = {z} pages.", "Adding the {e} more pages gives {p} + {e} = {z}.",
                            "With {e} more pages that is {p} + {e} = {z} pages.", "In total {n} reads {p} + {e} = {z} pages."], n=name, p=r * d, e=extra, z=z))
    return q, _finish(rng, steps, z)


def sharing(rng: random.Random) -> tuple[str, str]:
    name, items = rng.choice(NAMES), rng.choice(ITEMS)[1]
    k, each, keep = rng.randint(2, 6), rng.randint(2, 9), rng.randint(1, 9)
    total = k * each + keep
    q = (f"{name} has {total} {items}. {name} keeps {keep} and shares the rest equally among {k} friends. "
         f"How many {items} does each friend get?")
    steps = [_say(rng, ["{n} shares {t} - {k} = {r} {p}.", "After keeping {k}, {t} - {k} = {r} {p} are left.",
                        "There are {t} - {k} = {r} {p} to share.", "{n} gives away {t} - {k} = {r} {p}."], n=name, t=total, k=keep, r=total - keep, p=items),
             _say(rng, ["Each friend gets {r} / {f} = {z} {p}.", "{r} / {f} = {z} {p} for each friend.",
                        "So each of the {f} friends gets {r} / {f} = {z}.", "Split among {f} friends, that is {r} / {f} = {z} each."], r=total - keep, f=k, z=each, p=items)]
    return q, _finish(rng, steps, each)


def ages(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(NAMES, 2)
    age, diff, years = rng.randint(3, 15), rng.randint(2, 9), rng.randint(2, 9)
    q = f"{a} is {age} years old. {b} is {diff} years older than {a}. How old will {b} be in {years} years?"
    now = age + diff
    z = now + years
    steps = [_say(rng, ["{b} is {x} + {d} = {y} years old now.", "Now {b} is {x} + {d} = {y}.",
                        "{b}'s age is {x} + {d} = {y} years.", "Today {b} is {x} + {d} = {y}."], b=b, x=age, d=diff, y=now),
             _say(rng, ["In {t} years {b} will be {y} + {t} = {z}.", "{y} + {t} = {z} years old in {t} years.",
                        "After {t} years, {b} is {y} + {t} = {z} years old.", "Then {b} will be {y} + {t} = {z}."], b=b, t=years, y=now, z=z)]
    return q, _finish(rng, steps, z)


def percent(rng: random.Random) -> tuple[str, str]:
    name, items = rng.choice(NAMES), rng.choice(ITEMS)[1]
    pct = rng.choice([10, 20, 25, 50])
    n = (100 // pct) * rng.randint(1, 9)
    part = n * pct // 100
    q = f"{name} has {n} {items} and gives away {pct}% of them. How many {items} does {name} have left?"
    steps = [_say(rng, ["{p}% of {n} is {n} * {p} / 100 = {g}.", "{n} gives away {n} * {p} / 100 = {g} {i}.",
                        "Giving away {p}% means {n} * {p} / 100 = {g} {i}.", "The part given away is {n} * {p} / 100 = {g}."], p=pct, n=n, g=part, i=items),
             _say(rng, ["{n} has {t} - {g} = {z} {i} left.", "That leaves {t} - {g} = {z} {i}.", "{t} - {g} = {z} {i} remain.", "So {t} - {g} = {z} {i} are left."],
                  n=name, t=n, g=part, z=n - part, i=items)]
    return q, _finish(rng, steps, n - part)


def collecting(rng: random.Random) -> tuple[str, str]:
    """Multi-step: 3 to 5 independent gains and losses, steps in random order."""
    name, items = rng.choice(NAMES), rng.choice(ITEMS)[1]
    start = rng.randint(5, 30)
    events = [(rng.choice(["finds", "gets", "buys"]), rng.randint(1, 9)) for _ in range(rng.randint(2, 4))]
    events.append(("loses", rng.randint(1, 5)))
    rng.shuffle(events)
    q = f"{name} has {start} {items}. " + " ".join(f"Then {name} {verb} {n}." for verb, n in events) + \
        f" How many {items} does {name} have now?"
    total = start
    steps = []
    for verb, n in events:
        new = total - n if verb == "loses" else total + n
        op = "-" if verb == "loses" else "+"
        steps.append(_say(rng, ["{a} {o} {n} = {b}.", "After that, {a} {o} {n} = {b} {i}.", "Now {a} {o} {n} = {b}.", "Then {a} {o} {n} = {b} {i}."],
                          a=total, o=op, n=n, b=new, i=items))
        total = new
    return q, _finish(rng, steps, total)


TEMPLATES: list[Callable[[random.Random], tuple[str, str]]] = [shopping, rates, sharing, ages, percent, collecting]


def math_split(split: str, n: int, seed: int = 0) -> list[dict]:
    """n distinct problems of one split: [{"question", "answer"}], the answer ending in `#### <number>`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"{split}-{seed}")
    seen: set[str] = set()
    out = []
    while len(out) < n:
        q, a = rng.choice(TEMPLATES)(rng)
        if q in seen or split_of(q) != split:
            continue
        seen.add(q)
        out.append({"question": q, "answer": a})
    return out


def prompt_for(example: dict) -> str:
    """The exact prompt text the default model is trained on."""
    return f"Question: {example['question']}\nAnswer:\n"


ANSWER_RE = re.compile(r"####\s*(-?[\d,]+(?:\.\d+)?)")


def extract_answer(text: str) -> str | None:
    """The number after the first `####`, normalized (commas dropped); None if there is none."""
    m = ANSWER_RE.search(text)
    return m.group(1).replace(",", "") if m else None
