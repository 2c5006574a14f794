"""Stand-in of modules/sd_models.py (v1.10.1): the checkpoint list and the loaded model.

A "model" here is `StandinModel`, which only remembers its device. Calls the
extension makes are recorded in webui_standin_calls.
"""
import os
import threading

import webui_standin_calls
from modules import hashes, paths, shared

model_dir = "Stable-diffusion"
model_path = os.path.abspath(os.path.join(paths.models_path, model_dir))

checkpoints_list = {}
checkpoint_aliases = {}


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        abspath = os.path.abspath(filename)
        abs_ckpt_dir = os.path.abspath(shared.cmd_opts.ckpt_dir) if shared.cmd_opts.ckpt_dir is not None else None
        if abs_ckpt_dir and abspath.startswith(abs_ckpt_dir):
            name = abspath.replace(abs_ckpt_dir, '')
        elif abspath.startswith(model_path):
            name = abspath.replace(model_path, '')
        else:
            name = os.path.basename(filename)
        if name.startswith("\\") or name.startswith("/"):
            name = name[1:]
        self.name = name
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0]
        self.sha256 = hashes.sha256_from_cache(self.filename, f"checkpoint/{name}")
        self.shorthash = self.sha256[0:10] if self.sha256 else None
        self.title = name if self.shorthash is None else f'{name} [{self.shorthash}]'
        self.short_title = self.name_for_extra if self.shorthash is None else f'{self.name_for_extra} [{self.shorthash}]'
        self.ids = [self.model_name, self.title, name, self.name_for_extra]

    def register(self):
        checkpoints_list[self.title] = self
        for id in self.ids:
            checkpoint_aliases[id] = self


def _checkpoint_files():
    folders = [model_path] + ([shared.cmd_opts.ckpt_dir] if shared.cmd_opts.ckpt_dir else [])
    for folder in folders:
        for root, _dirs, files in os.walk(folder):
            for f in sorted(files):
                if os.path.splitext(f)[1].lower() in (".ckpt", ".safetensors") and not f.endswith((".vae.ckpt", ".vae.safetensors")):
                    yield os.path.join(root, f)


def list_models():
    webui_standin_calls.record("sd_models.list_models")
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    for filename in _checkpoint_files():
        CheckpointInfo(filename).register()


def select_checkpoint():
    info = checkpoint_aliases.get(shared.opts.sd_model_checkpoint)
    if info is not None:
        return info
    if not checkpoints_list:
        raise FileNotFoundError("No checkpoints found.")
    return next(iter(checkpoints_list.values()))


class StandinModel:
    """What the web UI keeps in model_data.sd_model, reduced to where it lives."""

    lowvram = False

    def __init__(self, checkpoint_info):
        self.sd_checkpoint_info = checkpoint_info
        self.sd_model_checkpoint = checkpoint_info.filename
        self.device = "cuda"

    def to(self, device):
        self.device = str(device)
        return self


class SdModelData:
    def __init__(self):
        self.sd_model = None
        self.loaded_sd_models = []
        self.was_loaded_at_least_once = False
        self.lock = threading.Lock()

    def get_sd_model(self):
        if self.was_loaded_at_least_once:
            return self.sd_model
        if self.sd_model is None:
            with self.lock:
                if self.sd_model is not None or self.was_loaded_at_least_once:
                    return self.sd_model
                load_model()
        return self.sd_model

    def set_sd_model(self, v, already_loaded=False):
        self.sd_model = v
        try:
            self.loaded_sd_models.remove(v)
        except ValueError:
            pass
        if v is not None:
            self.loaded_sd_models.insert(0, v)


model_data = SdModelData()


def load_model(checkpoint_info=None, already_loaded_state_dict=None):
    webui_standin_calls.record("sd_models.load_model")
    model = StandinModel(checkpoint_info or select_checkpoint())
    model_data.set_sd_model(model)
    model_data.was_loaded_at_least_once = True
    return model


def send_model_to_cpu(m):
    webui_standin_calls.record("sd_models.send_model_to_cpu")
    if m is not None:
        m.to("cpu")


def send_model_to_device(m):
    webui_standin_calls.record("sd_models.send_model_to_device")
    m.to(shared.device if shared.device != "cpu" else "cuda")


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    webui_standin_calls.record("sd_models.reload_model_weights")
    checkpoint_info = info or select_checkpoint()
    if not sd_model:
        sd_model = model_data.sd_model
    if sd_model is not None and sd_model.sd_model_checkpoint == checkpoint_info.filename and not forced_reload:
        return sd_model
    return load_model(checkpoint_info)


def unload_model_weights(sd_model=None, info=None):
    webui_standin_calls.record("sd_models.unload_model_weights")
    send_model_to_cpu(sd_model or shared.sd_model)
    return sd_model
