"""Branch Parallel from a newcomer's plain script (no ``if __name__ == "__main__":`` guard): the worker ranks never
import the script, so its body runs once, it exits 0 and decodes the same tokens as one process."""

import os
import subprocess
import sys
from pathlib import Path

import lopa

SCRIPT = """\
import lopa

model = lopa.load_model({folder!r}, runner=lopa.RunnerConfig(device="cpu", dtype="float64", branch_parallel=2))
result = lopa.generate(model, [5, 6, 7, 8], strategy="lopa", k=3, gen_length=16, block_size=8)
print("tokens", result.token_ids)
"""


def test_a_script_without_a_main_guard_runs_its_body_once(tiny_dream_dir, tmp_path):
    script = tmp_path / "newcomer.py"
    script.write_text(SCRIPT.format(folder=str(tiny_dream_dir)))
    src = str(Path(lopa.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr and "Fatal" not in run.stderr, run.stderr  # the worker exited cleanly too
    lines = [line for line in run.stdout.splitlines() if line.startswith("tokens")]
    ref = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu", dtype="float64"))
    want = lopa.generate(ref, [5, 6, 7, 8], strategy="lopa", k=3, gen_length=16, block_size=8).token_ids
    assert lines == [f"tokens {want}"]
