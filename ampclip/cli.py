"""``python -m ampclip {env,demo,compare}`` (also the ``ampclip`` console script). The benchmark harness
lives in the source tree's ``benchmarks/`` (``make bench``)."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a bad value exits with status 2 and one line, as argparse does)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _bound(text: str) -> float:
    """argparse type: a clipping bound, a number >= 0 (inf allowed; a negative one would flip the gradients)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if math.isnan(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _device(text: str):
    """argparse type: a device the demo and compare can run on here, cpu or cuda (cuda:N), as a torch.device."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):  # torch's error lists every device type it knows, on several lines
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda (cuda:N for one GPU), got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "a build without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available here (torch {torch.__version__}: "
                                             f"{why}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: there is no such GPU here ({torch.cuda.device_count()} "
                                             "visible)")
    return device


def _writable_folder_problem(folder: str):
    """Why the demo cannot write its files into ``folder`` (creating it if needed), or None. Checked before
    the runs, which take a minute, rather than when the files are written after them."""
    import tempfile

    if os.path.exists(folder) and not os.path.isdir(folder):
        return f"{folder!r} is a file, not a folder"
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return f"cannot write into {folder!r} ({exc.strerror or type(exc).__name__})"
    return None


def _env(args) -> int:
    from .ops import backend

    info = backend()
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1e3


def _compare(args) -> int:
    """ampclip's and torch's clip_grad_norm_ side by side on GPT-2-124M-shaped random gradients."""
    import torch

    import ampclip

    from .shapes import gpt2_shapes, scaled

    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    shapes = scaled(gpt2_shapes(), args.scale)
    grads = [torch.randn(s, device=device) for s in shapes]
    numel = sum(g.numel() for g in grads)
    exact = ampclip.reference.exact_norm(grads, 2.0)
    max_norm = exact / 2 if args.max_norm is None else args.max_norm
    print(f"GPT-2-124M-shaped fp32 gradients: {len(grads)} tensors, {numel / 1e6:.1f}M elements on {device}")
    print(f"ampclip backend: {ampclip.ops.resolve_backend(None, device)}; max_norm {max_norm:.4g}")

    def params_from(values):
        params = [torch.nn.Parameter(torch.empty_like(v)) for v in values]
        for p, v in zip(params, values):
            p.grad = v.clone()
        return params

    mine, theirs = params_from(grads), params_from(grads)
    norm_ampclip = float(ampclip.clip_grad_norm_(mine, max_norm))
    norm_torch = float(torch.nn.utils.clip_grad_norm_(theirs, max_norm))
    coef_exact = min(1.0, max_norm / (exact + 1e-6))
    grad_error = max(
        float((p.grad.double() - g.double() * coef_exact).abs().max()) for p, g in zip(mine, grads) if g.numel()
    )
    err_ampclip, err_torch = abs(norm_ampclip - exact) / exact, abs(norm_torch - exact) / exact
    # ampclip agrees when it is at least as close to the fp64 norm as torch (or within 1e-5), and its
    # clipped gradients equal the gradients times the exact coefficient to float32 rounding.
    scale = max(float(g.abs().max()) for g in grads if g.numel()) * coef_exact
    agree = err_ampclip <= max(1e-5, err_torch) and grad_error <= 1e-5 * scale

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def halving(clip_fn, params, start_norm):
        # Each call clips to half of the norm the previous call left, so every call really rewrites.
        state = {"bound": start_norm}

        def step():
            state["bound"] /= 2
            clip_fn(params, state["bound"])
            sync()

        return step

    rows = []
    t_torch = _median_ms(halving(torch.nn.utils.clip_grad_norm_, theirs, max_norm), args.reps)
    t_ampclip = _median_ms(halving(ampclip.clip_grad_norm_, mine, max_norm), args.reps)
    rows.append(("clipping", t_torch, t_ampclip))
    no_clip = 1e30
    t_torch = _median_ms(lambda: (torch.nn.utils.clip_grad_norm_(theirs, no_clip), sync()), args.reps)
    t_ampclip = _median_ms(lambda: (ampclip.clip_grad_norm_(mine, no_clip), sync()), args.reps)
    rows.append(("no clip needed", t_torch, t_ampclip))

    print(f"\n{'':16}{'total norm':>16}")
    print(f"{'fp64 exact':16}{exact:16.6f}")
    print(f"{'torch':16}{norm_torch:16.6f}   relative error {err_torch:.2e}")
    print(f"{'ampclip':16}{norm_ampclip:16.6f}   relative error {err_ampclip:.2e}")
    print(f"agree: {'yes' if agree else 'NO'} (ampclip's clipped gradients vs fp64: max |error| {grad_error:.3g})\n")
    print(f"{'':16}{'torch ms':>10}{'ampclip ms':>12}{'speedup':>9}")
    for label, t_torch, t_ampclip in rows:
        print(f"{label:16}{t_torch:10.2f}{t_ampclip:12.2f}{t_torch / t_ampclip:8.2f}x")
    return 0 if agree else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ampclip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="backends available and in use, versions, GPU")
    demo = sub.add_parser("demo", help="train a tiny GPT with and without ampclip through a spike and an overflow")
    demo.add_argument("--steps", type=_positive_int, default=200)
    demo.add_argument("--out", default="ampclip-demo", help="folder for the PNG and the summary")
    demo.add_argument("--device", type=_device, default=None, help="cpu or cuda (default: cuda when available)")
    compare = sub.add_parser("compare", help="ampclip vs torch clip_grad_norm_ on GPT-2-124M-shaped gradients")
    compare.add_argument("--device", type=_device, default=None, help="cpu or cuda (default: cuda when available)")
    compare.add_argument("--scale", type=_positive_int, default=1,
                         help="divide every tensor's leading dim by this (1: full size)")
    compare.add_argument("--max-norm", type=_bound, default=None, help="default: half the gradients' norm")
    compare.add_argument("--reps", type=_positive_int, default=10)
    args = parser.parse_args(argv)
    if args.command == "demo":
        problem = _writable_folder_problem(args.out)
        if problem:
            demo.error(f"argument --out: {problem}")
        from .demo import main as demo_main

        return demo_main(args)
    return {"env": _env, "compare": _compare}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
