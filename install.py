"""Run by the web UI at every launch: installs only what is missing, never changes what is installed.

The web UI runs this file with its own Python and its folder on PYTHONPATH, so
`launch.is_installed` / `launch.run_pip` are the host's. What is decided and
why: lora_trainer/installer.py; supported hosts: docs/hosts.md.
"""
import os
import sys
from pathlib import Path

import launch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from lora_trainer import installer  # noqa: E402  (needs the extension folder on sys.path)

installer.run(launch, HERE / installer.STATE_FILE, environ=os.environ)
