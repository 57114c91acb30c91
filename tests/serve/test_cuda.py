"""`lopa serve` on a GPU named plainly "cuda" (no index): the engine thread finds its device and answers."""

import httpx
import pytest
import torch

import lopa

from .conftest import serving

PROMPT = "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_server_on_cuda_answers_like_generate():
    model = lopa.load_model(runner=lopa.RunnerConfig(device="cuda", max_num_seqs=4))
    want = lopa.generate(model, PROMPT, gen_length=32, strategy="lopa", k=3)
    with serving(model) as (url, _):
        assert httpx.get(url + "/health").status_code == 200
        got = httpx.post(url + "/v1/completions", timeout=120, json={
            "model": model.path.name, "prompt": PROMPT, "max_tokens": 32, "strategy": "lopa", "k": 3}).json()
        assert got["choices"][0]["text"] == want.text, got
    model.close()
