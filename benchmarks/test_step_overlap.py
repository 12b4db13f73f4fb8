"""A training step of a small GPT (forward, backward, clip deferred into a fused AdamW, step, zero_grad) with
the norms measured after backward (``clip``) and during it (``clip-overlap``, ``FusedClipper(overlap=True)``),
beside the same step without clipping (``noclip``). The exposed clip time is a clipped step's median minus
``noclip``'s. On a CPU backward and the norm passes share the cores, so nothing can hide: the question is
only that overlap costs nothing extra; on a GPU the passes run while backward still computes.

    pytest benchmarks/test_step_overlap.py --benchmark-json=out.json                # the CPU model
    pytest benchmarks/test_step_overlap.py --device cuda --benchmark-json=out.json  # GPT-2 124M and 355M too
"""

import pytest
import torch

import ampclip
from ampclip import ops
from ampclip.models import TinyGPT, TinyGPTConfig

# (config, batch size); the context is the config's
MODELS = {
    "gpt-small": (TinyGPTConfig(d_model=128, n_layer=4, n_head=4, context=64), 8),
    "gpt2-124m": (TinyGPTConfig(vocab_size=50257, context=1024, d_model=768, n_layer=12, n_head=12), 8),
    "gpt2-355m": (TinyGPTConfig(vocab_size=50257, context=1024, d_model=1024, n_layer=24, n_head=16), 4),
}
QUICK = (TinyGPTConfig(d_model=32, n_layer=2, n_head=2, context=16), 2)
CPU_MODELS = ("gpt-small",)
CLIPS = ("noclip", "clip", "clip-overlap")
MAX_NORM = 1e-3  # small enough that every step clips


def _step(settings, name: str, clip: str):
    config, batch = QUICK if settings.quick else MODELS[name]
    torch.manual_seed(0)
    model = TinyGPT(config).to(settings.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    clipper = None if clip == "noclip" else ampclip.FusedClipper(model.parameters(), MAX_NORM,
                                                                   overlap=clip == "clip-overlap")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (batch, config.context + 1), generator=gen).to(settings.device)
    inputs, labels = ids[:, :-1], ids[:, 1:]

    def step():
        model(inputs, labels=labels).loss.backward()
        if clipper is not None:
            clipper.clip_(defer_to=optimizer)  # N bytes: the norm pass only, measured during backward with overlap
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, clipper, step


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("name", list(MODELS))
def test_step_overlap(benchmark, settings, name, clip):
    on_gpu = settings.device.type == "cuda"
    if not on_gpu and name not in CPU_MODELS:
        pytest.skip(f"{name}: GPU only")
    model, clipper, step = _step(settings, name, clip)
    step()  # tables, caches and buckets built once, as before every step after the first
    passes_after_backward = None
    if clipper is not None:  # what the clip alone dispatches after a backward: no norm pass with overlap
        model(*_batch(model, settings)).loss.backward()
        names = ops.dispatched(clipper.clip_)
        passes_after_backward = sum(n.startswith(("ampclip.norm_pass", "ampclip.clip_norm_pass")) for n in names)
        assert passes_after_backward == (0 if clip == "clip-overlap" else 1)
        model.zero_grad(set_to_none=True)

    def timed():
        step()
        if on_gpu:
            torch.cuda.synchronize()

    benchmark.extra_info.update({
        "overlap_step": clip, "model": name, "quick": settings.quick,
        "parameters": sum(p.numel() for p in model.parameters()), "tensors": len(list(model.parameters())),
        "norm_passes_after_backward": passes_after_backward, "timed": "whole step",
    })
    if on_gpu:
        torch.cuda.synchronize()
    benchmark.pedantic(timed, rounds=settings.rounds, warmup_rounds=3, iterations=1)


def _batch(model, settings):
    cfg = model.cfg
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.context + 1), generator=gen).to(settings.device)
    return ids[:, :-1], ids[:, 1:]
