"""The solo-learn integration: the only package of solo-deepfusion that imports ``solo``.

``register()`` adds ``<method>_transformer`` and ``<method>_mlp_matched`` to
``solo.methods.METHODS`` for every method with a projection head.
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
    PROJECTORS,
    base_method,
    make_variant,
    projector_config,
    projector_group_node,
    variant_name,
)


def register() -> list[str]:
    """Add every variant to ``solo.methods.METHODS`` and every head to Hydra's ``projector``
    config group (idempotent); return the variants' names."""
    store = ConfigStore.instance()
    for projector in PROJECTORS:
        store.store(group="projector", name=projector, node=projector_group_node(projector))
    names = []
    for method in HEAD_METHODS:
        for projector in PROJECTORS[1:]:
            name = variant_name(method, projector)
            if name not in METHODS:
                cls = METHODS[name] = make_variant(method, projector)
                # found where its __module__ and __qualname__ say: picklable by reference
                setattr(variants, cls.__qualname__, cls)
            names.append(name)
    return names


register()

__all__ = [
    "HEAD_METHODS",
    "PROJECTORS",
    "base_method",
    "projector_config",
    "register",
    "variant_name",
]
