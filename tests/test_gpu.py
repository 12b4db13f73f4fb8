"""The Python layer on a CUDA device (``pytest -m gpu``; skipped without CUDA): the default backend against
fp64, no host sync on the fast path (torch's sync debug mode turns a sync into an error), CUDA-graph
capture and replay of a whole clip, torch.compile, and the trainer in fp16."""

import math

import pytest
import torch

import ampclip
from ampclip import reference
from helpers import bitwise_equal, rel_close

pytestmark = pytest.mark.gpu


def cuda_grads(shapes, dtypes, seed=0, scale=1.0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [(torch.randn(s, generator=gen, device="cuda") * scale).to(dtypes[i % len(dtypes)])
            for i, s in enumerate(shapes)]


def params_for(grads):
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.empty_like(g))
        p.grad = g.clone()
        params.append(p)
    return params


GPT2_XL_SHAPES = [(50257, 1600), (1024, 1600)] + [
    s for _ in range(48) for s in [(1600,), (1600,), (1600, 4800), (4800,), (1600, 1600), (1600,), (1600,),
                                   (1600,), (1600, 6400), (6400,), (6400, 1600), (1600,)]
] + [(1600,), (1600,)]


@pytest.mark.parametrize("shapes", [GPT2_XL_SHAPES, [(4,)] * 10_000, [(1,), (3,), (4097,), (0,), (65537,)]],
                         ids=["gpt2-1.5b", "10000x4", "odd"])
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.bfloat16, torch.float16, torch.float32)],
                         ids=["fp32", "mixed"])
def test_default_backend_clip_matches_fp64(shapes, dtypes):
    grads = cuda_grads(shapes, dtypes)
    exact = reference.exact_norm(grads, 2.0)
    params = params_for(grads)
    total = ampclip.clip_grad_norm_(params, exact / 4)
    assert rel_close(total.item(), exact, 1e-5)
    assert rel_close(reference.exact_norm([p.grad for p in params], 2.0), exact / 4, 3e-3)


def test_fused_step_has_no_host_sync():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = ampclip.DynamicLossScaler("cuda")
    x = torch.randn(32, 64, device="cuda")
    for _ in range(2):  # the first step builds caches and optimizer state
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(x).float().pow(2).mean()
        scaler.scale(loss).backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            stats = scaler.unscale_and_clip_(opt, max_norm=1.0)
            scaler.step(opt)
            scaler.update()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        opt.zero_grad()
    assert stats.found_inf.item() == 0.0


def test_cuda_graph_captures_a_whole_clip():
    grads = cuda_grads([(1000,), (37, 3), (4097,)], (torch.float32, torch.bfloat16))
    params = params_for(grads)
    clipper = ampclip.FusedClipper(params, max_norm=0.5)
    inv = torch.full((), 1 / 8, device="cuda")
    clipper.clip_(inv)  # warm-up: compiles kernels, builds tables
    for p, g in zip(params, grads):
        p.grad.copy_(g)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        stats = clipper.clip_(inv)
    for seed in (1, 2):
        fresh = cuda_grads([(1000,), (37, 3), (4097,)], (torch.float32, torch.bfloat16), seed=seed, scale=8.0)
        for p, g in zip(params, fresh):
            p.grad.copy_(g)
        graph.replay()
        exact = reference.exact_norm(fresh, 2.0, 1 / 8)
        assert rel_close(stats.total_norm.item(), exact, 1e-5)
        assert rel_close(reference.exact_norm([p.grad for p in params], 2.0), min(exact, 0.5), 3e-3)


def test_compiled_drop_in_clip():
    grads = cuda_grads([(512, 3), (77,)], (torch.float32,))
    params, twin = params_for(grads), params_for(grads)
    compiled = torch.compile(lambda ps: ampclip.clip_grad_norm_(ps, 0.25), fullgraph=True)
    total = compiled(params)
    want = ampclip.clip_grad_norm_(twin, 0.25)
    assert rel_close(total.item(), want.item(), 1e-6)
    for a, b in zip(params, twin):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


def test_trainer_fp16_with_dynamic_scaler():
    from ampclip.models import TinyGPT, random_batches

    torch.manual_seed(0)
    model = TinyGPT().cuda()
    trainer = ampclip.create_amp_trainer(model, amp_config=ampclip.create_default_amp_config(precision="fp16"))
    batches = random_batches(16, 64, device="cuda")
    losses = [trainer.training_step(next(batches)) for _ in range(20)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert trainer.last_clipping_stats["loss_scale"] >= 1.0


def test_skipped_step_on_cuda_is_bit_identical():
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scaler = ampclip.DynamicLossScaler("cuda")
    scaler.scale(model(torch.randn(4, 16, device="cuda")).sum()).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: {n: v.clone() for n, v in s.items()} for k, s in opt.state_dict()["state"].items()}
    scaler.scale(model(torch.randn(4, 16, device="cuda")).sum()).backward()
    model.weight.grad[3, 3] = math.nan
    scaler.unscale_and_clip_(opt, max_norm=1.0)
    scaler.step(opt)
    scaler.update()
    assert all(bitwise_equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    for k, s in opt.state_dict()["state"].items():
        for n, v in s.items():
            assert bitwise_equal(v, state[k][n])


def test_training_loop_with_set_to_none_counts_its_table_builds(monkeypatch):
    # zero_grad(set_to_none=True) frees the gradients; the next backward allocates new ones. The table is
    # keyed on addresses and sizes, so it is reused whenever the allocator hands out the same blocks, and the
    # steady clip (ops.steady_clip) takes the gradients when they are the last table's. What a plain loop
    # gets is printed: nothing else allocates between the backward and the clip (the check against fp64 comes
    # after the counted steps).
    from ampclip.backends import tensor_table as tk

    steady = []  # what each clip's steady attempt gave (None: it took the general path)
    steady_clip = ampclip.ops.steady_clip

    def recorded(*args, **kwargs):
        steady.append(steady_clip(*args, **kwargs))
        return steady[-1]

    monkeypatch.setattr(ampclip.ops, "steady_clip", recorded)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(50)]).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    clipper = ampclip.FusedClipper(model.parameters(), max_norm=0.1)
    builds = []
    for _ in range(8):
        optimizer.zero_grad(set_to_none=True)
        model(torch.randn(8, 64, device="cuda")).square().mean().backward()
        clipper.clip_()
        optimizer.step()
        builds.append(tk.cache_info()["builds"])
    print(f"table builds after each of 8 steps with set_to_none=True: {builds}; steady clips: "
          f"{[s is not None for s in steady]}")
    optimizer.zero_grad(set_to_none=True)
    model(torch.randn(8, 64, device="cuda")).square().mean().backward()
    want = reference.exact_norm([p.grad for p in model.parameters()], 2.0)
    assert rel_close(clipper.clip_().total_norm.item(), want, 1e-5)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("how", ["argument", "environment"])
def test_a_forced_backend_clips_cuda_gradients(monkeypatch, backend, how):
    if not ampclip.ops.runs_on(backend, "cuda"):
        pytest.skip(f"{backend} cannot run on CUDA here")
    grads = cuda_grads([(512, 3), (77,)], (torch.float32, torch.bfloat16))
    params, twin = params_for(grads), params_for(grads)
    if how == "environment":
        monkeypatch.setenv(ampclip.ops.ENV_BACKEND, backend)
        total = ampclip.clip_grad_norm_(params, 0.25)
    else:
        total = ampclip.clip_grad_norm_(params, 0.25, backend=backend)
    want = torch.nn.utils.clip_grad_norm_(twin, 0.25)
    assert rel_close(total.item(), want.item(), 1e-5)


def test_the_drop_in_clip_replays_in_a_cuda_graph():
    grads = cuda_grads([(1000,), (37, 3), (4097,)], (torch.float32, torch.bfloat16))
    params = params_for(grads)
    ampclip.clip_grad_norm_(params, 0.5)  # warm-up: compiles kernels, builds the table outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        total = ampclip.clip_grad_norm_(params, 0.5)
    for seed in (1, 2):
        fresh = cuda_grads([(1000,), (37, 3), (4097,)], (torch.float32, torch.bfloat16), seed=seed, scale=8.0)
        for p, g in zip(params, fresh):
            p.grad.copy_(g)
        graph.replay()
        exact = reference.exact_norm(fresh, 2.0)
        assert rel_close(total.item(), exact, 1e-5)
        assert rel_close(reference.exact_norm([p.grad for p in params], 2.0), min(exact, 0.5), 3e-3)


def test_a_training_step_with_the_drop_in_compiles_in_reduce_overhead_mode():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).cuda()
    twin = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).cuda()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(32, 64, device="cuda")

    def step(m):
        loss = m(x).pow(2).mean()
        loss.backward()
        return ampclip.clip_grad_norm_(m.parameters(), 0.1)

    compiled = torch.compile(step, mode="reduce-overhead")
    for _ in range(3):  # warm-up runs, then the CUDA graph's replays
        model.zero_grad(set_to_none=False)
        twin.zero_grad(set_to_none=False)
        total = compiled(model)
        want = step(twin)
        assert rel_close(total.item(), want.item(), 1e-5)
        for a, b in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode, launches", [("global", 2), ("per_tensor", 2), ("per_group", 3)])
def test_a_clip_launches_two_kernels_on_triton(mode, launches):
    from torch.profiler import ProfilerActivity, profile

    grads = cuda_grads([(64,)] * 300, (torch.float32,))
    params = params_for(grads)
    groups = [params[::2], params[1::2]] if mode == "per_group" else None
    clipper = ampclip.FusedClipper(params, max_norm=1.0, mode=mode, groups=groups, backend="triton")
    clipper.clip_()  # warm-up: kernels compiled, table built
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        clipper.clip_()
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == launches, kernels
