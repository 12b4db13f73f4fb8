"""The benchmark harness (benchmarks/) runs end to end at tiny sizes, writes what it promises and refuses to
time a wrong provider. Timings are never asserted: they belong in the results, not in a pass condition."""

import csv
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from benchmarks import host_costs, providers, report, workloads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "run.json"
    wanted = ["ampclip_dropin", "ampclip_dropin_noclip", "torch_chain"]
    if providers.ops.available_backends()["cpp"]:
        wanted.append("clipper_cpp")
    args = [sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider", "--quick",
            "--benchmark-json", str(out), "--workloads", "2000x512", "--dtypes", "fp32", "bf16", "--providers",
            *wanted]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TRITON_INTERPRET="0"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, json.loads(out.read_text())


def test_a_quick_run_records_every_case_with_its_baselines(quick_run):
    _, data = quick_run
    info = data["ampclip"]["info"]
    assert {"device", "torch", "triton", "cuda", "date", "threads", "backends"} <= set(info)
    cases = {(b["extra_info"].get("workload"), b["extra_info"].get("dtype"), b["extra_info"].get("provider"))
             for b in data["benchmarks"] if "provider" in b["extra_info"]}
    # the baselines, floors and the copy come along with the providers asked for
    for dtype in ("fp32", "bf16"):
        for name in ("ampclip_dropin", "torch_clip", "floor_clip", "floor_read", "copy", "torch_clip_noclip"):
            assert ("2000x512", dtype, name) in cases
    # torch's CPU unscale takes bfloat16: the chain runs in both dtypes here, and nothing was skipped
    assert ("2000x512", "bf16", "torch_chain") in cases and data["ampclip"]["skipped"] == []
    for b in data["benchmarks"]:
        assert b["stats"]["median"] > 0 and b["stats"]["rounds"] >= 3
        if b["extra_info"].get("check"):
            assert b["extra_info"]["check"]["rel_err"] < 1e-2
    steps = {b["extra_info"]["step"]: b["extra_info"]["device_ops"] for b in data["benchmarks"]
             if "step" in b["extra_info"]}
    assert steps["GradientClipper.clip_"] <= 8 and steps["unscale_and_clip_+update"] <= 10
    torch_ops = steps["torch: scale+unscale_+clip_grad_norm_+step+update"]
    assert torch_ops > 100  # grows with the 2000 tensors
    assert steps["ampclip: scale+unscale_and_clip_+step+update"] < torch_ops


def test_the_report_writes_csv_png_and_markdown(quick_run, tmp_path):
    path, data = quick_run
    runs = report.load([path, path])  # two runs: medians over runs
    text = report.markdown(runs, ["a.json", "b.json"])
    assert "| fp32 | ampclip_dropin |" in text and "device ops" in text
    written = report.write(runs, tmp_path, "quick")
    with (tmp_path / "quick.csv").open() as f:
        rows = list(csv.DictReader(f))
    dropin = next(r for r in rows if r["provider"] == "ampclip_dropin" and r["dtype"] == "fp32")
    assert float(dropin["speedup"]) > 0 and float(dropin["frac_of_floor"]) > 0 and float(dropin["gbps_floor"]) > 0
    assert (tmp_path / "quick-steps.csv").exists()
    if any(p.suffix == ".png" for p in written):
        assert (tmp_path / "quick.png").stat().st_size > 5000
    doc = tmp_path / "doc.md"
    doc.write_text("# Benchmarks\n\nhand-written text\n")
    report.update_docs(doc, text, "cpu")
    report.update_docs(doc, text, "cpu")  # replaced, not appended twice
    assert doc.read_text().count(report.markers("cpu")[0]) == 1 and "hand-written text" in doc.read_text()


def _as_gpu_run(data: dict) -> dict:
    """The CPU quick run relabelled as a CUDA run: the report reads only what the JSON says."""
    gpu = json.loads(json.dumps(data))
    gpu["ampclip"]["info"].update(device="NVIDIA H200", device_type="cuda", gpu="NVIDIA H200")
    return gpu


def test_a_gpu_run_gets_its_own_docs_section_and_the_cpu_one_stays(quick_run, tmp_path):
    path, data = quick_run
    cpu_runs, gpu_runs = report.load([path]), [_as_gpu_run(data)]
    assert (report.kind(cpu_runs), report.kind(gpu_runs)) == ("cpu", "gpu")
    doc = tmp_path / "doc.md"
    doc.write_text("# Benchmarks\n")
    cpu_text = report.markdown(cpu_runs, ["benchmarks/results/x/run-1.json"])
    report.update_docs(doc, cpu_text, "cpu")
    gpu_text = report.markdown(gpu_runs, ["benchmarks/results/y/bench-fp32.json"])
    report.update_docs(doc, gpu_text, "gpu")
    report.update_docs(doc, gpu_text, "gpu")
    text = doc.read_text()
    assert cpu_text in text and gpu_text in text and text.count(report.markers("gpu")[0]) == 1
    # the section names the run's files, its folder under benchmarks/results and, for a GPU, the host CPU
    assert "`run-1.json` in `benchmarks/results/x/`" in cpu_text
    assert "### NVIDIA H200" in gpu_text and f"Host CPU {data['ampclip']['info']['cpu']}" in gpu_text
    with pytest.raises(ValueError, match="different devices"):
        mixed = tmp_path / "gpu.json"
        mixed.write_text(json.dumps(gpu_runs[0]))
        report.load([path, mixed])


def test_torch_chain_is_skipped_where_torch_cannot_unscale_the_dtype():
    """torch's CUDA unscale has no bfloat16 kernel (torch 2.11); its CPU kernel has, and neither has a
    float8 one: the decision is torch's own answer, on whatever device runs."""
    cpu = torch.device("cpu")
    assert providers.torch_unscale_missing(torch.bfloat16, cpu) is None
    assert providers.torch_unscale_missing(torch.float32, cpu) is None
    reason = providers.torch_unscale_missing(torch.float8_e4m3fn, cpu)
    assert reason and "cannot unscale torch.float8_e4m3fn gradients on cpu" in reason and "not implemented" in reason
    for name in ("torch_chain", "torch_compile_chain"):
        assert providers.PROVIDERS[name].unsupported is providers.torch_unscale_missing
    assert providers.PROVIDERS["torch_clip"].unsupported is None  # torch's clip takes every float dtype


def test_the_report_lists_what_was_not_timed_and_why(quick_run):
    path, data = quick_run
    run = json.loads(json.dumps(data))
    reason = "torch's GradScaler cannot unscale torch.bfloat16 gradients on cuda: not implemented for 'BFloat16'"
    # as a CUDA run records it: the chain in bf16 skipped with torch's reason, and one fp32 case lost (failed)
    run["benchmarks"] = [b for b in run["benchmarks"] if (b["extra_info"].get("dtype"), b["extra_info"].get(
        "provider")) not in {("bf16", "torch_chain"), ("fp32", "torch_clip_noclip")}]
    run["ampclip"]["skipped"] = [{"workload": "2000x512", "dtype": "bf16", "provider": "torch_chain",
                                  "reason": reason}]
    assert report.not_timed([run]) == [
        {"workload": "2000x512", "dtype": "fp32", "provider": "torch_clip_noclip", "reason": report.MISSING},
        {"workload": "2000x512", "dtype": "bf16", "provider": "torch_chain", "reason": reason}]
    text = report.markdown([run], ["run.json"])
    assert f"* `torch_chain`, 2000x512 bf16: {reason}" in text
    assert f"* `torch_clip_noclip`, 2000x512 fp32: {report.MISSING}" in text
    assert report.not_timed([data]) == [] and "Not timed" not in report.markdown([data], ["run.json"])


def test_a_provider_that_skips_its_write_is_refused():
    gs = workloads.GradSets([(300,), (7, 5)], torch.float32, torch.device("cpu"), sets=2)
    lazy = providers.Provider(lambda gs: lambda: torch.tensor(workloads.norm64(gs.next()[1])), "clip", 3, "lazy")
    gs.mode = "clip"
    with pytest.raises(providers.CheckError, match="post-clip norm"):
        providers.check("lazy", lazy, lazy.setup(gs), gs, torch.float32)
    wrong = providers.Provider(lambda gs: lambda: (gs.next(), torch.tensor(1.0))[1], "noclip", 1, "wrong")
    gs.mode = "noclip"
    with pytest.raises(providers.CheckError, match="returned norm"):
        providers.check("wrong", wrong, wrong.setup(gs), gs, torch.float32)
    assert not math.isnan(gs.norms[0])


def test_gpu_check_stays_within_its_budget_and_bundles(tmp_path):
    """benchmarks/gpu_check.sh with no budget left runs nothing, fails, and still leaves its summary and,
    with BUNDLE=1, one archive beside it and nothing else."""
    out = tmp_path / "out"
    done = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, OUT=str(out), BUNDLE="1", BUDGET="0",
                                                           PYTHON=sys.executable, TORCH_CUDA_ARCH_LIST="9.0"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.tar.gz", "summary.txt"]
    summary = (out / "summary.txt").read_text()
    for name in ("build", "env", "test-gpu", "bench-fp32", "bench-compile"):
        assert f"== {name}: skipped" in summary
    assert "some step failed" in summary


def test_host_costs_measures_both_paths_and_leaves_the_helpers_in_place(capsys):
    """benchmarks/host_costs.py (the source of the host-time figures in docs/clipper.md and integrations.md)
    runs, prints every row with two figures, and puts back the compiled helpers it switches off."""
    helpers = (host_costs.cpp.present_grads, host_costs.tensor_table.tensor_signature,
               host_costs.tensor_table.signature_matches)
    assert host_costs.main(["--calls", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if re.search(r"\d\.\d+ +\d+\.\d+$", line)]
    assert [row.split()[0] for row in rows] == ["gradients", "cached", "ampclip", "torch"]
    assert (host_costs.cpp.present_grads, host_costs.tensor_table.tensor_signature,
            host_costs.tensor_table.signature_matches) == helpers
