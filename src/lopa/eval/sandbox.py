"""Run untrusted generated code in a separate, limited process: a time limit, a memory limit, no network
(sockets are disabled inside the child), a throwaway working directory, isolated interpreter (`-I`)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import dataclass

PRELUDE = """
import resource, socket
resource.setrlimit(resource.RLIMIT_AS, ({mem}, {mem}))
def _no_network(*a, **k):
    raise OSError("network access is disabled in the lopa sandbox")
socket.socket = _no_network
socket.create_connection = _no_network
"""


@dataclass(frozen=True)
class Outcome:
    passed: bool
    status: str  # "passed" | "failed" | "timeout"
    detail: str = ""


def run_program(program: str, timeout_s: float = 10.0, memory_bytes: int = 1 << 30) -> Outcome:
    source = PRELUDE.format(mem=memory_bytes) + "\n" + program
    with tempfile.TemporaryDirectory(prefix="lopa-sandbox-") as cwd:
        try:
            proc = subprocess.run([sys.executable, "-I", "-c", source], cwd=cwd, capture_output=True, text=True,
                                  timeout=timeout_s, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return Outcome(False, "timeout", f"killed after {timeout_s} s")
    if proc.returncode == 0:
        return Outcome(True, "passed")
    return Outcome(False, "failed", proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")


def check_humaneval(prompt: str, completion: str, test: str, entry_point: str, timeout_s: float = 10.0) -> Outcome:
    """HumanEval's protocol: prompt + completion, then the task's tests, then check(entry_point)."""
    return run_program(f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n", timeout_s)
