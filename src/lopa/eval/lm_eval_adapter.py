"""EleutherAI lm-evaluation-harness adapter (generate_until tasks).

lm-eval discovers no plugins, so the `lopa-lm-eval` command registers the model "lopa" and then runs
lm-eval's own CLI:

    lopa-lm-eval run --model lopa --model_args pretrained=PATH,strategy=lopa,k=10 --tasks gsm8k
    python -m lopa.eval.lm_eval_adapter run --model lopa ...          # the same

`model_args` besides pretrained / adapter / device / dtype are DecodeConfig fields (strategy, k, tau,
block_size, ...). `max_gen_toks` from the task becomes gen_length; the task's `until` strings cut the text.
Without `--device`, lopa picks its own `auto` (a GPU if there is one) instead of lm-eval's `cuda:0`. lopa's
counts (TPF, decode forwards, tokens) go to stderr and, with `--output_path`, to `lopa_stats_<date>.json`
beside lm-eval's `results_<date>.json`. Install with `pip install 'lopa[lmeval]'`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..api import generate, load_model
from ..config import DecodeConfig, RunnerConfig
from ..errors import ConfigError, LopaError

DECODE_FIELDS = {f.name: f.type for f in dataclasses.fields(DecodeConfig)}
LOPA_HELP = f"""lopa's model (--model lopa): --model_args key=value,... with
  pretrained=PATH      HF Dream / LLaDA folder (default: lopa's embedded model)
  adapter=PATH         PEFT LoRA adapter folder to merge (e.g. a D2F adapter)
  dtype=auto           auto | float32 | bfloat16 | float16 | float64
  quantize=            int8 | fp8 (decoder Linears)
  and any DecodeConfig field: {", ".join(DECODE_FIELDS)}
  (defaults: lopa.DecodeConfig(); the task's max_gen_toks sets gen_length).
--device defaults to lopa's auto (cuda if available, else cpu). lopa's counts (TPF = tokens up to EOS / decode
forwards, prefill apart) are printed and written to lopa_stats_<date>.json beside results_<date>.json.
"""
_CREATED: list["LopaLM"] = []  # the models this process built, so that main() can report their counts


def _typed(name: str, value):
    """lm-eval hands model_args over as parsed scalars or strings; coerce to the DecodeConfig field's type."""
    if not isinstance(value, str):
        return value
    kind = str(DECODE_FIELDS[name])
    if "None" in kind and value.lower() in ("none", ""):
        return None
    if "bool" in kind:
        return value.lower() in ("1", "true", "yes")
    try:
        if kind.startswith("int"):
            return int(value)
        if kind.startswith("float"):
            return float(value)
    except ValueError:
        raise ConfigError(f"model_args: {name}={value!r} must be {kind}") from None
    return value


@register_model("lopa")
class LopaLM(LM):
    def __init__(self, pretrained: str | None = None, adapter: str | None = None, device: str = "auto",
                 dtype: str = "auto", quantize: str | None = None, batch_size: int | str = 1,
                 max_batch_size: int | None = None, **decode) -> None:
        super().__init__()
        device = device or "auto"  # lm-eval's Python API passes None when no device was given
        unknown = sorted(set(decode) - set(DECODE_FIELDS))
        if unknown:
            raise ConfigError(f"model_args: unknown lopa option(s) {unknown}; known: {sorted(DECODE_FIELDS)}")
        self.decode = {name: _typed(name, value) for name, value in decode.items()}
        runner = RunnerConfig(device=device, dtype=dtype, quantize=quantize or None)  # quantize: int8 | fp8
        self.model = load_model(pretrained or None, adapter=adapter, runner=runner)
        self.stats = []  # one lopa Stats per request, for whoever wants TPF next to lm-eval's scores
        _CREATED.append(self)

    def summary(self) -> dict:
        """lopa's counts over every request so far."""
        tokens = sum(s.generated_tokens for s in self.stats)
        forwards = sum(s.decode_forwards for s in self.stats)
        decode_s = sum(s.decode_s for s in self.stats)
        return {"model": str(self.model.path), "decode": self.decode, "requests": len(self.stats),
                "generated_tokens": tokens, "decode_forwards": forwards,
                "prefill_forwards": sum(s.prefill_forwards for s in self.stats),
                "tpf": tokens / forwards if forwards else 0.0, "decode_s": decode_s,
                "tokens_per_s": tokens / decode_s if decode_s > 0 else 0.0,
                "round_cap_hits": sum(s.hit_round_cap for s in self.stats),
                "counting": "tokens up to and including the first EOS (before the task's `until` cut); one decode "
                            "forward per iteration however many branches; prefill apart"}

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


def _write_stats(output_path: str | None) -> None:
    """Print lopa's counts; with an output path, write them beside lm-eval's newest results file."""
    for lm in _CREATED:
        summary = lm.summary()
        print(f"lopa: {summary['requests']} requests, {summary['generated_tokens']} tokens in "
              f"{summary['decode_forwards']} decode forwards (+{summary['prefill_forwards']} prefill): "
              f"TPF {summary['tpf']:.2f}, {summary['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
        if not output_path:
            continue
        root = Path(output_path)
        folder = root.parent if root.suffix == ".json" else root
        results = sorted(folder.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
        target = (results[-1].with_name("lopa_stats_" + results[-1].name.removeprefix("results_")) if results
                  else folder / "lopa_stats.json")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(summary, indent=1))
        print(f"lopa: counts written to {target}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    import lm_eval.models  # noqa: F401  (lm-eval imports its own models only while its registry is empty)
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(LOPA_HELP)
    if "--model" in argv and not any(a == "--device" or a.startswith("--device=") for a in argv):
        argv += ["--device", "auto"]  # lm-eval's own default is cuda:0, which fails on a CPU machine
    sys.argv = [sys.argv[0], *argv]  # lm-eval's parser reads sys.argv
    setup_logging()
    parser = HarnessCLI()
    args = parser.parse_args()
    try:
        parser.execute(args)
    except LopaError as err:  # lopa's typed errors (bad model_args, model folder, ...): one line, exit 2
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    _write_stats(getattr(args, "output_path", None))


if __name__ == "__main__":
    main()
