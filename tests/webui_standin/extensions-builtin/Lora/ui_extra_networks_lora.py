"""Stand-in of extensions-builtin/Lora/ui_extra_networks_lora.py (v1.10.1)."""
import networks
from modules import ui_extra_networks


class ExtraNetworksPageLora(ui_extra_networks.ExtraNetworksPage):
    def __init__(self):
        super().__init__('Lora')

    def refresh(self):
        networks.list_available_networks()
