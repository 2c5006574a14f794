"""Stand-in of modules/paths.py (v1.10.1)."""
from modules.paths_internal import models_path, script_path, data_path, extensions_dir, extensions_builtin_dir, cwd  # noqa: F401
