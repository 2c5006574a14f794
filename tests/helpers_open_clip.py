"""Stand-in of open_clip 2.20.0 (the web UI v1.10.1's pin): only its registry of architecture configs
(open_clip/factory.py `add_model_config`, `get_model_config`, `list_models`, copied), without the
architectures it ships. The web UI's SDXL loader builds its second text encoder from such a config's name.
A test puts it into sys.modules as `open_clip`; it is not on the stand-in's path, where it would hide the
real package's files (lora_trainer.tokenizer reads open_clip's BPE vocabulary from them)."""
import json
import re
from copy import deepcopy
from pathlib import Path

_MODEL_CONFIG_PATHS = []
_MODEL_CONFIGS = {}
added = []  # the paths add_model_config was given


def _natural_key(string_):
    return [int(s) if s.isdigit() else s for s in re.split(r'(\d+)', string_.lower())]


def _rescan_model_configs():
    global _MODEL_CONFIGS
    config_files = []
    for config_path in _MODEL_CONFIG_PATHS:
        if config_path.is_file() and config_path.suffix == '.json':
            config_files.append(config_path)
        elif config_path.is_dir():
            config_files.extend(config_path.glob('*.json'))
    for cf in config_files:
        with open(cf, 'r') as f:
            model_cfg = json.load(f)
            if all(a in model_cfg for a in ('embed_dim', 'vision_cfg', 'text_cfg')):
                _MODEL_CONFIGS[cf.stem] = model_cfg
    _MODEL_CONFIGS = {k: v for k, v in sorted(_MODEL_CONFIGS.items(), key=lambda x: _natural_key(x[0]))}


def list_models():
    return list(_MODEL_CONFIGS.keys())


def add_model_config(path):
    added.append(str(path))
    if not isinstance(path, Path):
        path = Path(path)
    _MODEL_CONFIG_PATHS.append(path)
    _rescan_model_configs()


def get_model_config(model_name):
    if model_name in _MODEL_CONFIGS:
        return deepcopy(_MODEL_CONFIGS[model_name])
    return None
