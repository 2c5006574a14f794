"""Stand-in of modules/shared_cmd_options.py (v1.10.1): the parsed command line.

The real parser has the web UI's flags plus those the extensions' preload.py
files add; the built-in Lora's preload adds --lora-dir. Tests set flags through
WEBUI_STANDIN_ARGS (e.g. "--ckpt-dir /x --lora-dir /y").
"""
import argparse
import os
import shlex

from modules.paths_internal import models_path, normalized_filepath, sd_model_file

parser = argparse.ArgumentParser()
parser.add_argument("--models-dir", type=normalized_filepath, default=None)
parser.add_argument("--ckpt", type=normalized_filepath, default=sd_model_file)
parser.add_argument("--ckpt-dir", type=normalized_filepath, default=None)
parser.add_argument("--no-download-sd-model", action='store_true', default=False)
parser.add_argument("--freeze-settings", action='store_true', default=False)
parser.add_argument("--lowvram", action='store_true')
parser.add_argument("--medvram", action='store_true')
# extensions-builtin/Lora/preload.py
parser.add_argument("--lora-dir", type=normalized_filepath, default=os.path.join(models_path, 'Lora'))

cmd_opts = parser.parse_args(shlex.split(os.environ.get("WEBUI_STANDIN_ARGS", "")))
