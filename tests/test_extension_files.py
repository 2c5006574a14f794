"""The files the web UI reads besides Python: metadata.ini, the extensions index entry, javascript/, style.css."""
from __future__ import annotations

import configparser
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREFIX = "lora_trainer_"


def test_metadata_ini_names_the_extension():
    config = configparser.ConfigParser()
    assert config.read(REPO / "metadata.ini", encoding="utf-8")
    assert config.get("Extension", "Name") == "lora_trainer"


def test_index_entry_has_what_extensions_available_lists():
    entry = json.loads((REPO / "extension-index-entry.json").read_text(encoding="utf-8"))
    assert set(entry) >= {"name", "url", "description", "tags"}
    assert {"training", "tab"} <= set(entry["tags"])
    assert entry["url"].startswith("https://") and entry["url"].endswith(".git")
    assert len(entry["description"]) > 40


def css_selectors(text: str) -> list[str]:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return [sel.strip() for block in re.findall(r"([^{}]+)\{", text) for sel in block.split(",") if sel.strip()]


def test_style_css_rules_apply_only_inside_our_elements():
    """Each selector starts at one of our ids or classes, so no rule reaches the host's own elements."""
    selectors = css_selectors((REPO / "style.css").read_text(encoding="utf-8"))
    assert selectors, "style.css has no rule"
    assert [s for s in selectors if not re.match(r"[#.]lora_trainer_", s)] == []


def js_ids(text: str) -> set[str]:
    """Ids the script looks up: string literals that are used as element ids."""
    return set(re.findall(r"\"(lora_trainer_[\w]+)\"", text)) | set(re.findall(r"getElementById\(\"([^\"]+)\"\)", text))


def test_javascript_uses_only_our_ids_and_defines_no_globals():
    text = (REPO / "javascript" / "lora_trainer.js").read_text(encoding="utf-8")
    ids = js_ids(text)
    assert ids and all(i.startswith(PREFIX) for i in ids)
    assert sorted(re.findall(r"querySelector\(\"#(?!\" \+)([^\"]+)\"", text)) == []  # no fixed host ids
    # Everything inside one function expression: the host page's globals stay as they were.
    code = re.sub(r"^\s*//.*$", "", text, flags=re.M).strip()
    assert code.startswith("(function () {") and code.endswith("})();")
