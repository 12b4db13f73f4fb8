"""NaN/inf detection and recovery: find what went wrong only when something did, then recover without
losing the run.

* :class:`NaNDetector` names the parameters whose gradients hold inf or NaN and flags a non-finite loss.
  It reads ``found_inf`` first (one host sync) and scans the gradients only when it is set, so a clean
  step costs one scalar read.
* :class:`SpikeDetector` flags loss or gradient-norm spikes by a z-score over a sliding window; the
  recovery manager logs them or skips the step.
* :class:`NaNRecoveryManager` applies a strategy after each non-finite step: ``skip`` (the scaler already
  skipped it), ``reduce_scale`` (back the loss scale off further), ``clip`` (clip tighter for the next k
  steps) or ``rollback`` (after K consecutive non-finite steps, restore the last good snapshot of model,
  optimizer and scaler). Counts and events are kept for the stats.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

__all__ = ["NaNDetector", "NaNReport", "NaNRecoveryManager", "RecoveryEvent", "SpikeDetector", "STRATEGIES"]

STRATEGIES = ("skip", "reduce_scale", "clip", "rollback")


@dataclass
class NaNReport:
    """Where the non-finite values were: ``params`` maps a name to ``{"inf": count, "nan": count}``."""

    step: int
    loss_nonfinite: bool
    params: dict[str, dict[str, int]] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"{name} (inf {c['inf']}, nan {c['nan']})" for name, c in self.params.items()]
        loss = "loss is not finite; " if self.loss_nonfinite else ""
        return f"step {self.step}: {loss}non-finite gradients in {', '.join(parts) or 'no parameter'}"


def _to_float(value) -> float:
    return float(value.detach().float().item()) if isinstance(value, torch.Tensor) else float(value)


class NaNDetector:
    """Names the parameters whose gradients hold inf or NaN, only when a step was non-finite.

    Example::

        detector = ampclip.NaNDetector(model.named_parameters())
        report = detector.check(stats.found_inf, loss)     # None on a clean step
        if report:
            print(report.summary())
    """

    def __init__(self, named_parameters):
        if isinstance(named_parameters, torch.nn.Module):
            named_parameters = named_parameters.named_parameters()
        self.named_parameters = list(named_parameters)
        self.reports: list[NaNReport] = []
        self._step = 0

    def check(self, found_inf: Optional[Union[torch.Tensor, float, bool]] = None, loss=None) -> Optional[NaNReport]:
        """A :class:`NaNReport` when ``found_inf`` is set or the loss is not finite, else None.

        With ``found_inf=None`` the gradients are scanned every time (a full read of them).
        """
        step, self._step = self._step, self._step + 1
        loss_bad = loss is not None and not math.isfinite(_to_float(loss))
        if found_inf is not None and not _to_float(found_inf) and not loss_bad:
            return None  # the good path: one scalar read
        params = {}
        for name, p in self.named_parameters:
            g = p.grad
            if g is None or g.numel() == 0:
                continue
            counts = torch.stack([torch.isinf(g).sum(), torch.isnan(g).sum()]).tolist()
            if counts[0] or counts[1]:
                params[name] = {"inf": int(counts[0]), "nan": int(counts[1])}
        if not params and not loss_bad:
            return None
        report = NaNReport(step, loss_bad, params)
        self.reports.append(report)
        return report


class SpikeDetector:
    """Flags a value more than ``z_threshold`` standard deviations above the mean of the last ``window``
    accepted values (after ``warmup`` values). Spikes are not added to the window, so one spike does not
    hide the next. A host-side check: feed it floats you already fetched for logging.

    Example::

        spikes = ampclip.SpikeDetector(window=100, z_threshold=6.0)
        if spikes.observe(loss.item()):
            ...  # skip or log
    """

    def __init__(self, window: int = 100, z_threshold: float = 6.0, warmup: int = 10):
        if window < 2 or warmup < 2 or z_threshold <= 0:
            raise ValueError("need window >= 2, warmup >= 2 and z_threshold > 0")
        self.window = window
        self.z_threshold = z_threshold
        self.warmup = warmup
        self.values: deque = deque(maxlen=window)
        self.spikes = 0

    def zscore(self, value: float) -> float:
        if len(self.values) < self.warmup:
            return 0.0
        n = len(self.values)
        mean = sum(self.values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in self.values) / (n - 1))
        return (value - mean) / max(std, 1e-12 * max(abs(mean), 1.0))

    def observe(self, value) -> bool:
        value = _to_float(value)
        spike = not math.isfinite(value) or self.zscore(value) > self.z_threshold
        if spike:
            self.spikes += 1
        else:
            self.values.append(value)
        return spike

    def state_dict(self) -> dict:
        return {"values": list(self.values), "spikes": self.spikes}

    def load_state_dict(self, state: dict) -> None:
        self.values = deque(state["values"], maxlen=self.window)
        self.spikes = state["spikes"]


@dataclass
class RecoveryEvent:
    step: int
    kind: str  # "nonfinite", "reduce_scale", "tighten_clip", "rollback", "loss_spike", "grad_norm_spike"
    detail: str = ""


class NaNRecoveryManager:
    """Recovery after non-finite steps, so that nothing is lost.

    Call :meth:`after_step` once per step with the step's ``found_inf`` (and optionally the loss). It
    returns what it did. With spike detectors, call :meth:`check_spikes` before the optimizer step: it
    logs spikes, or skips the step (``spike_action="skip"``). Strategies:

    * ``"skip"``: count it; the scaler already skipped the update.
    * ``"reduce_scale"``: also multiply the loss scale by ``scale_factor``.
    * ``"clip"``: clip with ``max_norm * clip_factor`` for the next ``clip_steps`` steps
      (read :meth:`max_norm`).
    * ``"rollback"``: after ``rollback_after`` consecutive non-finite steps, restore the last good snapshot
      of model, optimizer and scaler (taken every ``snapshot_every`` clean steps, kept on the CPU).

    Example::

        recovery = ampclip.NaNRecoveryManager(model, optimizer, scaler, strategy="rollback")
        ...
        event = recovery.after_step(stats.found_inf, loss)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Optional[torch.optim.Optimizer] = None,
        scaler=None,
        strategy: str = "skip",
        scale_factor: float = 0.5,
        clip_factor: float = 0.5,
        clip_steps: int = 10,
        rollback_after: int = 3,
        snapshot_every: int = 100,
        spike_detector: Optional[SpikeDetector] = None,
        grad_norm_spike_detector: Optional[SpikeDetector] = None,
        detector: Optional[NaNDetector] = None,
        spike_action: str = "log",
    ):
        if spike_action not in ("log", "skip"):
            raise ValueError(f"spike_action must be 'log' or 'skip', got {spike_action!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if strategy == "reduce_scale" and scaler is None:
            raise ValueError("strategy 'reduce_scale' needs the loss scaler")
        if strategy == "rollback" and optimizer is None:
            raise ValueError("strategy 'rollback' needs the optimizer too")
        if not 0 < scale_factor < 1 or not 0 < clip_factor <= 1:
            raise ValueError("scale_factor must be in (0, 1) and clip_factor in (0, 1]")
        if clip_steps < 1 or rollback_after < 1 or snapshot_every < 1:
            raise ValueError("clip_steps, rollback_after and snapshot_every must be >= 1")
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.strategy = strategy
        self.scale_factor, self.clip_factor, self.clip_steps = scale_factor, clip_factor, clip_steps
        self.rollback_after, self.snapshot_every = rollback_after, snapshot_every
        self.loss_spikes = spike_detector
        self.grad_norm_spikes = grad_norm_spike_detector
        self.detector = detector
        self.spike_action = spike_action
        self._spike_events: list[RecoveryEvent] = []
        self.step = 0
        self.consecutive_nonfinite = 0
        self.counts = {"nonfinite": 0, "rollbacks": 0, "scale_reductions": 0, "loss_spikes": 0,
                       "grad_norm_spikes": 0}
        self.events: list[RecoveryEvent] = []
        self._tight_until = -1
        self._snapshot = None
        if strategy == "rollback":
            self._take_snapshot()

    def max_norm(self, base: float) -> float:
        """The clip bound to use this step: ``base``, or tighter after a non-finite step (strategy clip)."""
        return base * self.clip_factor if self.step <= self._tight_until else base

    def _take_snapshot(self) -> None:
        self._snapshot = {
            "step": self.step,
            "model": copy.deepcopy({k: v.cpu() for k, v in self.model.state_dict().items()}),
            "optimizer": copy.deepcopy(_optimizer_state_to_cpu(self.optimizer.state_dict())),
            "scaler": copy.deepcopy(self.scaler.state_dict()) if self.scaler is not None else None,
        }

    def _rollback(self) -> None:
        snap = self._snapshot
        self.model.load_state_dict(snap["model"])
        # load_state_dict keeps the tensors it is given as the optimizer's state, which the next steps then
        # change in place: hand it a copy, so that the snapshot survives for the next rollback.
        self.optimizer.load_state_dict(copy.deepcopy(snap["optimizer"]))
        if self.scaler is not None and snap["scaler"] is not None:
            self.scaler.load_state_dict(snap["scaler"])
            if self.scaler.is_enabled():  # come back with a smaller scale than the one that overflowed
                self.scaler.update(new_scale=self.scaler.get_scale() * self.scale_factor)

    def check_spikes(self, found_inf: torch.Tensor, loss=None, grad_norm=None) -> bool:
        """Before the optimizer step: feed the spike detectors and, with ``spike_action="skip"``, turn a
        spike into a skipped step by setting ``found_inf`` (the tensor the scaler and a fused optimizer
        read, so the skip stays on the device). Returns whether a spike was seen. One host read per value.
        """
        spiked = False
        for detector, kind, value in ((self.loss_spikes, "loss_spike", loss),
                                      (self.grad_norm_spikes, "grad_norm_spike", grad_norm)):
            if detector is not None and value is not None and detector.observe(value):
                self.counts[kind + "s"] += 1
                self._spike_events.append(RecoveryEvent(self.step, kind, f"{_to_float(value):g}"))
                spiked = True
        if spiked and self.spike_action == "skip":
            found_inf.fill_(1.0)
            self._spike_events.append(RecoveryEvent(self.step, "skipped_spike"))
        return spiked

    def after_step(self, found_inf, loss=None) -> list[RecoveryEvent]:
        """Record the step and act on it; returns the events of this step (one host read of found_inf)."""
        step = self.step
        events, self._spike_events = self._spike_events, []
        skipped_spike = any(e.kind == "skipped_spike" for e in events)
        nonfinite = (bool(_to_float(found_inf)) and not skipped_spike) or (
            loss is not None and not math.isfinite(_to_float(loss)))
        if nonfinite:
            self.counts["nonfinite"] += 1
            self.consecutive_nonfinite += 1
            detail = ""
            if self.detector is not None:
                report = self.detector.check(found_inf, loss)
                detail = report.summary() if report else ""
            events.append(RecoveryEvent(step, "nonfinite", detail))
            if self.strategy == "reduce_scale":
                self.scaler.update(new_scale=self.scaler.get_scale() * self.scale_factor)
                self.counts["scale_reductions"] += 1
                events.append(RecoveryEvent(step, "reduce_scale", f"scale {self.scaler.get_scale():g}"))
            elif self.strategy == "clip":
                self._tight_until = step + self.clip_steps
                events.append(RecoveryEvent(step, "tighten_clip", f"until step {self._tight_until}"))
            elif self.strategy == "rollback" and self.consecutive_nonfinite >= self.rollback_after:
                self._rollback()
                self.counts["rollbacks"] += 1
                self.consecutive_nonfinite = 0
                events.append(RecoveryEvent(step, "rollback", f"to the snapshot of step {self._snapshot['step']}"))
        else:
            self.consecutive_nonfinite = 0
        self.step += 1
        if not nonfinite and self.strategy == "rollback" and self.step % self.snapshot_every == 0:
            self._take_snapshot()
        self.events.extend(events)
        return events

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "consecutive_nonfinite": self.consecutive_nonfinite,
            "counts": dict(self.counts),
            "tight_until": self._tight_until,
            "loss_spikes": self.loss_spikes.state_dict() if self.loss_spikes else None,
            "grad_norm_spikes": self.grad_norm_spikes.state_dict() if self.grad_norm_spikes else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.consecutive_nonfinite = state["consecutive_nonfinite"]
        self.counts = dict(state["counts"])
        self._tight_until = state["tight_until"]
        if self.loss_spikes and state.get("loss_spikes"):
            self.loss_spikes.load_state_dict(state["loss_spikes"])
        if self.grad_norm_spikes and state.get("grad_norm_spikes"):
            self.grad_norm_spikes.load_state_dict(state["grad_norm_spikes"])
        if self.strategy == "rollback":
            self._take_snapshot()


def _optimizer_state_to_cpu(state: dict) -> dict:
    return {
        "state": {k: {n: v.cpu() if isinstance(v, torch.Tensor) else v for n, v in s.items()}
                  for k, s in state["state"].items()},
        "param_groups": state["param_groups"],
    }
