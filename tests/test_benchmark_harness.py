"""The benchmark harness runs end to end at tiny sizes, writes what it promises and refuses to time a wrong
provider. Timings are never asserted: they belong in the results, not in a pass condition."""

import csv
import json
import math

import pytest
import torch

from ampclip import benchmark, ops

CPU_PROVIDERS = ["torch_chain", "torch_clip", "ampclip_dropin", "torch_clip_noclip", "ampclip_dropin_noclip",
                 "ampclip_reference"] + (["ampclip_cpp", "clipper_cpp"] if ops.available_backends()["cpp"] else [])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = benchmark.main(["--quick", "--workloads", "gpt2-124m", "2000x512", "--dtypes", "fp32", "fp16",
                           "--out", str(out), "--providers", *CPU_PROVIDERS, "--device", "cpu"])
    assert code == 0
    [result_file] = out.glob("*.json")
    return result_file, json.loads(result_file.read_text())


def test_quick_run_writes_json_with_every_field(quick_run):
    _, result = quick_run
    assert result["schema"] == benchmark.SCHEMA_VERSION
    assert {"device", "cpu", "gpu", "torch", "triton", "cuda", "python", "ampclip", "backends", "threads",
            "date", "timestamp"} <= set(result["info"])
    assert {"workloads", "dtypes", "providers", "reps", "sets", "budget_gb", "inv_scale"} <= set(result["config"])
    assert result["config"]["argv"][0] == "--quick"
    rows = result["rows"]
    assert {(r["workload"], r["dtype"]) for r in rows} == {(w, d) for w in ("gpt2-124m", "2000x512")
                                                           for d in ("fp32", "fp16")}
    assert {r["provider"] for r in rows} == {"copy", *CPU_PROVIDERS}
    for r in rows:
        assert set(benchmark.CSV_FIELDS) - {"check_rel_err", *benchmark.CSV_INFO} <= set(r)
        assert len(r["times_ms"]) == r["n"] > 0 and all(t > 0 for t in r["times_ms"])
        assert r["q20_ms"] <= r["median_ms"] <= r["q80_ms"]
        for key in ("gbps_moved", "gbps_floor", "frac_of_copy"):
            assert math.isfinite(r[key]) and r[key] > 0
        if r["provider"] == "copy":
            assert r["check"] is None and r["speedup"] is r["speedup_vs_chain"] is None
            continue
        for key in ("speedup", "speedup_vs_chain", "speedup_vs_torch_clip"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["provider"], key)
        assert r["baseline"] == benchmark.SCENARIO_BASELINE[r["scenario"]]
        assert r["check"]["rel_err"] < (1e-4 if r["dtype"] == "fp32" else 1e-2)
        assert r["host_ms"] is None and r["launches"] is None  # CUDA only
    # the quick run really scaled gpt2 down but kept its 148 tensors, as 2000x512 its 2000
    gpt2 = [r for r in rows if r["workload"] == "gpt2-124m"]
    assert gpt2[0]["tensors"] == 148 and gpt2[0]["scaled_down_by"] > 1
    assert len({r["elements"] for r in gpt2}) == 1  # every dtype on the same shapes
    assert next(r for r in rows if r["workload"] == "2000x512")["tensors"] == 2000


def test_quick_run_writes_csv_and_docs(quick_run, tmp_path):
    result_file, result = quick_run
    with result_file.with_suffix(".csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(result["rows"]) and list(table[0]) == benchmark.CSV_FIELDS
    assert {line["torch"] for line in table} == {result["info"]["torch"]}
    assert [float(line["median_ms"]) for line in table] == [r["median_ms"] for r in result["rows"]]
    docs = tmp_path / "benchmarks.md"
    assert benchmark.main(["--docs", str(docs), str(result_file)]) == 0
    text = docs.read_text()
    assert result_file.name in text and "| gpt2-124m (1/" in text and "| 2000x512 (1/" in text


def test_a_wrong_provider_stops_the_run(monkeypatch, tmp_path):
    def lazy(gs):  # returns the right norm but never clips
        def call():
            _, grads, _ = gs.next()
            return torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])) * 2

        return call

    monkeypatch.setitem(benchmark.PROVIDERS, "lazy", benchmark.Provider(lazy, "unscale_clip", 3, "broken"))
    with pytest.raises(benchmark.CheckError, match="post-clip norm"):
        benchmark.main(["--quick", "--workloads", "2000x512", "--dtypes", "fp32", "--providers", "lazy",
                        "--out", str(tmp_path), "--device", "cpu"])
    assert not list(tmp_path.glob("*.json"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_rotated_sets_keep_every_call_clipping(dtype):
    """Hundreds of visits: each call still clips to its bound (a real write), nothing underflows."""
    gs = benchmark.GradSets([(37,)] * 3 + [(1000,)], dtype, torch.device("cpu"), sets=1)
    gs.mode = "clip"
    call = benchmark.PROVIDERS["ampclip_dropin"].setup(gs)
    for _ in range(320):  # a restore (x16) after ~276 visits of 0.99
        k = gs.peek()
        gs.prepare()
        bound = gs.norms[k] * benchmark.SHRINK
        call()
        assert abs(benchmark._norm64(gs.sets[k]) - bound) < 1e-2 * bound
    assert gs.restores >= 1 and all(n > n0 * benchmark.RESTORE_BELOW for n, n0 in zip(gs.norms, gs.norm0))


def test_workloads_and_scaling():
    gpt2 = benchmark.WORKLOADS["gpt2-124m"]()
    assert len(gpt2) == 148 and abs(benchmark._numel(gpt2) - 124.44e6) < 0.01e6
    llama = benchmark.WORKLOADS["llama-7b"]()
    assert len(llama) == 291 and abs(benchmark._numel(llama) - 6.74e9) < 0.01e9
    assert benchmark.WORKLOADS["10000x4"]() == [(4,)] * 10000
    shapes, k = benchmark._scaled_shapes(gpt2, budget_elems=10**12, scale=4)
    assert k == 4 and len(shapes) == 148 and shapes[0] == (50257 // 4, 768)
    shapes, k = benchmark._scaled_shapes(gpt2, budget_elems=10**6)
    assert benchmark._numel(shapes) <= 10**6 and len(shapes) == 148


def test_baselines_are_added_so_every_speedup_exists(tmp_path):
    result = benchmark.run(["2000x512"], ["fp32"], ["ampclip_dropin_noclip"], "cpu", reps=2, sets=1,
                           budget_gb=0.001, flush_bytes=0, verbose=False)
    rows = {r["provider"]: r for r in result["rows"]}
    assert set(rows) == {"copy", "ampclip_dropin_noclip", "torch_clip_noclip"}
    assert rows["ampclip_dropin_noclip"]["speedup"] > 0


def test_triton_and_compile_providers_are_skipped_on_cpu():
    names = benchmark.available_providers(torch.device("cpu"), with_compile=False)
    assert not any("triton" in n for n in names) and "torch_compile_chain" not in names
    assert {"torch_chain", "torch_clip", "ampclip_dropin", "ampclip_reference"} <= set(names)
