"""The command line: env, compare, demo and the torchrun entry point, run as a user would."""

import json
import os
import subprocess
import sys

import pytest

ENV = dict(os.environ, TRITON_INTERPRET="0")


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=ENV, timeout=timeout)


def test_env_reports_backends_and_versions():
    out = run("ampclip", "env")
    assert out.returncode == 0, out.stderr
    assert "torch" in out.stdout and "available" in out.stdout and "in_use" in out.stdout


def test_compare_agrees_with_torch():
    out = run("ampclip", "compare", "--scale", "64", "--reps", "2")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "agree: yes" in out.stdout and "speedup" in out.stdout


def test_demo_recovers_from_spike_and_overflow(tmp_path):
    out = run("ampclip", "demo", "--steps", "60", "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ampclip run stayed finite: yes" in out.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    plain, fused = summary["rows"]
    assert plain["steps with a non-finite loss"] > 0 and fused["steps with a non-finite loss"] == 0
    assert fused["skipped steps"] == 1 and fused["clipped steps"] >= 1
    pytest.importorskip("matplotlib")
    assert (tmp_path / "demo.png").stat().st_size > 10_000


def test_train_entry_point_single_process():
    out = run("ampclip.train", "--steps", "4", "--log-every", "2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("step") == 2 and "grad norm" in out.stdout


@pytest.mark.parametrize("flag", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_torchrun_two_processes(flag):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun is not installed next to this python")
    # --standalone: a free port of its own, so a busy default port cannot make a worker wait forever.
    out = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "ampclip.train", "--steps", "4",
                          "--log-every", "2", *flag], capture_output=True, text=True, env=ENV, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("grad norm") == 2  # rank 0 prints
