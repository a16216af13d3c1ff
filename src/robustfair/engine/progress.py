"""Progress bars that move during an evaluation batch, once per model call.

An attack calls the model once per iteration, so a bar that only advances when a batch of
hundreds of images is done sits still for minutes on a CPU. :class:`EvalProgress` wraps the
model so that every forward pass moves the bar by its share of the batch (estimated from the
attacks' iteration counts), and :meth:`EvalProgress.batch_done` sets it to the exact count at
the end of each batch. The numbers computed are unchanged: the wrapper only counts calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn


class CountingModel(nn.Module):
    """``model`` unchanged, calling ``on_forward(batch_size)`` after each forward pass."""

    def __init__(self, model: nn.Module, on_forward: Callable[[int], None]) -> None:
        super().__init__()
        self.model = model
        self.on_forward = on_forward

    def forward(self, x: Tensor) -> Any:
        out = self.model(x)
        self.on_forward(len(x))
        return out


def forwards_per_batch(attacks: Sequence[Any], norm: str = "linf") -> int:
    """Estimated model calls per batch for ``attacks`` (specs or built attacks): iterations ×
    restarts, plus one prediction each."""
    from ..attacks import Attack, build_attack

    total = 0
    for a in attacks:
        atk = a if isinstance(a, Attack) else build_attack(a, norm)
        d = atk.describe()
        steps = d.get("steps") if isinstance(d.get("steps"), int) else 0
        restarts = d.get("restarts") if isinstance(d.get("restarts"), int) else 1
        total += steps * max(restarts, 1) + 1
    return max(total, 1)


class EvalProgress:
    """A tqdm bar over images that advances per model call within a batch.

    Args:
        total: images to evaluate.
        attacks: the attacks run on each batch (for the estimate of calls per batch).
        desc: the bar's label.
        norm: the attacks' norm.
        quiet: draw no bar (:meth:`wrap` then returns the model itself).
    """

    def __init__(self, total: int, attacks: Sequence[Any], desc: str, norm: str = "linf",
                 quiet: bool = False) -> None:
        self.bar = None
        self.calls = forwards_per_batch(attacks, norm)
        self.done = 0
        self.partial = 0.0
        self.largest = 0
        if not quiet:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="img", leave=False,
                            dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.0f}/{total} img "
                                                           "[{elapsed}<{remaining}]")

    def wrap(self, model: nn.Module) -> nn.Module:
        return model if self.bar is None else CountingModel(model, self._forward)

    def _forward(self, n: int) -> None:
        self.largest = max(self.largest, n)
        self.partial = min(self.partial + n / self.calls, float(self.largest))
        self._show(self.done + self.partial)

    def batch_done(self, n: int) -> None:
        """Call after each batch of ``n`` images (``evaluate``'s ``progress`` callback)."""
        self.done += n
        self.partial = 0.0
        self.largest = 0
        self._show(self.done)

    def _show(self, value: float) -> None:
        if self.bar is not None:
            self.bar.update(value - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> EvalProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
