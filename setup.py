"""Build hook: the wheel carries the zoo's manifest, its schema and the model cards.

``zoo/`` stays their one source. ``build_py`` copies them into ``solo_deepfusion/hub/zoo/`` of
the build (not the weights: a wheel's zoo downloads them from the manifest's mirrors), where
:mod:`solo_deepfusion.hub.manifest` finds them outside a checkout. Everything else is in
``pyproject.toml``.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ZOO = Path(__file__).resolve().parent / "zoo"
SHIPPED = ("manifest.yaml", "manifest.schema.json", "cards")


class BuildPyWithZoo(build_py):
    """``build_py``, then the zoo's manifest, schema and cards into the package."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the checkout's zoo/ itself
            return
        target = Path(self.build_lib) / "solo_deepfusion" / "hub" / "zoo"
        target.mkdir(parents=True, exist_ok=True)
        for name in SHIPPED:
            source = ZOO / name
            if source.is_dir():
                shutil.copytree(source, target / name, dirs_exist_ok=True)
            else:
                shutil.copy2(source, target / name)


setup(cmdclass={"build_py": BuildPyWithZoo})
