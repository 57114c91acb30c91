"""The engine tests' driver: requests join (and abort) at given engine steps, the engine steps until all finish;
and the device path's compiled update traced on the CPU."""

import contextlib

import torch


def run_steps(engine, seqs, joins, aborts=()):
    """Each prepared request of ``seqs`` joins at its step in ``joins`` (``aborts``: (request index, step)); the
    engine steps until every request has finished. -> (each request's final RequestOutput, each one's streamed
    chunks), by request index. A request that fails fails the test."""
    index = {s.id: i for i, s in enumerate(seqs)}
    finals, chunks, step = {}, [[] for _ in seqs], 0
    with torch.inference_mode():
        while len(finals) < len(seqs):
            for seq, at in zip(seqs, joins):
                if at == step:
                    engine.add(seq)
            for i, at in aborts:
                if at == step:
                    engine.abort(seqs[i].id)
            for out in engine.step():
                assert out.error is None, out.error
                chunks[index[out.request_id]].append(out.new_ids)
                if out.finished:
                    finals[index[out.request_id]] = out
            step += 1
    return [finals[i] for i in range(len(seqs))], chunks


@contextlib.contextmanager
def traced_update(monkeypatch):
    """The device path's compiled update (engine/device.py: compiled_update, uncached) with each phase traced by
    dynamo and its graph run as traced (no code generation: the CPU proxy of Inductor); other torch.compile calls
    as they are. Dynamo's caches are reset before and after. -> (the update, graphs traced per phase name, the
    shapes of the slots' tensors by field as the last traced graph saw them: ints where static, else symbols)."""
    from lopa.engine import device

    counts, slot_shapes = {}, {}
    compile_ = torch.compile

    def backend_for(name):
        def backend(gm, example_inputs):
            counts[name] = counts.get(name, 0) + 1
            slot_shapes.update({node.name.split("_st_")[1]: tuple(node.meta["example_value"].shape)
                                for node in gm.graph.nodes if node.op == "placeholder" and "_st_" in node.name})
            return gm.forward
        return backend

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, **kw) if fn.__name__ not in device.PHASES
                        else compile_(fn, **{**kw, "backend": backend_for(fn.__name__), "options": None}))
    torch._dynamo.reset()
    try:
        yield device.compiled_update.__wrapped__(), counts, slot_shapes
    finally:
        torch._dynamo.reset()
