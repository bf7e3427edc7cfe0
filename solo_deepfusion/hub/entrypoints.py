"""``torch.hub`` entry points: one per zoo entry, each giving the entry's backbone.

The manifest is the registry: ``hubconf.py`` at the repository root publishes
:func:`entrypoints`, so a new zoo entry is a new ``torch.hub`` model with no code change.

>>> fns = entrypoints()
>>> sorted(fns)
['simclr_deepfusion_r18_cifar10_cpu', 'simclr_r18_cifar10_cpu']
>>> backbone = fns["simclr_r18_cifar10_cpu"]()                  # verified weights, eval mode
>>> untrained = fns["simclr_r18_cifar10_cpu"](pretrained=False)  # the architecture alone
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .backbones import entry_backbone, load_backbone
from .manifest import PathLike, ZooEntry, load_manifest


def hub_name(zoo_name: str) -> str:
    """The entry point of zoo entry ``zoo_name``: a Python identifier (``-`` and ``.`` -> ``_``)."""
    return zoo_name.replace("-", "_").replace(".", "_")


def _describe(entry: ZooEntry) -> str:
    metrics = "; ".join(f"{m.kind} {m.name} {m.value:g}" for m in entry.metrics)
    projector = entry.projector.get("name", "?")
    return (
        f"Backbone of zoo entry {entry.name!r}: {entry.method} with a {projector} head, "
        f"{entry.backbone.get('name')} ({entry.backbone.get('stem')} stem), {entry.dataset}, "
        f"{entry.epochs} epochs. {metrics}.\n\n"
        "Maps images (B, 3, H, W) to pooled features (B, F). pretrained=False gives the "
        "architecture alone; other keywords (cache_dir, offline, progress) go to "
        "solo_deepfusion.hub.load_backbone."
    )


def entrypoint(entry: ZooEntry) -> Callable[..., nn.Module]:
    """The factory of one entry: ``fn(*, pretrained=True, **load_backbone_kwargs)``."""

    def factory(*, pretrained: bool = True, **kwargs: Any) -> nn.Module:
        if pretrained:
            return load_backbone(entry, **kwargs)
        return entry_backbone(entry).eval()

    factory.__name__ = factory.__qualname__ = hub_name(entry.name)
    factory.__doc__ = _describe(entry)
    return factory


def entrypoints(manifest: PathLike | None = None) -> dict[str, Callable[..., nn.Module]]:
    """``{entry point name: factory}`` of every entry of the (default) manifest."""
    return {hub_name(e.name): entrypoint(e) for e in load_manifest(manifest).values()}
