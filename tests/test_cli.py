"""The command line: env, compare, demo and the torchrun entry point, run as a user would."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from ampclip import demo
from ampclip.cli import main

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
    # a progress bar for each run, on stderr
    assert "no clipping: 100%" in out.stderr and "ampclip: 100%" in out.stderr and "60/60" in out.stderr
    summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=reject_non_json)
    plain, fused = summary["rows"]
    assert plain["steps with a non-finite loss"] > 0 and fused["steps with a non-finite loss"] == 0
    # each non-finite value is a null: the plain run's losses from where it diverged, its final mean loss
    assert summary["plain"]["loss"].count(None) == plain["steps with a non-finite loss"]
    assert plain["final loss (mean of last 10)"] is None and None not in summary["ampclip"]["loss"]
    assert fused["skipped steps"] == 1 and fused["clipped steps"] >= 1
    pytest.importorskip("matplotlib")
    assert (tmp_path / "demo.png").stat().st_size > 10_000


def reject_non_json(constant):
    """parse_constant for json.loads: NaN, Infinity and -Infinity are not JSON (strict parsers refuse them)."""
    raise ValueError(f"{constant} is not JSON")


def test_divergence_is_where_a_series_stays_non_finite():
    nan, inf = math.nan, math.inf
    assert demo._divergence([2.0, 1.0, inf, nan, nan]) == 2
    assert demo._divergence([nan, nan]) == 0
    assert demo._divergence([2.0, inf, 1.0]) is None  # a skipped step, then finite again: recovered
    assert demo._divergence([2.0, 1.0]) is None and demo._divergence([]) is None


def test_plot_marks_where_a_run_diverged():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    try:
        demo._mark_divergence(ax, [3.0, 2.5, 2.0, math.nan, math.nan], "C0")
        demo._mark_divergence(ax, [3.0, math.inf, 2.0], "C1")  # recovered: no mark
        (text,) = ax.texts
        assert text.get_text() == "diverged (NaN) at step 3" and text.xy == (3, 2.0)
        (cross,) = ax.lines
        assert list(cross.get_xdata()) == [3] and list(cross.get_ydata()) == [2.0]
    finally:
        plt.close(fig)


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


@pytest.mark.parametrize(
    "argv, option",
    [
        pytest.param(["demo", "--steps", "0"], "--steps", id="demo-steps-0"),
        pytest.param(["demo", "--steps", "-3"], "--steps", id="demo-steps-negative"),
        pytest.param(["demo", "--steps", "many"], "--steps", id="demo-steps-not-a-number"),
        pytest.param(["compare", "--reps", "0", "--scale", "64"], "--reps", id="compare-reps-0"),
        pytest.param(["compare", "--max-norm", "-1", "--scale", "64", "--reps", "1"], "--max-norm",
                     id="compare-max-norm-negative"),
        pytest.param(["compare", "--max-norm", "nan", "--scale", "64", "--reps", "1"], "--max-norm",
                     id="compare-max-norm-nan"),
        pytest.param(["compare", "--scale", "0", "--reps", "1"], "--scale", id="compare-scale-0"),
        pytest.param(["demo", "--device", "tpu", "--steps", "1"], "--device", id="demo-device-tpu"),
        pytest.param(["compare", "--device", "tpu", "--scale", "64", "--reps", "1"], "--device",
                     id="compare-device-tpu"),
        pytest.param(["demo", "--device", "cuda", "--steps", "1"], "--device", id="demo-device-cuda-without-cuda",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
        # one past the last GPU: no CUDA on a CPU machine, no such GPU on a CUDA one
        pytest.param(["demo", "--device", f"cuda:{torch.cuda.device_count()}", "--steps", "1"], "--device",
                     id="demo-device-missing-gpu"),
        pytest.param(["compare", "--device", f"cuda:{torch.cuda.device_count()}", "--scale", "64", "--reps", "1"],
                     "--device", id="compare-device-missing-gpu"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, option, capsys):
    assert_argument_error(argv, option, capsys)


def assert_argument_error(argv, option, capsys):
    """As argparse does for any bad argument: usage, one error line naming the option, status 2, nothing run."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("usage: ampclip ")
    assert lines[-1].startswith(f"ampclip {argv[0]}: error: argument {option}: ")
    return lines[-1]


@pytest.mark.parametrize("where", ["below-a-file", "a-file", "read-only-folder"])
def test_demo_out_that_cannot_be_written_exits_2_before_training(where, tmp_path, capsys):
    """Checked before the runs: the files are written after them, a minute later."""
    a_file = tmp_path / "a-file.txt"
    a_file.write_text("not a folder")
    out = {"below-a-file": a_file / "demo", "a-file": a_file, "read-only-folder": tmp_path / "read-only"}[where]
    if where == "read-only-folder":
        out.mkdir(mode=0o500)
        if os.access(out, os.W_OK):  # root writes anyway
            pytest.skip("this user can write into a read-only folder")
    line = assert_argument_error(["demo", "--out", str(out), "--steps", "1"], "--out", capsys)
    assert str(out) in line


def test_demo_runs_shorter_than_its_windows(tmp_path):
    """One step: the averages over 10 steps before the spike have no data (nan), not a ZeroDivisionError."""
    out = run("ampclip", "demo", "--steps", "1", "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ampclip run stayed finite: yes" in out.stdout
