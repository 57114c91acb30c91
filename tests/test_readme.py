"""README.md's Python blocks run as written, each on its own as a reader would paste it, on the embedded default
model. Every name a block reads must be bound in that block (checked from its syntax tree first, so a name in a
branch that does not run counts too). The OpenAI-client block talks to a server started as the README's
`lopa serve` line says (its API key, the default model's name); only the address is redirected to a free port."""

import ast
import builtins
import re
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"^```python\n(.*?)^```", README, re.S | re.M)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def unbound_names(source: str) -> set[str]:
    """Names the block loads but never binds (imports, assignments, loop and comprehension targets,
    function and lambda parameters, definitions) and that are not builtins."""
    tree = ast.parse(source)
    bound, loaded = set(dir(builtins)), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
    return loaded - bound


def test_readme_has_its_python_blocks():
    assert len(BLOCKS) >= 3 and any("generate_many" in b for b in BLOCKS) and any("OpenAI(" in b for b in BLOCKS)


def test_unbound_names_are_found():
    assert unbound_names("from lopa import generate\ngenerate(chat_model, prompts)") == {"chat_model", "prompts"}
    assert unbound_names("xs = [n for n in range(3)]\nfor x in xs:\n    print(x)") == set()


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs_as_written(index, monkeypatch, capsys):
    block = BLOCKS[index]
    assert not unbound_names(block), f"README block {index} reads undefined names: {unbound_names(block)}"
    if "OpenAI(" in block:
        with served_like_the_readme(monkeypatch):
            exec(compile(block, f"README.md python block {index}", "exec"), {})
    else:
        exec(compile(block, f"README.md python block {index}", "exec"), {})
    assert capsys.readouterr().out.strip(), "each block prints what it shows"


@contextmanager
def served_like_the_readme(monkeypatch):
    """A server with the flags of the README's `lopa serve` line; openai.OpenAI pointed at it."""
    pytest.importorskip("fastapi")
    import openai

    import lopa
    from lopa.config import ServeConfig
    from lopa.serve import BackgroundServer, create_app

    line = re.search(r"^lopa serve (.*?)(?:#|$)", README, re.M).group(1).split()
    flags = dict(zip(line[::2], line[1::2]))
    model = lopa.load_model(runner=lopa.RunnerConfig(max_num_seqs=int(flags["--max-num-seqs"])))
    with BackgroundServer(create_app(model, ServeConfig(api_key=flags["--api-key"]))) as url:

        class ToTheTestServer(openai.OpenAI):
            def __init__(self, *, base_url: str, **kwargs):
                assert base_url == f"http://127.0.0.1:{flags['--port']}/v1", base_url
                super().__init__(base_url=url + "/v1", max_retries=0, **kwargs)

        monkeypatch.setattr(openai, "OpenAI", ToTheTestServer)
        yield
