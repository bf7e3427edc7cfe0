"""The solo-learn integration: the only package of solo-deepfusion that imports ``solo``.

``register()`` adds ``<method>_<head>`` to ``solo.methods.METHODS`` for every method with a
projection head and every registered head (``simclr_transformer``, ``byol_mlp_matched``,
installed plugins' heads, and ``simclr_mlp``: the stock layout with a field changed, such as
``projector.output_norm=batch``). It runs on import and again wherever a variant
is asked for (``pretrain``, ``build_model``, loading a run), so a head registered after this
import is found too.
"""

from solo_deepfusion._host import host_problem

_problem = host_problem()
if _problem is not None:
    raise ImportError(_problem)

from hydra.core.config_store import ConfigStore  # noqa: E402
from solo.methods import METHODS  # noqa: E402

from solo_deepfusion.solo import variants  # noqa: E402
from solo_deepfusion.solo.variants import (  # noqa: E402
    HEAD_METHODS,
    base_method,
    make_variant,
    projector_config,
    projector_group_node,
    projectors,
    variant_heads,
    variant_name,
)


def register() -> list[str]:
    """Add every variant to ``solo.methods.METHODS`` and every head to Hydra's ``projector``
    config group (idempotent); return the variants' names."""
    store = ConfigStore.instance()
    heads = projectors()
    for projector in heads:
        store.store(group="projector", name=projector, node=projector_group_node(projector))
    names = []
    for method in HEAD_METHODS:
        for projector in variant_heads():
            name = f"{method}_{projector}"
            if name not in METHODS:
                cls = METHODS[name] = make_variant(method, projector)
                # found where its __module__ and __qualname__ say: picklable by reference
                setattr(variants, cls.__qualname__, cls)
            names.append(name)
    return names


register()

__all__ = [
    "HEAD_METHODS",
    "base_method",
    "projector_config",
    "projectors",
    "register",
    "variant_name",
]
