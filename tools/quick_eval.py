import sys, time, json, lopa
from lopa.train.data import math_split, prompt_for, extract_answer
path, n = sys.argv[1], int(sys.argv[2])
m = lopa.load_model(path)
probs = math_split("test", n)
res = {}
for label, kw in [("d2f", dict(strategy="d2f")), ("lopa_k7", dict(strategy="lopa", k=7)), ("lopa_k14", dict(strategy="lopa", k=14)), ("threshold", dict(strategy="threshold"))]:
    ok = tok = fwd = 0; t = time.time()
    for ex in probs:
        r = lopa.generate(m, prompt_for(ex), gen_length=128, **kw)
        ok += extract_answer(r.text) == extract_answer(ex["answer"]); tok += r.stats.generated_tokens; fwd += r.stats.decode_forwards
    res[label] = dict(acc=ok / n, tpf=tok / fwd, secs=time.time() - t)
    print(label, res[label], flush=True)
print(json.dumps(res))
print("sample:", lopa.generate(m, prompt_for(probs[0]), gen_length=128, strategy="lopa", k=14).text)
