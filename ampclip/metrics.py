"""Logging sinks for training statistics: a ``log_scalar(name, value, step)`` callback and TensorBoard.

Statistics stay on the device until a logged step; then every scalar of that step is fetched with one
host sync (one ``torch.stack(...).tolist()``) and handed to each sink.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

__all__ = ["MetricsLogger", "TensorBoardSink"]


class TensorBoardSink:
    """Writes scalars to a TensorBoard ``SummaryWriter`` (needs the ``tensorboard`` package).

    Example::

        trainer = ampclip.create_amp_trainer(model, log_scalar=ampclip.TensorBoardSink("runs/exp1"))
    """

    def __init__(self, log_dir: Optional[str] = None, writer=None):
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir)
        self.writer = writer

    def __call__(self, name: str, value: float, step: int) -> None:
        self.writer.add_scalar(name, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MetricsLogger:
    """Sends named scalars to sinks every ``log_every`` steps, with one host sync per logged step.

    A sink is any callable ``(name, value, step)``, e.g. a ``log_scalar`` method or :class:`TensorBoardSink`.
    """

    def __init__(self, sinks: Iterable[Callable[[str, float, int], None]] = (), log_every: int = 1):
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}")
        self.sinks = list(sinks)
        self.log_every = log_every
        self.syncs = 0  # logged steps that fetched values from the device

    def due(self, step: int) -> bool:
        return bool(self.sinks) and step % self.log_every == 0

    def log(self, step: int, scalars: dict) -> None:
        """Write ``scalars`` (device tensors or numbers) for ``step`` if it is a logged step."""
        if not self.due(step) or not scalars:
            return
        names = list(scalars)
        tensors = [v for v in scalars.values() if isinstance(v, torch.Tensor)]
        fetched = iter(torch.stack([t.detach().float().reshape(()).to(tensors[0].device) for t in tensors]).tolist()
                       if tensors else [])
        if tensors:
            self.syncs += 1
        values = [next(fetched) if isinstance(v, torch.Tensor) else float(v) for v in scalars.values()]
        for sink in self.sinks:
            for name, value in zip(names, values):
                sink(name, value, step)

    def close(self) -> None:
        for sink in self.sinks:
            if hasattr(sink, "close"):
                sink.close()
