"""Stand-in of modules/paths_internal.py (v1.10.1): the folders the web UI uses.

The real module reads --data-dir / --models-dir from sys.argv; the stand-in takes
them from WEBUI_STANDIN_ROOT so each test gets its own folder.
"""
import os
from pathlib import Path

normalized_filepath = lambda filepath: str(Path(filepath).absolute())  # noqa: E731

cwd = os.getcwd()
modules_path = os.path.dirname(os.path.realpath(__file__))
script_path = os.environ.get("WEBUI_STANDIN_ROOT", os.path.dirname(modules_path))
data_path = script_path
models_path = os.path.join(data_path, "models")
extensions_dir = os.path.join(data_path, "extensions")
extensions_builtin_dir = os.path.join(script_path, "extensions-builtin")
sd_configs_path = os.path.join(script_path, "configs")
sd_default_config = os.path.join(sd_configs_path, "v1-inference.yaml")
sd_model_file = os.path.join(script_path, "model.ckpt")
default_sd_model_file = sd_model_file
