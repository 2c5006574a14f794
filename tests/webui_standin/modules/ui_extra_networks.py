"""Stand-in of modules/ui_extra_networks.py (v1.10.1): the pages of the Extra Networks tabs."""
extra_pages = []
allowed_dirs = set()


class ExtraNetworksPage:
    def __init__(self, title):
        self.title = title
        self.name = title.lower()
        self.extra_networks_tabname = self.name.replace(" ", "_")
        self.items = {}

    def refresh(self):
        pass


def register_page(page):
    extra_pages.append(page)
