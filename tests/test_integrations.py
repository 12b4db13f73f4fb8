"""patch_torch() under the frameworks that call torch's clip functions: HF Trainer, Accelerate, Lightning.

Each framework trains a tiny fp32 model for a few CPU steps twice from the same seed, plain and with
``ampclip.patch_torch()``. Counting spies sit on torch's functions and on ampclip's (set on
``ampclip.functional`` before ``patch_torch()``, which installs them from there): the patched run must
send every clip call to ampclip and none to torch, the plain run every call to torch (so the spies do see
the framework's calls), and both must give the same losses and weights to float32 rounding.
"""

import functools
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ampclip
import ampclip.functional

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here downloads; make sure nothing tries

STEPS = 4
NAMES = ("clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_")
# A second accelerate, older than the installed one, that `make test` puts here (pip --target, no dependencies):
# the accelerate tests run again against it in a subprocess, so that both of its clip paths stay covered.
OLD_ACCELERATE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "accelerate-1.15")


class Tiny(nn.Module):
    """Two linear layers; forward(x, labels) returns {"loss": ...} as HF models do, and records the loss."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.losses = []

    def forward(self, x, labels):
        loss = F.mse_loss(self.net(x).squeeze(-1), labels)
        self.losses.append(loss.item())
        return {"loss": loss}


def data(n=32):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=gen)
    # large targets: the gradients are large, so a bound of 0.5 (norm) or 0.01 (value) clips every step
    return x, 10 * x.sum(-1)


def tiny_model():
    torch.manual_seed(0)
    return Tiny()


@pytest.fixture
def calls(monkeypatch):
    """Counts calls of torch's and ampclip's clip functions, by "torch.<name>" and "ampclip.<name>"."""
    counts = Counter()

    def spy(key, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            counts[key] += 1
            return fn(*args, **kwargs)

        return counted

    for name in NAMES:
        torch_spy = spy(f"torch.{name}", getattr(torch.nn.utils, name))
        monkeypatch.setattr(torch.nn.utils, name, torch_spy)
        if hasattr(torch.nn.utils.clip_grad, name):  # get_total_norm lives there under another name
            monkeypatch.setattr(torch.nn.utils.clip_grad, name, torch_spy)
        monkeypatch.setattr(ampclip.functional, name, spy(f"ampclip.{name}", getattr(ampclip.functional, name)))
    yield counts
    ampclip.unpatch_torch()  # before monkeypatch puts torch's own functions back


def assert_same_training(plain, patched, rel=1e-6):
    (losses_a, weights_a), (losses_b, weights_b) = plain, patched
    assert len(losses_a) == len(losses_b) == STEPS
    assert losses_b == pytest.approx(losses_a, rel=rel)
    for a, b in zip(weights_a, weights_b):
        torch.testing.assert_close(b, a, rtol=rel, atol=rel * float(a.abs().max()))


def both_runs(train, calls, names):
    """Runs ``train(patch)`` unpatched, then patched; checks who served the clip calls (each of ``names`` once
    a step); returns both results."""
    names = (names,) if isinstance(names, str) else names
    plain = train(patch=lambda: None)
    assert calls == Counter({f"torch.{n}": STEPS for n in names}), "the plain run must clip through torch"
    calls.clear()
    patched = train(patch=ampclip.patch_torch)
    ampclip.unpatch_torch()
    assert calls == Counter({f"ampclip.{n}": STEPS for n in names}), "every clip call must go to ampclip, none to torch"
    return plain, patched


def accelerate_norm_calls() -> tuple[str, ...]:
    """What ``Accelerator.clip_grad_norm_`` calls in torch, by version: up to 1.15 ``clip_grad_norm_``; from 1.16
    ``get_total_norm`` (per device mesh), then ``clip_grads_with_norm_`` with the combined norm."""
    import accelerate
    from packaging.version import Version

    if Version(accelerate.__version__) >= Version("1.16"):
        return ("get_total_norm", "clip_grads_with_norm_")
    return ("clip_grad_norm_",)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


# ---- HF Trainer ----


def test_hf_trainer_max_grad_norm(calls, tmp_path):
    pytest.importorskip("transformers", minversion="5")
    from transformers import Trainer, TrainingArguments

    x, y = data()
    dataset = [{"x": x[i], "labels": y[i]} for i in range(len(x))]

    def train(patch):
        model = tiny_model()
        args = TrainingArguments(
            output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=8, learning_rate=0.05,
            max_grad_norm=0.5, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no",
            report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset)
        patch()  # after the Trainer is built: the Trainer looks torch's function up when it clips
        trainer.train()
        return model.losses, weights(model)

    assert_same_training(*both_runs(train, calls, accelerate_norm_calls()))  # the Trainer clips through Accelerate


# ---- Accelerate ----


def accelerate_train(clip, patch):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    patch()  # before the Accelerator is built
    try:
        accelerator = Accelerator(cpu=True)
        model = tiny_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        x, y = data()
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        for _, (xb, yb) in zip(range(STEPS), loader):
            loss = model(xb, yb)["loss"]
            accelerator.backward(loss)
            clip(accelerator, model.parameters())
            optimizer.step()
            optimizer.zero_grad()
        return model.losses, weights(model)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_accelerate_clip_grad_norm(calls):
    pytest.importorskip("accelerate", minversion="1")
    train = functools.partial(accelerate_train, lambda acc, params: acc.clip_grad_norm_(params, 0.5))
    assert_same_training(*both_runs(train, calls, accelerate_norm_calls()))


def test_accelerate_clip_grad_value(calls):
    pytest.importorskip("accelerate", minversion="1")
    train = functools.partial(accelerate_train, lambda acc, params: acc.clip_grad_value_(params, 0.01))
    assert_same_training(*both_runs(train, calls, "clip_grad_value_"))


@pytest.mark.skipif(not os.path.isdir(OLD_ACCELERATE), reason="no second accelerate in build/ (make test puts one)")
def test_accelerate_tests_pass_on_the_older_accelerate_too():
    # The installed accelerate and an older one take different paths to torch (see accelerate_norm_calls): the
    # tests above run again in a fresh interpreter that imports the older one first.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [OLD_ACCELERATE, os.environ.get("PYTHONPATH")]))}
    probe = subprocess.run([sys.executable, "-c", "import accelerate; print(accelerate.__version__)"], env=env,
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "1.15.0"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                          "test_accelerate_clip"], env=env, capture_output=True, text=True)
    assert run.returncode == 0 and "2 passed" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]


# ---- Lightning ----


@pytest.mark.parametrize("algorithm, bound", [("norm", 0.5), ("value", 0.01)])
def test_lightning_gradient_clip_algorithm(algorithm, bound, calls, tmp_path):
    L = pytest.importorskip("lightning", minversion="2")

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_model()

        def training_step(self, batch, batch_idx):
            return self.model(*batch)["loss"]

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    x, y = data()

    def train(patch):
        module = Module()
        trainer = L.Trainer(
            max_steps=STEPS, accelerator="cpu", devices=1, gradient_clip_val=bound,
            gradient_clip_algorithm=algorithm, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
        )
        patch()
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
        trainer.fit(module, loader)
        return module.model.losses, weights(module.model)

    name = "clip_grad_norm_" if algorithm == "norm" else "clip_grad_value_"
    assert_same_training(*both_runs(train, calls, name))
