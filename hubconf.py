"""torch.hub entry points: the backbone of every zoo entry, with verified weights.

>>> torch.hub.list("<owner>/solo-deepfusion")
>>> backbone = torch.hub.load("<owner>/solo-deepfusion", "simclr_r18_cifar10_cpu")
>>> backbone = torch.hub.load("path/to/checkout", "simclr_r18_cifar10_cpu", source="local")

Each name is a zoo entry's with ``-`` as ``_``; the manifest (``zoo/manifest.yaml``) lists them.
Needs torch and torchvision, not solo-learn.
"""

from solo_deepfusion.hub.entrypoints import entrypoints as _entrypoints

dependencies = ["torch", "torchvision", "safetensors", "yaml", "jsonschema", "filelock"]

globals().update(_entrypoints())
