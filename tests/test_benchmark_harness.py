"""The benchmark harness runs end to end at tiny sizes and writes what it promises (timings are not
asserted: they belong in the results, not in a pass condition)."""

import json
import math

from ampclip import benchmark


def test_quick_run_writes_results_and_docs(tmp_path):
    code = benchmark.main(["--quick", "--workloads", "2000x512", "gpt2-124m", "--out", str(tmp_path),
                           "--providers", "torch_clip", "torch_chain", "ampclip_dropin", "ampclip_cpp",
                           "ampclip_reference"])
    assert code == 0
    [result_file] = tmp_path.glob("*.json")
    result = json.loads(result_file.read_text())
    assert {"device", "torch", "triton", "cuda", "date"} <= set(result["info"])
    providers = {r["provider"] for r in result["rows"]}
    assert {"copy", "torch_chain", "torch_clip", "ampclip_dropin"} <= providers
    for row in result["rows"]:
        assert row["median_ms"] > 0 and math.isfinite(row["gbps"]) and row["gbps"] > 0
        if row["provider"] != "copy":
            assert row["speedup_vs_chain"] > 0
    assert result_file.with_suffix(".csv").exists()
    docs = tmp_path / "bench.md"
    assert benchmark.main(["--docs", str(docs), str(result_file)]) == 0
    text = docs.read_text()
    assert result_file.name in text and "| 2000x512" in text


def test_workload_shapes():
    assert len(benchmark.WORKLOADS["gpt2-124m"]()) == 148
    assert abs(sum(math.prod(s) for s in benchmark.WORKLOADS["gpt2-124m"]()) - 124.44e6) < 0.01e6
    llama = benchmark.WORKLOADS["llama-7b"]()
    assert len(llama) == 291 and abs(sum(math.prod(s) for s in llama) - 6.74e9) < 0.01e9
    assert benchmark.WORKLOADS["10000x4"]() == [(4,)] * 10000
