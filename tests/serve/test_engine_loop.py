"""The engine thread (serve/engine_loop.py) against a fake engine: delivery, bounds, abort, failure, shutdown."""

import asyncio

import pytest

from lopa.config import DecodeConfig
from lopa.errors import EngineDeadError, QueueFullError
from lopa.serve.engine_loop import AsyncEngine

from .fakes import FakeEngine, fake_answer

CFG = DecodeConfig(gen_length=10, block_size=4)


async def drain(box):
    outs = []
    while True:
        item = await box.get()
        if isinstance(item, BaseException):
            raise item
        outs.append(item)
        if item.finished:
            return outs


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_outputs_reach_their_own_request_in_blocks_and_only_the_engine_thread_drives_the_engine():
    async def main():
        fake = FakeEngine()
        core = AsyncEngine(fake, max_pending=8)
        core.start()
        prompts = [[1, 2, 3], [7], [4, 5]]
        boxes = [core.submit(fake.prepare(p, CFG, request_id=f"r{i}")) for i, p in enumerate(prompts)]
        results = [await drain(b) for b in boxes]
        assert core.pending == 0
        await core.shutdown()
        return fake, prompts, results, core

    fake, prompts, results, core = run(main())
    for prompt, outs in zip(prompts, results):
        assert [len(o.new_ids) for o in outs] == [4, 4, 2]
        assert sum((o.new_ids for o in outs), []) == fake_answer(prompt, 10) == outs[-1].result.token_ids
        assert outs[-1].finish_reason == "length"
    assert fake.thread_ids == {core.thread.ident}
    assert not core.thread.is_alive()


def test_queue_bound_raises_queue_full_and_frees_when_a_request_ends():
    async def main():
        fake = FakeEngine()
        fake.gate.clear()  # the engine is paused: nothing finishes
        core = AsyncEngine(fake, max_pending=2)
        core.start()
        a = core.submit(fake.prepare([1], CFG, request_id="a"))
        core.submit(fake.prepare([2], CFG, request_id="b"))
        with pytest.raises(QueueFullError):
            core.submit(fake.prepare([3], CFG, request_id="c"))
        fake.gate.set()
        await drain(a)
        while core.pending == 2:
            await asyncio.sleep(0.01)
        core.submit(fake.prepare([3], CFG, request_id="c"))  # room again
        await core.shutdown()

    run(main())


def test_abort_delivers_a_final_abort_output_and_frees_the_place():
    async def main():
        fake = FakeEngine()
        fake.gate.clear()
        core = AsyncEngine(fake, max_pending=4)
        core.start()
        box = core.submit(fake.prepare([1, 2], DecodeConfig(gen_length=400, block_size=1), request_id="x"))
        core.abort("x")
        fake.gate.set()
        outs = await drain(box)
        await core.shutdown()
        return outs, core

    outs, core = run(main())
    assert outs[-1].finish_reason == "abort" and outs[-1].result is None
    assert len(outs) < 400 and core.pending == 0


def test_a_failing_step_fans_the_error_out_to_every_waiter_and_later_submits():
    async def main():
        fake = FakeEngine()
        fake.gate.clear()
        core = AsyncEngine(fake, max_pending=8)
        core.start()
        boxes = [core.submit(fake.prepare([i + 1], CFG, request_id=f"r{i}")) for i in range(3)]
        fake.fail_next = True
        fake.gate.set()
        errors = []
        for box in boxes:
            with pytest.raises(EngineDeadError) as info:
                await drain(box)
            errors.append(str(info.value))
        assert not core.alive
        with pytest.raises(EngineDeadError):
            core.submit(fake.prepare([1], CFG, request_id="late"))
        await core.shutdown()
        return errors

    errors = run(main())
    assert all("device lost" in e for e in errors)


def test_shutdown_aborts_what_runs_and_joins_the_thread():
    async def main():
        fake = FakeEngine()
        core = AsyncEngine(fake, max_pending=8)
        core.start()
        box = core.submit(fake.prepare([1], DecodeConfig(gen_length=10**6, block_size=1), request_id="long"))
        first = await box.get()
        await core.shutdown()
        rest = []
        while not box.empty():
            rest.append(box.get_nowait())
        return first, rest, core

    first, rest, core = run(main())
    assert not first.finished
    assert rest[-1].finish_reason == "abort"
    assert not core.thread.is_alive() and not core.alive
