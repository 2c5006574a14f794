"""Stand-in of modules/shared.py (v1.10.1): cmd_opts, opts, state and sd_model.

In the real web UI `opts` and `state` are assigned during start-up
(modules/initialize.py); the stand-in assigns them at import. `sd_model` is a
module property that loads the selected checkpoint on first access, as in
modules/shared_items.py `Shared`.
"""
import sys

from modules import options, shared_cmd_options, shared_state
from modules.paths_internal import models_path, script_path, data_path, sd_configs_path, sd_default_config, sd_model_file, default_sd_model_file, extensions_dir, extensions_builtin_dir  # noqa: F401

cmd_opts = shared_cmd_options.cmd_opts
parser = shared_cmd_options.parser

options_section = options.options_section
OptionInfo = options.OptionInfo

options_templates = options_section(('sd', "Stable Diffusion", "sd"), {
    "sd_model_checkpoint": OptionInfo(None, "Stable Diffusion checkpoint"),
    "sd_checkpoint_cache": OptionInfo(0, "Checkpoints to cache in RAM"),
})
restricted_opts = set()

opts = options.Options(options_templates, restricted_opts)
state = shared_state.State()
device = "cpu"
demo = None
settings_components = None
tab_names = []


class Shared(sys.modules[__name__].__class__):
    """sd_model as a property: reading it loads a model when none was loaded yet."""

    @property
    def sd_model(self):
        import modules.sd_models

        return modules.sd_models.model_data.get_sd_model()

    @sd_model.setter
    def sd_model(self, value):
        import modules.sd_models

        modules.sd_models.model_data.set_sd_model(value)


sys.modules[__name__].__class__ = Shared
