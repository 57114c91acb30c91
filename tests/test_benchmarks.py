"""The benchmark scripts run end to end on a CPU (tiny shapes) and write what docs/benchmarks.md reads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], check=True, env=env, cwd=ROOT,
                   capture_output=True, timeout=600)


def test_step_latency_tiny(tmp_path):
    run("step_latency.py", "--tiny", "--ks", "2", "--windows", "16", "--prefixes", "32", "--out", str(tmp_path))
    (row,) = json.loads((tmp_path / "step_latency.json").read_text())["rows"]
    for key in ("lopa_ms", "lopa_graph_ms", "lopa_fused_ms", "lopa_fp8_ms", "lopa_fp8_unpadded_ms",
                "roofline_ms", "hf_sequential_ms", "hf_batched_ms"):
        assert row[key] > 0, key
    assert row["lopa_graph_rel_err"] < 1e-4 and row["lopa_fused_rel_err"] < 1e-4  # float32: same numbers
    assert 0 < row["lopa_fp8_rel_err"] < 0.2 and abs(row["lopa_fp8_unpadded_rel_err"] - row["lopa_fp8_rel_err"]) < 1e-3
    assert (tmp_path / "step_latency.md").read_text().count("| tiny |") == 1


def test_quant_accuracy_pairs_every_scheme_with_full_precision(tmp_path):
    run("quant_accuracy.py", "--n", "2", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "quant_accuracy.json").read_text())["rows"]
    assert [(r["precision"], r["strategy"]) for r in rows] == [
        (p, s) for p in ("full", "int8", "fp8") for s in ("d2f", "lopa k=7")]
    assert all(("vs_full" in r) == (r["precision"] != "full") for r in rows)
    assert all(r["vs_full"]["n"] == 2 for r in rows if "vs_full" in r)


def test_batch_throughput_tiny(tmp_path):
    """flex (the runner's key splits: none on a CPU), flex with its keys in 2 chunks, and sdpa, side by side."""
    run("batch_throughput.py", "--tiny", "--reps", "2", "--attention", "flex,flex:2,sdpa", "--capacity", "1024",
        "--out", str(tmp_path))
    result = json.loads((tmp_path / "batch_throughput.json").read_text())
    rows = result["rows"]
    assert result["meta"]["capacity"] == 1024
    assert {(r["k"], r["n"]) for r in rows} == {(0, 1), (0, 2), (3, 1), (3, 2)}
    assert {(r["attention"], r["key_splits"]) for r in rows} == {("flex", 1), ("flex:2", 2), ("sdpa", None)}
    assert all(r["step_ms"] > 0 and r["roofline_ms"] > 0 and r["rows_per_step"] == r["n"] * (r["k"] + 1) * 8
               for r in rows)
    assert all(("sdpa_over_flex" in r) == r["attention"].startswith("flex") for r in rows)
    assert "| flex:2 | 2 | 16 | 3 | 2 | 64 |" in (tmp_path / "batch_throughput.md").read_text()


def test_bp_latency_tiny_two_ranks(tmp_path):
    run("bp_latency.py", "--tiny", "--devices", "1,2", "--ks", "2", "--windows", "16", "--prefix", "32",
        "--precisions", "bf16", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "bp_latency.json").read_text())["rows"]
    assert [(r["devices"], r["commit"]) for r in rows] == [(1, "broadcast"), (2, "broadcast"), (2, "local")]
    one, two, local = rows
    assert two["tokens_equal_1"] is True and two["broadcasts_per_step"] > 0 and two["bytes_per_commit"] > 0
    assert one["bytes_per_commit"] == 0 and local["broadcasts_per_step"] == 0  # one rank / single-phase: nothing sent
    assert all(r["iteration_ms"] > 0 and abs(sum(r[p + "_share"] for p in ("prepare", "forward", "gather", "select",
                                                                             "commit")) - 1) < 1e-9 for r in rows)
    assert (tmp_path / "bp_latency.md").read_text().count("| 2 | spawned | bf16 |") == 2
def test_branch_research_pairs_every_variant_with_fixed_k_mean(tmp_path):
    run("branch_research.py", "--n", "2", "--k", "2", "--frontier", "1", "--variants",
        "mean:fixed,mean:text,count:fixed,count:text", "--gen-length", "16", "--checks", "lookahead,tfo", "--orders", "2", "--tfo-n", "1",
        "--device", "cpu", "--out", str(tmp_path))
    payload = json.loads((tmp_path / "main" / "eval.json").read_text())
    labels = [s["label"] for s in payload["summary"]]
    assert labels == ["lopa k=2", "lopa k=2 budget=text", "lopa k=2 score=count", "lopa k=2 score=count budget=text",
                      "lopa k=1"]
    assert [p["b"] for p in payload["paired"]] == labels[1:] and {p["a"] for p in payload["paired"]} == {"lopa k=2"}
    checks = json.loads((tmp_path / "checks" / "checks.json").read_text())
    assert checks["tfo"]["n"] == 1 and checks["lookahead"]["paired"]["n"] == 2
    assert "Token-filling orders" in (tmp_path / "summary.md").read_text()


def test_load_budget_tiny(tmp_path):
    run("load_budget.py", "--tiny", "--reps", "2", "--n", "3", "--concurrency", "1,2", "--k", "6", "--fixed-ks", "6,2",
        "--gen-length", "32", "--step-rows", "40", "--out", str(tmp_path))
    payload = json.loads((tmp_path / "load_budget.json").read_text())
    assert payload["meta"]["step_rows"] == 40 and all(r["step_ms"] > 0 for r in payload["cost"])
    rows = payload["rows"]
    assert [(r["concurrency"], r["policy"]) for r in rows] == [
        (c, p) for c in (1, 2) for p in ("k=6 fixed", "k=2 fixed", "k=6 load")]
    by = {(r["concurrency"], r["policy"]): r for r in rows}
    for policy in ("k=6 fixed", "k=2 fixed", "k=6 load"):  # float32 on CPU: a request's tokens do not depend on c
        assert by[(1, policy)]["texts"] == by[(2, policy)]["texts"]
    for c in (1, 2):
        assert by[(c, "k=6 fixed")]["vs_ref"] == 1.0 and by[(c, "k=6 fixed")]["texts_equal_ref"] == 3
        assert by[(c, "k=6 load")]["branch_rows_per_token"] < by[(c, "k=6 fixed")]["branch_rows_per_token"]
        assert all(r["projected_tokens_per_s"] > 0 and r["latency_p50_s"] <= r["latency_p99_s"] for r in rows)
    assert (tmp_path / "load_budget.md").read_text().count("| 2 | k=6 load |") == 1


def test_load_budget_cost_model_never_falls_past_its_last_measured_step(monkeypatch):
    """Timings are noisy: a last point cheaper than the one before must not extrapolate a larger step cheaper
    still (once below zero, which made the projected tokens/s negative)."""
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the script imports its sibling benchmarks
    spec = importlib.util.spec_from_file_location("load_budget", ROOT / "benchmarks" / "load_budget.py")
    lb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lb)
    cost = lb.CostModel([{"n": 1, "positions": x, "step_ms": y} for x, y in ((10, 1.0), (20, 3.0), (30, 2.0))])
    assert [cost(1, x) for x in (5, 15, 25, 30, 300)] == [1.0, 2.0, 2.5, 2.0, 2.0]
    rising = lb.CostModel([{"n": 1, "positions": x, "step_ms": y} for x, y in ((10, 1.0), (20, 3.0))])
    assert rising(1, 40) == 7.0


def test_serve_load_tiny(tmp_path):
    """Both default server variants from a fresh start: a cold round and a warm one over two levels, each level
    beside generate_many; the summary carries the start-up time and the engine's counters after the run."""
    run("serve_load.py", "--device", "cpu", "--concurrency", "1,2", "--min-requests", "2", "--gen-length", "8",
        "--k", "1", "--threads", "1", "--out", str(tmp_path))
    result = json.loads((tmp_path / "serve_load.json").read_text())
    rows = result["rows"]
    assert [(r["variant"], r["round"], r["concurrency"], r["requests"]) for r in rows] == [
        (v, rnd, c, 4 * c) for v in ("host", "device") for rnd in ("cold", "warm 1") for c in (1, 2)]
    for r in rows:
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["ceiling_tokens_per_s"] > 0
        assert 0 < r["first_block_p50_s"] <= r["last_token_p99_s"]
        assert r["equal_to_ceiling"] == r["requests"]  # greedy: the server's answers are generate_many's
        assert r["decode_steps"] > 0 and r["prefill_steps"] > 0 and 0 < r["engine_busy"] <= 1.05  # from /metrics
        assert r["vs_ceiling"] == r["tokens_per_s"] / r["ceiling_tokens_per_s"]
        assert (r["device_steps"] > 0) == (r["variant"] == "device") and r["captures"] == 0  # a CPU captures none
        assert r["loop_cpu"] >= 0 and r["process_cpu"] > 0  # the server's CPU time, from /proc
    host, device = result["variants"]["host"], result["variants"]["device"]
    assert host["startup_s"] > 0 and device["flags"] == ["--device-step"]
    assert device["device_steps_after_start"] == sum(r["device_steps"] for r in rows if r["variant"] == "device")
    assert host["warm_top_vs_lowest_c"] == rows[3]["tokens_per_s"] / rows[2]["tokens_per_s"]
    md = (tmp_path / "serve_load.md").read_text()
    assert md.count("| host | cold |") == 2 and md.count("| device | warm 1 |") == 2 and "| device | --device-step |" in md


def test_serve_load_ceiling_takes_the_server_args_engine_settings(monkeypatch):
    """generate_many beside the server runs the server's RunnerConfig flags (a larger max_num_batched_tokens was
    once compared against generate_many at the default); HTTP-side flags and max_num_seqs stay out."""
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "benchmarks" / "serve_load.py")
    sl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sl)
    args = ["--max-num-batched-tokens=16384", "--no-device-step", "--warmup", "--step-rows=256", "--attention=flex",
            "--max-pending=9", "--max-num-seqs=3", "--api-key=x"]
    assert sl.runner_fields(args) == {"max_num_batched_tokens": 16384, "device_step": False, "warmup": True,
                                      "step_rows": 256, "attention": "flex"}


def test_cold_start_splits_the_compiling_keys_by_path(monkeypatch):
    """The warm-up's keys that compiled, by name: the forward's and the device path's update apart."""
    import importlib.util

    from lopa.runner.graphs import GraphStats

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("cold_start", ROOT / "benchmarks" / "cold_start.py")
    cs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cs)
    stats = GraphStats(warmup_compiles=5, warmup_key_s=[1.5, 0.1, 2.0, 0.2], warmup_key_compiles=[2, 0, 3, 0],
                       warmup_key_names=["forward B=1 Qb=32", "forward B=1 Qb=64", "update B=1 Qb=32",
                                         "update B=1 Qb=64"])
    row = cs.warmup_row(stats)
    assert row["compiling_keys"] == [["forward B=1 Qb=32", 1.5, 2], ["update B=1 Qb=32", 2.0, 3]]
    assert row["s_compiling_keys"] == 3.5 and row["keys_compiling"] == 2
    assert stats.compiling_s_of("update") == 2.0 and stats.compiling_s_of("forward") == 1.5
    text = cs.table([{"variant": "v", "warmup_s": 3.8, "warmup_graphs": 4, "passes": [], **row}])
    assert "| 1 (1.5, 2) | 1 (2.0, 3) |" in text


def test_cold_start_tiny(tmp_path):
    """The engine variants, each in a fresh process (a repeated one on the first one's kernel caches), decode the
    same varied workload twice; prefill and decode are timed apart and the prefill shapes counted. ("eager update":
    RunnerConfig.compile_update off, which changes nothing on a CPU, where nothing is compiled.)"""
    run("cold_start.py", "--tiny", "--out", str(tmp_path), "--variants",
        "lazy sdpa,warm flex,warm flex,warm flex (eager update)")
    results = json.loads((tmp_path / "cold_start_tiny.json").read_text())["results"]
    assert [r["variant"] for r in results] == ["lazy sdpa", "warm flex", "warm flex, second start",
                                               "warm flex (eager update)"]
    for r in results:
        assert "error" not in r, r
        p0, p1 = r["passes"]
        assert (p0["pass"], p1["pass"]) == (0, 1)
        assert p0["tokens"] == p1["tokens"] > 0  # the same workload, greedy
        assert p0["prefill_steps"] == p1["prefill_steps"] > 0 and p0["prefill_s"] > 0 and p0["decode_s"] > 0
        assert p0["new_prefill_shapes"] == p0["prefill_shapes"] > 0 and p1["new_prefill_shapes"] == 0
        assert p0["device_steps"] == p0["flat_steps"] == 0  # a CPU: the host strategies (device_step "auto")
        assert r["pass0_over_pass1"] > 0
    assert "| warm flex, second start |" in (tmp_path / "cold_start_tiny.md").read_text()


def test_step_latency_block_diffusion_shapes(tmp_path):
    """SDAR / Fast-dLLM v2 shapes: their own block-causal window, and the folded commit's savings measured by
    decoding through the engine (SDAR: one forward per finished block; Fast-dLLM v2: none by construction)."""
    run("step_latency.py", "--tiny", "--shapes", "tiny-sdar,tiny-fast-dllm-v2", "--ks", "0", "--prefixes", "16",
        "--variants", "graphs", "--fold-tokens", "24", "--reps", "1", "--out", str(tmp_path))
    sdar, fast = json.loads((tmp_path / "step_latency.json").read_text())["rows"]
    assert (sdar["W"], fast["W"]) == (8, 8) and sdar["lopa_ms"] > 0 and sdar["lopa_graph_rel_err"] < 1e-4
    assert sdar["fold"]["generated"] == sdar["extra"]["generated"] == 24
    assert sdar["extra"]["decode_forwards"] - sdar["fold"]["decode_forwards"] == 24 // 4 - 1
    assert fast["forwards_saved_per_100"] == 0
    assert "forwards saved/100" in (tmp_path / "step_latency.md").read_text()


def test_bd_lopa_pairs_lopa_with_the_models_own_loop(tmp_path, tiny_sdar_dir):
    run("bd_lopa.py", "--models", str(tiny_sdar_dir), "--n", "2", "--ks", "2", "--gen-length", "8",
        "--batch-size", "2", "--variants", "paper,next+verify", "--warm", "1", "--device", "cpu", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "bd_lopa.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["sdar tau=0.9", "lopa k=2 paper", "lopa k=2 next+verify"]
    assert all(r["n"] == 2 for r in rows)
    assert rows[0]["paired_vs_own"] is None and all(r["paired_vs_own"]["n"] == 2 for r in rows[1:])
    assert (tmp_path / tiny_sdar_dir.name / "eval.json").is_file()


def test_bd_diagnose_counts_the_winners(tiny_sdar_dir):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bd_diagnose.py"), "--model", str(tiny_sdar_dir),
                          "--n", "2", "--k", "2", "--device", "cpu", "--dtype", "float32"], check=True, env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=600).stdout
    (row,) = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert row["iterations"] > 0 and 0 <= row["wins_disagree"] <= row["lookahead_wins"] <= row["iterations"]
    assert row["rows_disagree"] <= row["rows"] and 0.0 <= row["accuracy"] <= 1.0 and row["tpf"] >= 1.0


def test_host_step_tiny_pairs_both_paths(tmp_path):
    """Both paths on the same problems; every n decodes all --prompts of them, at most n at a time (n = 2 refills a
    finished request's slot), so each n counts the same tokens."""
    run("host_step.py", "--tiny", "--ns", "1,2", "--prompts", "3", "--gen-length", "8", "--out", str(tmp_path))
    data = json.loads((tmp_path / "host_step.json").read_text())
    rows = data["rows"]
    assert data["meta"]["prompts"] == 3
    assert [(r["strategy"], r["n"]) for r in rows] == [("lopa k=7", 1), ("lopa k=7", 2), ("d2f", 1), ("d2f", 2)]
    for one, two in zip(rows[::2], rows[1::2]):
        assert all(one[m][p]["tokens"] == two[m][p]["tokens"] for m in ("warm", "host", "device")
                   for p in ("pass0", "pass1"))
    for r in rows:
        for mode in ("warm", "host", "device"):
            assert r[mode]["tokens_equal"] is True
            for p in ("pass0", "pass1"):
                x = r[mode][p]
                assert x["full_steps"] > 0 and x["wall_ms"] > 0 and x["forward_ms"] > 0 and x["tokens"] > 0
                assert x["padded"] >= x["positions"] > 0  # the static path's B bucket x query bucket holds them
                assert x["vs_n1"] > 0 and (x["device_steps"] > 0) == (mode != "host")
    assert (tmp_path / "host_step.md").read_text().count("| d2f |") == 6


def test_host_step_random_shape(tmp_path):
    """--shape: random weights at a step_latency.py shape (no tokenizer: random prompt ids), --k for lopa; the eager
    mode (the device path without CUDA graphs) and --profile's kernel tables."""
    run("host_step.py", "--shape", "tiny", "--device", "cpu", "--strategies", "lopa", "--k", "3", "--modes",
        "host,eager", "--ns", "1", "--gen-length", "8", "--profile", "1", "--out", str(tmp_path))
    data = json.loads((tmp_path / "host_step.json").read_text())
    (row,) = data["rows"]
    assert data["meta"]["model"] == "tiny" and row["strategy"] == "lopa k=3"
    assert row["host"]["tokens_equal"] is True and row["eager"]["tokens_equal"] is True
    assert row["eager"]["pass1"]["device_steps"] > 0 and row["host"]["pass1"]["tokens"] > 0
    assert row["eager"]["pass1"]["positions"] >= row["eager"]["pass1"]["tokens"] / row["eager"]["pass1"]["full_steps"]
    for mode in ("host", "eager"):  # --profile 1: pass 1's kernel table
        assert "aten::" in (tmp_path / f"profile_{mode}_lopa_1.txt").read_text()


def test_device_update_against_the_whole_width_update(tmp_path):
    """The update alone over the span beside the old whole-width one (its modules from git): equal read-back."""
    run("device_update.py", "--ns", "1,2", "--width", "512", "--iters", "1", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "device_update.json").read_text())["rows"]
    assert [(r["strategy"], r["n"]) for r in rows] == [("lopa", 1), ("lopa", 2), ("d2f", 1), ("d2f", 2)]
    for r in rows:
        assert r["equal"] is True and r["old"]["R"] >= r["span"]["R"] >= r["span, R=K"]["R"] == r["K"]
        assert all(r[v]["total"] > 0 for v in ("old", "span", "span, R=K"))


def test_update_compile_times_each_variant_in_a_fresh_process(tmp_path):
    """The compiled update's start-up cost: eager first (the reference), each variant in its own process, a
    repeated one on the first one's caches; the warm-up's keys in order, and the read-back equal to eager's."""
    run("update_compile.py", "--device", "cpu", "--backend", "eager", "--max-tokens", "64", "--slots", "2",
        "--capacity", "256", "--kc", "8", "--ns", "2", "--iters", "1", "--variants", "static widths,static widths",
        "--out", str(tmp_path))
    rows = json.loads((tmp_path / "update_compile.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["eager", "static widths", "static widths, second start"]
    assert [(k["B"], k["Qb"]) for k in rows[0]["keys"]] == [(1, 32), (1, 64), (2, 32)]
    assert rows[0]["warmup_compiles"] == 0 and all(r["warmup_compiles"] >= 4 for r in rows[1:])  # every phase
    assert all(r["steps"][n]["state"] == rows[0]["steps"][n]["state"] for r in rows for n in ("2",))
    assert "| static widths, second start |" in (tmp_path / "update_compile.md").read_text()


def test_host_step_block_diffusion_family(tmp_path):
    """--family: a random SDAR checkpoint, its own loop and lopa over it, on both paths with equal tokens."""
    run("host_step.py", "--tiny", "--family", "sdar", "--strategies", "own,lopa-bd", "--modes", "host,device",
        "--ns", "1", "--gen-length", "8", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "host_step.json").read_text())["rows"]
    assert [r["strategy"] for r in rows] == ["own", "lopa k=3 (bd)"]
    for r in rows:
        assert r["host"]["tokens_equal"] is True and r["device"]["tokens_equal"] is True
        assert r["device"]["pass1"]["device_steps"] > 0 and r["host"]["pass1"]["device_steps"] == 0


def test_step_budget_tiny(tmp_path):
    """The serve_load workload's decode steps on a warmed-up model (CPU: each key run once), without and with the
    step budget: without it steps pass the warmed set and run eagerly; with it none does, the same tokens."""
    run("step_budget.py", "--device", "cpu", "--concurrency", "2", "--requests", "4", "--gen-length", "16", "--k",
        "3", "--max-tokens", "64", "--cpu-positions", "512", "--passes", "1", "--threads", "1", "--out", str(tmp_path))
    passes = json.loads((tmp_path / "step_budget.json").read_text())["passes"]
    (before,), (after,) = passes["no budget"], passes["budget"]
    assert before["over_budget"] == before["eager_decode_steps"] > 0 and before["partial_steps"] == 0
    assert after["over_budget"] == after["eager_decode_steps"] == 0 and after["partial_steps"] > 0
    assert after["equal_to_no_budget"] == before["equal_to_no_budget"] == 4  # every request's tokens
    assert after["tokens"] == before["tokens"] > 0
    assert "| budget | 0 |" in (tmp_path / "step_budget.md").read_text()


def test_http_overhead_table_takes_a_server_cpu_of_zero(monkeypatch):
    """/proc counts CPU in clock ticks (10 ms): 8 requests may read 0 ms for the base variant; its table then says
    n/a for that ratio instead of failing the run (seen: a ZeroDivisionError after every row was measured)."""
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("http_overhead", ROOT / "benchmarks" / "http_overhead.py")
    ho = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ho)
    meta = {"cpus": 2, "python": "3.11", "commit": "x", "date": "d", "requests": 8, "max_tokens": 4, "block_size": 2}
    rows = [{"variant": v, "concurrency": 2, "requests_per_s": 100.0, "p50_ms": 1.0, "p99_ms": 2.0,
             "server_cpu_ms_per_request": cpu} for v, cpu in (("asyncio:h11", 0.0), ("uvloop:httptools", 1.25))]
    table = ho.markdown(meta, rows)
    assert "| asyncio:h11 | 2 | 100 (1.00x) | 1.00 / 2.00 | 0.00 (n/a) |" in table
    assert "| uvloop:httptools | 2 | 100 (1.00x) | 1.00 / 2.00 | 1.25 (n/a) |" in table


def test_http_overhead_times_each_server_variant(tmp_path):
    """Both HTTP stacks serve the stand-in engine in their own processes; every level gets a row."""
    run("http_overhead.py", "--variants", "asyncio:h11,uvloop:httptools", "--requests", "8", "--levels", "1,2",
        "--out", str(tmp_path))
    rows = json.loads((tmp_path / "http_overhead.json").read_text())["rows"]
    assert [(r["variant"], r["concurrency"]) for r in rows] == [
        (v, c) for v in ("asyncio:h11", "uvloop:httptools") for c in (1, 2)]
    assert all(r["requests_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0 for r in rows)
    assert (tmp_path / "http_overhead.md").read_text().count("| uvloop:httptools |") == 2


def test_chain_tuning_times_every_variant_at_both_shapes(tmp_path):
    """chain_tuning.py on the CPU (dynamo's eager backend): every variant compiled afresh and timed at both shapes,
    its first shape first, with the bytes each chain moves; the table's ratios are to 'small first'."""
    run("chain_tuning.py", "--device", "cpu", "--backend", "eager", "--shapes", "tiny", "--small", "1x4", "--large",
        "2x8", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "chain_tuning.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["small first", "large first", "static", "heads static",
                                            "large first heads static"]
    for r in rows:
        first = "2x8" if r["variant"].startswith("large first") else "1x4"
        assert next(k for k in r if k.endswith("_ms")) == f"rope_{first}_ms"
        assert all(r[f"{c}_{s}_ms"] > 0 and r[f"{c}_{s}_MB"] > 0
                   for c in ("rope", "silu", "rms") for s in ("1x4", "2x8"))
    assert "| tiny | small first | rope | " in (tmp_path / "chain_tuning.md").read_text()


def test_attention_refuses_a_capacity_below_its_widest_case(tmp_path):
    """attention.py (GPU only) checks its arguments before it touches a GPU: slots narrower than the longest prefix
    plus the largest k's queries (the SDPA reference's keys) are a usage error, not a shape error mid-run."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "attention.py"), "--prefixes", "512,8192", "--ks",
                          "0", "--capacity", "8192", "--out", str(tmp_path)], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "--capacity 8192 is below the widest case's keys (8448" in out.stderr
    assert not any(tmp_path.iterdir())


def test_kv_write_times_every_variant_and_checks_what_it_wrote(tmp_path):
    """kv_write.py on the CPU (dynamo's eager backend): each K/V write variant at each step, every one leaving the
    pool as the old index_copy_ write does (the script exits non-zero otherwise), ratios to it. The embedded model's
    heads: two KV heads, so a mark on the wrong dim of cos / sin (size 1 there) breaks the trace."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT / 'benchmarks'}"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kv_write.py"), "--device", "cpu", "--backend", "eager",
                    "--shapes", "default", "--steps", "1x4,2x8", "--prefix", "4", "--capacity", "32", "--out",
                    str(tmp_path)], check=True, env=env, cwd=ROOT, capture_output=True, timeout=600)
    rows = json.loads((tmp_path / "kv_write.json").read_text())["rows"]
    assert [(r["step"], r["variant"]) for r in rows] == [(s, v) for s in ("1x4", "2x8") for v in
                                                         ("index_copy", "index_put", "compiled", "engine")]
    assert all(r["equal"] and r["ms"] > 0 and r["MB"] > 0 for r in rows)
    assert "| default | 2x8 | engine | " in (tmp_path / "kv_write.md").read_text()


def test_flat_forward_equals_the_padded_forward_on_every_real_query(tmp_path, monkeypatch):
    """benchmarks/flat_forward.py on a CPU: the runner's flat forward (ModelRunner.flat_body) gives each real query the
    padded forward's hidden state; flat queries laid one column off in the padded rows are caught."""
    import importlib.util

    import lopa.runner.model_runner as model_runner

    run("flat_forward.py", "--device", "cpu", "--tiny", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "flat_forward.json").read_text())["rows"]
    assert [(r["shape"], r["n"], r["k"]) for r in rows] == [("tiny", 3, 1), ("tiny", 3, 3)]
    assert all(r["err"] < 1e-5 for r in rows) and rows[1]["flat"] == rows[1]["real"] < rows[1]["padded"]
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("flat_forward", ROOT / "benchmarks" / "flat_forward.py")
    ff = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ff)
    model = ff.Transformer(ff.ModelConfig(**ff.SHAPES["tiny"])).eval()
    spec_ = ff.ModelSpec(511, (510,), 4096, 512)
    runner = ff.ModelRunner(model, spec_, torch.device("cpu"), torch.float32, max_num_seqs=3, max_positions=1023)
    runner.reserve(3, 1023)
    runner.pool.kv.normal_()
    case = lambda: ff.run_case(runner, 3, 3, [32, 64], (5, 300), 1, None)["err"]  # noqa: E731
    assert case() < 1e-5
    real = model_runner.FlatView

    def shifted(pool, first, B, Qb, heads, slot, position, place):
        return real(pool, first, B, Qb, heads, slot, position, torch.where(place >= 0, (place + 1) % (B * Qb), -1))
    monkeypatch.setattr(model_runner, "FlatView", shifted)
    assert case() > 1e-3  # the tolerance is 1e-5
