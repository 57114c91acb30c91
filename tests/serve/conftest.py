"""The default model on CPU, shared by the server tests, and a server on 127.0.0.1 in a thread."""

from contextlib import contextmanager

import pytest
import torch

import lopa
from lopa.config import ServeConfig
from lopa.serve import BackgroundServer, create_app

MAX_NUM_SEQS = 16


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The server tests run a server, its engine thread and clients on 2 cores shared with other work, where
    torch's spinning intra-op threads cost several times their gain; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def model():
    return lopa.load_model(runner=lopa.RunnerConfig(device="cpu", max_num_seqs=MAX_NUM_SEQS))


@contextmanager
def serving(model, engine=None, **settings):
    """Yields (base url, app) while a real uvicorn serves ``create_app(model, ServeConfig(**settings))``."""
    app = create_app(model, ServeConfig(**settings), engine=engine)
    with BackgroundServer(app) as url:
        yield url, app
    assert not app.state.core.thread.is_alive(), "the engine thread did not stop with the server"


def metric(text: str, name: str) -> float:
    """One sample's value from Prometheus text (0 when absent): metric(body, 'lopa_requests_total{status="ok"}')."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
