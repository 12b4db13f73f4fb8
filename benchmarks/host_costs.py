"""The host side of a clip on many small gradients, with warm caches: what the compiled helpers save per call
(finding the gradients that exist, finding the cached tensor table), and what the split path of Accelerate
1.16 (``get_total_norm``, then ``clip_grads_with_norm_``) costs beside the fused ``clip_grad_norm_`` on 2000 x
512 fp32 gradients (4 MB: the host work, not the memory, decides), for ampclip and for torch.

    python -m benchmarks.host_costs > benchmarks/results/host-costs-<machine>-<date>.txt

Each figure is the fastest of ``--calls`` calls after two warm-up calls (tables and caches built, as in every
step after the first): other load on a shared machine only ever adds time. "Python" is what runs when
``ampclip._C`` is missing: the same call with the compiled helper answering None.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os

import torch

import ampclip
from ampclip import ops, reference
from ampclip.backends import cpp, tensor_table

from .host_timing import least_us
from .machine import cpu_model


@contextlib.contextmanager
def without(module, *names: str):
    """``module.<name>`` answers None for each of ``names``, as the compiled helpers do when the extension is
    missing."""
    saved = {name: getattr(module, name) for name in names}
    for name in names:
        setattr(module, name, lambda *args: None)
    try:
        yield
    finally:
        for name, helper in saved.items():
            setattr(module, name, helper)


def parameters(shapes) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.empty(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape)
    return params


def split_clip(nn_utils, params, max_norm: float) -> None:
    """What Accelerate 1.16 calls for one device mesh: the norm, then the clip with that norm."""
    total = nn_utils.get_total_norm([p.grad for p in params])
    nn_utils.clip_grads_with_norm_(params, max_norm, total)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args(argv)
    print(f"# python -m benchmarks.host_costs, {datetime.date.today()}, {cpu_model()} ({os.cpu_count()} cores), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, fastest of {args.calls} calls, caches warm")
    small = parameters([(64,)] * 2000)
    grads = [p.grad for p in small]
    rows = [
        ("gradients that exist, 2000 parameters (ops.present_grads)",
         lambda: ops.present_grads(small), (cpp, "present_grads")),
        ("cached tensor table, 2000 tensors (tensor_table.tensor_table)",
         lambda: tensor_table.tensor_table(grads), (tensor_table, "tensor_signature", "signature_matches")),
    ]
    print(f"\n{'host time per call, us':<64}{'compiled':>10}{'Python':>10}")
    for label, fn, helper in rows:
        fast = least_us(fn, args.calls, warmup=2)
        with without(*helper):
            slow = least_us(fn, args.calls, warmup=2)
        print(f"{label:<64}{fast:>10.1f}{slow:>10.1f}")

    params = parameters([(512,)] * 2000)
    bound = reference.exact_norm([p.grad for p in params], 2.0) * 2  # above the norm: nothing is rewritten
    print(f"\n{'2000 x 512 fp32, ms per call':<34}{'fused':>10}{'split':>10}")
    for label, nn_utils in (("ampclip", ampclip), ("torch", torch.nn.utils)):
        fused = least_us(lambda u=nn_utils: u.clip_grad_norm_(params, bound), args.calls, warmup=2) / 1e3
        split = least_us(lambda u=nn_utils: split_clip(u, params, bound), args.calls, warmup=2) / 1e3
        print(f"{label:<34}{fused:>10.2f}{split:>10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
