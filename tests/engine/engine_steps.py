"""The engine tests' driver: requests join (and abort) at given engine steps, the engine steps until all finish."""

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
