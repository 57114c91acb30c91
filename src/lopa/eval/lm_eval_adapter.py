"""EleutherAI lm-evaluation-harness adapter (generate_until tasks).

lm-eval discovers no plugins, so the `lopa-lm-eval` command registers the model "lopa" and then runs
lm-eval's own CLI:

    lopa-lm-eval run --model lopa --model_args pretrained=PATH,strategy=lopa,k=10 --tasks gsm8k
    python -m lopa.eval.lm_eval_adapter run --model lopa ...          # the same

`model_args` besides pretrained / adapter / device / dtype are DecodeConfig fields (strategy, k, tau,
block_size, ...). `max_gen_toks` from the task becomes gen_length; the task's `until` strings cut the text.
Install with `pip install 'lopa[lmeval]'`.
"""

from __future__ import annotations

import dataclasses

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..api import generate, load_model
from ..config import DecodeConfig, RunnerConfig
from ..errors import ConfigError

DECODE_FIELDS = {f.name: f.type for f in dataclasses.fields(DecodeConfig)}


def _typed(name: str, value):
    """lm-eval hands model_args over as parsed scalars or strings; coerce to the DecodeConfig field's type."""
    if not isinstance(value, str):
        return value
    kind = str(DECODE_FIELDS[name])
    if "bool" in kind:
        return value.lower() in ("1", "true", "yes")
    if kind.startswith("int"):
        return int(value)
    if kind.startswith("float"):
        return float(value)
    return value


@register_model("lopa")
class LopaLM(LM):
    def __init__(self, pretrained: str | None = None, adapter: str | None = None, device: str = "auto",
                 dtype: str = "auto", quantize: str | None = None, batch_size: int | str = 1,
                 max_batch_size: int | None = None, **decode) -> None:
        super().__init__()
        unknown = sorted(set(decode) - set(DECODE_FIELDS))
        if unknown:
            raise ConfigError(f"model_args: unknown lopa option(s) {unknown}; known: {sorted(DECODE_FIELDS)}")
        self.decode = {name: _typed(name, value) for name, value in decode.items()}
        runner = RunnerConfig(device=device, dtype=dtype, quantize=quantize or None)  # quantize: int8 | fp8
        self.model = load_model(pretrained or None, adapter=adapter, runner=runner)
        self.stats = []  # one lopa Stats per request, for whoever wants TPF next to lm-eval's scores

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outputs = []
        for request in requests:
            context, gen_kwargs = request.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else until
            settings = dict(self.decode)
            if "max_gen_toks" in gen_kwargs:
                settings["gen_length"] = int(gen_kwargs["max_gen_toks"])
            result = generate(self.model, context, **settings)
            text = result.text
            for stop in until:
                text = text.split(stop)[0]
            outputs.append(text)
            self.stats.append(result.stats)
        return outputs

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("lopa decodes with diffusion strategies and scores no log-likelihoods: "
                                  "use generate_until tasks")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("lopa scores no log-likelihoods: use generate_until tasks")


def main() -> None:
    import lm_eval.models  # noqa: F401  (lm-eval imports its own models only while its registry is empty)
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
