"""A Branch Parallel worker rank started by rank 0 (launch.start): ``python -m lopa.runner.worker``.

Its job arrives on stdin as two length-prefixed pickles: (rank 0's sys.path, its script's path, this rank)
first, then the job (world, store port, device, timeout, commit mode, check, and the worker callable: load
the same model source, build the same engine, follow rank 0). It imports lopa and the source's module only,
never the user's script, so a script without ``if __name__ == "__main__":`` runs its body once. Only a
source class defined in the script itself needs the script: then it is imported as ``__mp_main__`` (what
multiprocessing's spawn does). stdin stays open while rank 0 lives; when it closes (rank 0 exited or died)
the worker exits. Workers run in their own session: a Ctrl-C reaches rank 0 only, and its exit ends them.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import sys
import threading

from ..errors import BranchParallelError, LopaError
from .launch import RANK_ENV, run_worker


def _read(fd: int) -> bytes:
    """One length-prefixed message from the pipe (raw reads: no buffered reader a daemon thread could hold)."""
    data = b""
    for size in (8, None):
        want = int.from_bytes(data, "little") if size is None else size
        data = b""
        while len(data) < want:
            chunk = os.read(fd, want - len(data))
            if not chunk:
                raise BranchParallelError("branch parallel worker: rank 0 closed the pipe before sending the job")
            data += chunk
    return data


def _exit_when_orphaned(fd: int) -> None:
    while os.read(fd, 1 << 16):  # returns b"" at EOF: rank 0's end of the pipe closed
        pass
    os._exit(1)


def _load_job(data: bytes, script: str | None):
    """Unpickle the job; if it names a class of rank 0's script (``__main__``), import the script first."""
    try:
        return pickle.loads(data)
    except AttributeError:  # "Can't get attribute 'X' on <module '__main__' ...>": X lives in the script
        if not script:
            raise
    spec = importlib.util.spec_from_file_location("__mp_main__", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules["__mp_main__"] = sys.modules["__main__"] = module
    spec.loader.exec_module(module)
    return pickle.loads(data)


def main() -> None:
    fd = sys.stdin.fileno()
    sys_path, script, rank = pickle.loads(_read(fd))
    sys.path[:] = sys_path
    os.environ[RANK_ENV] = str(rank)
    data = _read(fd)
    threading.Thread(target=_exit_when_orphaned, args=(fd,), name="lopa-bp-orphan", daemon=True).start()
    try:
        run_worker(rank, **_load_job(data, script))
    except LopaError as err:  # one line (rank 0 reports that this rank did not start); no traceback
        print(f"error: lopa worker rank {rank}: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
