"""The ``joint`` attention context, done once for every solo-learn method.

solo-learn's ``BaseMethod.training_step`` runs ``forward`` (backbone, then the method's
projector call) once per crop, so a projector only ever sees one crop's batch. For the
``joint`` context the mixins below sit between the method and ``BaseMethod`` in the MRO
(``class SimCLRTransformer(SimCLR, JointContextMixin)``): at the start of a training step
they run the backbone once per crop, run the head once over all crops' features, and then
serve those results when the method's own code asks for them crop by crop. No backbone pass
runs twice and no method code is repeated here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from solo.methods.base import BaseMethod, BaseMomentumMethod
from torch import nn


class ContextProjector(nn.Module):
    """A head plus the method's tail, able to serve precomputed joint-context outputs.

    ``joint`` is what the head's registration declares (``register_projector(...,
    joint_context=...)``). For a joint head, ``project(feats_per_crop)`` runs it once on the
    concatenated crops (view-major) and remembers each crop's rows; a later ``forward(feats)``
    with one of those very tensors returns its rows. Any other input (validation, small crops,
    evaluation) is projected on its own, as one ``view``.
    """

    def __init__(self, head: nn.Module, tail: nn.Module | None = None, joint: bool = False) -> None:
        super().__init__()
        self.head = head
        self.tail = tail if tail is not None else nn.Identity()
        self.joint = joint
        self._served: list[tuple[torch.Tensor, torch.Tensor]] = []

    def project(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        z = self.tail(self.head(torch.cat(feats), num_views=len(feats)))
        outputs = list(z.split([f.shape[0] for f in feats]))
        self._served = list(zip(feats, outputs, strict=True))
        return outputs

    def release(self) -> None:
        self._served = []

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        for served_feats, z in self._served:
            if served_feats is feats:
                return z
        return self.tail(self.head(feats))


class _Served:
    """Outputs computed ahead of the per-crop calls, looked up by the identity of the crop."""

    def __init__(self) -> None:
        self.items: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def get(self, x: torch.Tensor, compute: Callable[[torch.Tensor], dict[str, Any]]) -> Any:
        for crop, out in self.items:
            if crop is x:
                return dict(out)
        return compute(x)


@contextmanager
def _serving(
    served: _Served, head: ContextProjector, outputs: list[tuple[torch.Tensor, dict[str, Any]]]
) -> Iterator[None]:
    """For one training step: serve ``outputs`` per crop and the head's joint projection."""
    served.items = outputs
    head.project([out["feats"] for _, out in outputs])
    try:
        yield
    finally:
        served.items = []
        head.release()


def _crops(batch: Any) -> list[torch.Tensor]:
    crops = batch[1]
    return [crops] if isinstance(crops, torch.Tensor) else list(crops)


class JointContextMixin(BaseMethod):
    """Online branch: backbone once per crop, then the head once over all large crops.

    Variants name where their head lives with ``context_projector`` (``"projector"``, or
    ``"head.mlp"`` for DINO) and whether small crops join with ``cfg.projector.small_crops``.
    """

    context_projector: str = "projector"

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self._online_served = _Served()

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        head: ContextProjector = self.get_submodule(self.context_projector)
        if not head.joint:
            return super().training_step(batch, batch_idx)
        crops = _crops(batch)
        large = crops[: self.num_large_crops]
        small = crops[self.num_large_crops :] if self.cfg.projector.small_crops else []
        outputs = [(x, super(JointContextMixin, self).forward(x)) for x in large]
        outputs += [(x, super(JointContextMixin, self).multicrop_forward(x)) for x in small]
        with _serving(self._online_served, head, outputs):
            return super().training_step(batch, batch_idx)

    def forward(self, X: torch.Tensor) -> dict[str, Any]:
        return self._online_served.get(X, super().forward)

    def multicrop_forward(self, X: torch.Tensor) -> dict[str, Any]:
        return self._online_served.get(X, super().multicrop_forward)


class MomentumJointContextMixin(BaseMomentumMethod, JointContextMixin):
    """Adds the same joint context to the momentum branch (its own EMA copy of the head)."""

    momentum_context_projector: str = "momentum_projector"

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self._momentum_served = _Served()

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        head: ContextProjector = self.get_submodule(self.momentum_context_projector)
        if not head.joint:
            return super().training_step(batch, batch_idx)
        large = _crops(batch)[: self.num_large_crops]
        # momentum_forward runs under no_grad and the EMA head has no trainable parameters,
        # so its joint projection records no graph either.
        outputs = [(x, super(MomentumJointContextMixin, self).momentum_forward(x)) for x in large]
        with _serving(self._momentum_served, head, outputs):
            return super().training_step(batch, batch_idx)

    def momentum_forward(self, X: torch.Tensor) -> dict[str, Any]:
        return self._momentum_served.get(X, super().momentum_forward)
