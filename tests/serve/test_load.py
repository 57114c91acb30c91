"""A bounded load test: 200 requests from 16 concurrent clients with mixed settings, over real HTTP.

The queue bound (14) is below the number of clients, so some requests get 429 (with Retry-After); the
client then retries, as the openai client does. Every request is answered (a 429 or a 200, none lost),
every 200 equals its prompt's solo decode through lopa.generate (none mixed up), and the server then
shuts down cleanly with nothing left in the engine.
"""

import threading
import time
from collections import Counter

import httpx
import pytest

import lopa

from .conftest import MAX_NUM_SEQS, serving

PROMPTS = [
    "Question: Tom has 3 apples and buys 4 more. How many apples?\nAnswer:",
    "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n",
]
SETTINGS = [
    dict(strategy="lopa", k=3, block_size=8, max_tokens=16),
    dict(strategy="d2f", block_size=8, max_tokens=16),
    dict(strategy="threshold", block_size=4, max_tokens=8),
    dict(strategy="lopa", k=2, block_size=8, max_tokens=16, temperature=0.7, seed=3),
]
N_REQUESTS, N_CLIENTS = 200, 16


def case(i: int) -> tuple[int, int]:
    return i % len(PROMPTS), (i // len(PROMPTS)) % len(SETTINGS)


@pytest.fixture(scope="module")
def solo(model):
    """(prompt, settings) -> the text lopa.generate gives alone."""
    out = {}
    for p, prompt in enumerate(PROMPTS):
        for s, settings in enumerate(SETTINGS):
            overrides = {k: v for k, v in settings.items() if k != "max_tokens"}
            out[p, s] = lopa.generate(model, prompt, gen_length=settings["max_tokens"], **overrides).text
    return out


def test_200_requests_from_16_clients_are_all_answered_and_none_is_mixed_up(model, solo):
    answers: dict[int, httpx.Response] = {}
    rejected: list[httpx.Response] = []
    with serving(model, max_pending=14) as (url, app):
        def client(c: int) -> None:
            with httpx.Client(base_url=url, timeout=120) as http:
                for i in range(c, N_REQUESTS, N_CLIENTS):
                    p, s = case(i)
                    while (r := http.post("/v1/completions", json={"model": model.path.name, "prompt": PROMPTS[p],
                                                                   **SETTINGS[s]})).status_code == 429:
                        rejected.append(r)
                        time.sleep(0.1)  # the server says Retry-After: 1; a shorter wait keeps the test fast
                    answers[i] = r

        threads = [threading.Thread(target=client, args=(c,)) for c in range(N_CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        core = app.state.core
    assert len(answers) == N_REQUESTS
    assert Counter(r.status_code for r in answers.values()) == {200: N_REQUESTS}
    assert all(r.headers["Retry-After"] == "1" and r.json()["error"]["code"] == "queue_full" for r in rejected)
    for i, response in answers.items():
        p, s = case(i)
        assert response.json()["choices"][0]["text"] == solo[p, s], (i, p, s)
    # clean shutdown: the engine thread joined (serving checks it), nothing in flight, nothing left in the engine
    assert core.pending == 0 and not core.outboxes
    assert not model.engine.has_work() and model.engine.num_running == 0
    # memory stays bounded: the KV pool never held more slots than max_num_seqs, and idle it is given back
    assert model.runner.peak_slots <= MAX_NUM_SEQS and model.runner.pool is None
