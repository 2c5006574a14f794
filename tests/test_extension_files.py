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


def css_names(text: str) -> set[str]:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    selectors = " ".join(re.findall(r"([^{}]+)\{", text))
    return set(re.findall(r"[#.]([A-Za-z_][\w-]*)", selectors))


def test_style_css_touches_only_our_ids_and_classes():
    names = css_names((REPO / "style.css").read_text(encoding="utf-8"))
    assert names, "style.css has no id or class selector"
    assert sorted(n for n in names if not n.startswith(PREFIX)) == []


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
