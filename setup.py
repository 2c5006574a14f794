"""Packaging hook beside pyproject.toml (which holds everything else).

The standalone app serves the extension's style.css and javascript/, which
live at the top of the folder where the web UI expects them, outside the
package. A wheel carries copies of them in lora_trainer/web/; an editable
install and the clone read the originals (lora_trainer/cli/ui.py looks there first).
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
WEB_FILES = ["style.css", *(f"javascript/{p.name}" for p in sorted((ROOT / "javascript").glob("*.js")))]


class BuildPyWithWebFiles(build_py):
    def run(self):
        super().run()
        if self.editable_mode:
            return
        for name in WEB_FILES:
            target = Path(self.build_lib) / "lora_trainer" / "web" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / name, target)


setup(cmdclass={"build_py": BuildPyWithWebFiles})
