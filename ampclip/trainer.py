"""AMPTrainer: the mixed-precision training step with ampclip's fused clipping, loss scaling, NaN recovery
and monitoring, for one process, DDP and FSDP2.

One optimizer step: autocast forward, scaled backward (``no_sync`` on accumulation micro-steps under DDP),
fused unscale + check + clip (deferred into a fused optimizer when possible), skip on inf/NaN, scale update,
recovery. The norms are measured while backward runs where that applies (``AMPConfig.overlap_clip``), so the
clip after backward is a finalize and the scale. Nothing syncs with the host unless you ask for a float
(``training_step``), log, or use a NaN strategy other than "skip".
"""

from __future__ import annotations

import contextlib
import enum
import math
from typing import Callable, Iterable, Optional, Union

import torch

from .clipping import GradientClipper
from .config import AMPConfig
from .metrics import MetricsLogger
from .nan import NaNDetector, NaNRecoveryManager
from .overlap import Overlap, refusal
from .scaler import DynamicLossScaler
from .strategies import NormClip

__all__ = ["AMPTrainer", "create_amp_trainer", "run_training_epoch"]

_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _skip_group(model: torch.nn.Module, param: torch.Tensor):
    """The process group whose ranks must agree on every skip, or None when they already do: a run on
    several ranks with a model neither DDP (which averages the gradients, so every rank sees the same inf)
    nor FSDP2 (whose DTensor gradients agree in their own reduction) needs one all-reduce of found_inf."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) or hasattr(param, "device_mesh"):
        return None
    return dist.group.WORLD


def _overlap(config: AMPConfig, model: torch.nn.Module, params: list):
    """What the clipper's ``overlap`` is: an :class:`Overlap` where it applies and ``overlap_clip`` allows it
    (True raises where it does not apply), else False."""
    if not config.overlap_clip:
        return False
    if config.overlap_clip == "auto" and not any(p.is_cuda for p in params[:1]):
        # On a CPU the same cores run backward and the norm passes: nothing is hidden, and the hooks cost
        # (measured 1-2% of a small GPT's step here). "auto" measures during backward on a GPU only.
        return False
    spec = Overlap(model) if isinstance(model, torch.nn.parallel.DistributedDataParallel) else Overlap()
    # with clipping off the norms are measured all the same, by a norm bound of inf
    strategy = config.clip_strategy() if config.gradient_clip_strategy is not None else NormClip()
    reason = refusal(params, strategy, spec)
    if reason is None:
        return spec
    if config.overlap_clip != "auto":
        raise reason
    return False


def _default_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    try:  # fused AdamW lets the clip be deferred into the optimizer's own read of the gradients
        return torch.optim.AdamW(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=lr)


class AMPTrainer:
    """Mixed-precision training with fused clipping and a dynamic loss scaler.

    A batch is ``(inputs, targets)``, giving ``loss_fn(model(inputs), targets)``, or a dict passed to the
    model as keyword arguments when there is no ``loss_fn`` and the model's output carries ``loss``
    (the Hugging Face convention).

    Example::

        config = ampclip.create_default_amp_config(precision="bf16", gradient_clip_max_norm=1.0)
        trainer = ampclip.create_amp_trainer(model, loss_fn=torch.nn.functional.cross_entropy, amp_config=config)
        for batch in loader:
            loss = trainer.training_step(batch)          # a float (one sync); training_step_async: a tensor
        print(trainer.last_clipping_stats, trainer.get_gradient_summary())
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Optional[torch.optim.Optimizer] = None,
        loss_fn: Optional[Callable] = None,
        amp_config: Optional[AMPConfig] = None,
        log_scalar: Optional[Union[Callable, Iterable[Callable]]] = None,
        log_every: int = 1,
        lr: float = 3e-4,
        backend: Optional[str] = None,
    ):
        self.config = config = amp_config or AMPConfig()
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer or _default_optimizer(model, lr)
        param = next(model.parameters())
        self.device = param.device
        self.autocast_dtype = _AUTOCAST_DTYPES[config.precision]
        self.is_ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        self.scaler = DynamicLossScaler(
            self.device, init_scale=config.init_scale, growth_factor=config.growth_factor,
            backoff_factor=config.backoff_factor, growth_interval=config.growth_interval,
            hysteresis=config.hysteresis, min_scale=config.min_scale, max_scale=config.max_scale,
            precision=config.precision, backend=backend, process_group=_skip_group(model, param))
        named = [(n, p) for n, p in _unwrap(model).named_parameters() if p.requires_grad]
        self.clipping_enabled = config.gradient_clip_strategy is not None
        overlap = _overlap(config, model, [p for _, p in named])
        # With clipping off the clipper still measures (one read, coefficient 1, nothing written).
        if self.clipping_enabled:
            self.clipper = GradientClipper(
                named, config.gradient_clip_strategy, max_norm=config.gradient_clip_max_norm,
                precision=config.precision, clip_value=config.gradient_clip_value, mode=config.gradient_clip_mode,
                enable_monitoring=config.enable_gradient_monitoring, backend=backend,
                coef_rule=config.gradient_clip_coef_rule, coef_eps=config.gradient_clip_coef_eps,
                overlap=overlap, **config.gradient_clip_options)
        else:
            self.clipper = GradientClipper(named, "norm", max_norm=math.inf, precision=config.precision,
                                           enable_monitoring=config.enable_gradient_monitoring, backend=backend,
                                           overlap=overlap)
        self._base_max_norm = self.clipper.max_norm
        self.recovery = NaNRecoveryManager(_unwrap(model), self.optimizer, self.scaler,
                                           strategy=config.nan_recovery_strategy, detector=NaNDetector(named))
        sinks = [] if log_scalar is None else [log_scalar] if callable(log_scalar) else list(log_scalar)
        self.metrics = MetricsLogger(sinks, log_every)
        self.global_step = 0
        self.micro_step = 0
        self._last: Optional[dict] = None

    # ------------------------------------------------------------------------------------------ one step
    def compute_loss(self, batch) -> torch.Tensor:
        if isinstance(batch, dict):
            if self.loss_fn is not None:
                raise ValueError("a dict batch goes to the model as keyword arguments; drop loss_fn and "
                                 "return the loss from the model (output.loss), or pass (inputs, targets)")
            out = self.model(**batch)
            loss = out["loss"] if isinstance(out, dict) else getattr(out, "loss", None)
            if loss is None:
                raise ValueError("the model's output has no `loss`: pass labels in the batch or a loss_fn")
            return loss
        if self.loss_fn is None:
            raise ValueError("an (inputs, targets) batch needs loss_fn")
        inputs, targets = batch
        return self.loss_fn(self.model(inputs), targets)

    def training_step_async(self, batch) -> torch.Tensor:
        """One micro-step; the optimizer steps every ``grad_accumulation_steps`` calls. Returns the loss as a
        detached device tensor: no host sync."""
        k = self.config.grad_accumulation_steps
        boundary = (self.micro_step + 1) % k == 0
        no_sync = self.model.no_sync() if self.is_ddp and not boundary else contextlib.nullcontext()
        # only the last micro-batch's backward is measured: it sees the accumulated gradients
        no_measure = self.clipper.no_measure() if not boundary else contextlib.nullcontext()
        with no_sync, no_measure:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                loss = self.compute_loss(batch)
            self.scaler.scale(loss.float() / k).backward()
        self.micro_step += 1
        if boundary:
            self._optimizer_step(loss.detach())
        return loss.detach()

    def training_step(self, batch) -> float:
        """:meth:`training_step_async` as a Python float (one host sync)."""
        return float(self.training_step_async(batch))

    def _optimizer_step(self, loss: torch.Tensor) -> None:
        strategy = self.config.nan_recovery_strategy
        if strategy == "clip":
            self.clipper.max_norm = self.recovery.max_norm(self._base_max_norm)
        stats = self.scaler.unscale_and_clip_(self.optimizer, clipper=self.clipper, defer=self.config.defer_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if strategy != "skip":  # the other strategies act on the host: one read of found_inf
            self.recovery.after_step(stats.found_inf, loss)
        self.optimizer.zero_grad(set_to_none=True)
        self._last = {
            "pre_clip_norm": stats.total_norm,
            "post_clip_norm": stats.post_clip_norm,
            "clip_coef": stats.clip_coef if stats.clip_coef.dim() == 0 else stats.clip_coef.float().mean(),
            "found_inf": stats.found_inf,
            "loss_scale": self.scaler.loss_scale.clone(),
            "loss": loss.float(),
            "clamped": stats.clamped if stats.clamped is not None else stats.found_inf.new_zeros(()),
        }
        self._log(stats)
        self.global_step += 1

    def _log(self, stats) -> None:
        if not self.metrics.due(self.global_step):
            return
        scalars = {
            "train/loss": self._last["loss"],
            "gradients/pre_clip_norm": self._last["pre_clip_norm"],
            "gradients/post_clip_norm": self._last["post_clip_norm"],
            "gradients/clip_coef": self._last["clip_coef"],
            "amp/loss_scale": self._last["loss_scale"],
            "amp/found_inf": self._last["found_inf"],
        }
        if self.config.enable_gradient_monitoring and self.global_step % self.config.monitoring_interval == 0:
            for name, norm in stats.named_norms().items():
                scalars[f"gradients/layer/{name}"] = norm
        self.metrics.log(self.global_step, scalars)

    # ------------------------------------------------------------------------------------------ reading
    @property
    def last_clipping_stats(self) -> Optional[dict]:
        """The last optimizer step's ``pre_clip_norm``, ``post_clip_norm``, ``clip_coef``, ``found_inf``,
        ``loss_scale`` and ``loss`` as floats (one host sync), and ``clipped`` (a coefficient below 1, or a value
        clamp that moved an element, on a step that was not skipped), or None before the first step."""
        if self._last is None:
            return None
        names = list(self._last)
        values = torch.stack([v.detach().float().reshape(()) for v in self._last.values()]).tolist()
        out = dict(zip(names, values))
        out["found_inf"] = bool(out["found_inf"])
        clamped = bool(out.pop("clamped"))  # a value clamp moved an element: clipped too
        out["clipped"] = self.clipping_enabled and (out["clip_coef"] < 1.0 or clamped) and not out["found_inf"]
        return out

    def get_gradient_summary(self) -> dict:
        """Per-layer gradient norms (last, mean, max), clipped and skipped steps, loss-scale history."""
        summary = self.clipper.get_statistics()
        history = self.scaler.history()
        summary["optimizer_steps"] = self.global_step
        summary["loss_scale_history"] = history["scale"].tolist()
        summary["recovery"] = dict(self.recovery.counts)
        return summary

    def train(self, batches: Iterable, max_steps: Optional[int] = None, progress: bool = True) -> list[float]:
        """Run :meth:`training_step` over ``batches`` with a progress bar; returns the losses."""
        from tqdm.auto import tqdm

        losses = []
        bar = tqdm(batches, total=max_steps, disable=not progress, desc="train")
        for i, batch in enumerate(bar):
            if max_steps is not None and i >= max_steps:
                break
            losses.append(self.training_step(batch))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        return losses

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Model, optimizer, scaler, clipper (adaptive history included), recovery, step counters and the
        settings, as ``torch.save`` writes and ``torch.load(weights_only=True)`` reads them: a callable setting
        (AGC's ``exclude`` predicate) appears by its name, not as code."""
        return {
            "model": _unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "clipper": self.clipper.state_dict(),
            "recovery": self.recovery.state_dict(),
            "global_step": self.global_step,
            "micro_step": self.micro_step,
            "config": _checkpointable(self.config.to_dict()),
        }

    def load_state_dict(self, state: dict) -> None:
        _unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.clipper.load_state_dict(state["clipper"])
        self.recovery.load_state_dict(state["recovery"])
        self.global_step = state["global_step"]
        self.micro_step = state["micro_step"]


def _checkpointable(value):
    """``value`` built of what a weights-only load reads: None, numbers, strings, and lists, tuples and dicts of
    them. A callable becomes its qualified name (a lambda cannot be pickled, and a weights-only load refuses a
    function); an enum its value; a set a sorted list; anything else its ``repr``."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, enum.Enum):
        return _checkpointable(value.value)
    if isinstance(value, dict):
        return {key: _checkpointable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_checkpointable(item) for item in value)
    if isinstance(value, (set, frozenset)):
        return sorted((_checkpointable(item) for item in value), key=repr)
    if callable(value):
        return f"{getattr(value, '__module__', None) or '?'}.{getattr(value, '__qualname__', type(value).__qualname__)}"
    return repr(value)


def create_amp_trainer(model, optimizer=None, loss_fn=None, amp_config: Optional[AMPConfig] = None,
                       **kwargs) -> AMPTrainer:
    """An :class:`AMPTrainer` (``amp_config`` defaults to ``AMPConfig()``)."""
    return AMPTrainer(model, optimizer, loss_fn, amp_config, **kwargs)


def run_training_epoch(model, dataloader, optimizer, device=None, max_grad_norm: Optional[float] = 1.0,
                       tracker=None, loss_fn: Optional[Callable] = None) -> float:
    """One epoch of the plain loop: forward, backward, clip, step. Returns the mean loss.

    ``max_grad_norm=None`` disables clipping. With a ``tracker`` (anything with ``log_scalar(name, value,
    step)``), the first batch of the epoch logs ``gradients/pre_clip_norm`` and
    ``gradients/post_clip_norm``. Batches are dicts for ``model(**batch).loss`` or ``(inputs, targets)``
    with ``loss_fn``.

    Example::

        loss = ampclip.run_training_epoch(model, loader, optimizer, max_grad_norm=1.0, tracker=tracker)
    """
    from . import functional, ops

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    total, batches = 0.0, 0
    for index, batch in enumerate(dataloader):
        if isinstance(batch, dict):
            batch = {k: v.to(device) if device is not None else v for k, v in batch.items()}
            loss = model(**batch).loss
        else:
            inputs, targets = (t.to(device) if device is not None else t for t in batch)
            loss = loss_fn(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        if max_grad_norm is not None:
            pre = functional.clip_grad_norm_(params, max_grad_norm)
            if tracker is not None and index == 0:
                post = pre * ops.clip_coef(max_grad_norm, pre)
                tracker.log_scalar("gradients/pre_clip_norm", float(pre), index)
                tracker.log_scalar("gradients/post_clip_norm", float(post), index)
        optimizer.step()
        total += float(loss.detach())
        batches += 1
    return total / max(batches, 1)
