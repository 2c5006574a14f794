"""Captions and "Filewords": the prompt each picture is trained with.

A caption is the `.txt` file beside a picture (same stem). When a concept's
instance or class prompt contains `[filewords]`, the caption takes its place,
and the instance and class tokens are put right the way users of the
dreambooth extension (d8ahazard/sd_dreambooth_extension, `FilenameTextGetter.
create_text`) expect:

* instance prompt: a caption that names the class but not the instance gets
  the instance token before the class word ("a girl" -> "scs girl"); one that
  names the instance but not the class gets the class word after it; one that
  names neither is prefixed with "<instance> <class>, ".
* class prompt: the instance token is removed (replaced by the class word when
  the caption lacks the class word), and a caption without the class word is
  prefixed with "<class>, ", so class pictures never teach the instance token.

Prompts without `[filewords]` are used as written.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from .config import Concept
from .errors import ConfigError

log = logging.getLogger(__name__)

FILEWORDS = "[filewords]"
_FILEWORDS_RE = re.compile(re.escape(FILEWORDS), re.IGNORECASE)


def caption_path(image_path: str | Path) -> Path:
    """Where the caption of a picture lives: same folder, same stem, `.txt`."""
    return Path(image_path).with_suffix(".txt")


def read_caption(image_path: str | Path) -> str:
    """The caption `.txt` beside the picture, stripped; "" when there is none.

    UTF-8 (with or without a byte-order mark) and UTF-16 with its byte-order
    mark (Windows Notepad's "Unicode") are read. Raises ConfigError naming the
    file for any other encoding (Latin-1, ...): guessing would put wrong letters
    into the prompt. A caption that cannot be opened (no permission) is logged and read as "".
    """
    path = caption_path(image_path)
    if not path.is_file():
        return ""
    try:
        raw = path.read_bytes()
    except OSError as e:
        log.warning("Ignoring unreadable caption %s (%s)", path, e)
        return ""
    try:
        text = raw.decode("utf-16") if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: the caption is not UTF-8 (byte 0x{raw[e.start]:02x} at position {e.start}); "
                          "save it as UTF-8") from None
    return text.strip()


def uses_filewords(template: str) -> bool:
    """Whether a prompt takes each picture's caption (blank prompts do too)."""
    return not template.strip() or bool(_FILEWORDS_RE.search(template))


def build_prompt(template: str, caption: str, concept: Concept, *, is_class: bool) -> str:
    """The prompt of one picture: `template` with `[filewords]` replaced by `caption`.

    A blank template means "[filewords]" (the caption alone). Instance and class
    tokens of `concept` are handled as described in the module docstring.
    Raises nothing.
    """
    template = template.strip() or FILEWORDS
    if not _FILEWORDS_RE.search(template):
        return tidy(template)
    text = _FILEWORDS_RE.sub(lambda _: caption.strip(), template)
    instance_token, class_token = concept.instance_token.strip(), concept.class_token.strip()
    if is_class:
        text = _class_tokens(text, instance_token, class_token)
    else:
        text = _instance_tokens(text, instance_token, class_token)
    return tidy(text)


def _word(token: str) -> str:
    return rf"(?<!\w){re.escape(token)}(?!\w)"


def _has(token: str, text: str) -> bool:
    return bool(re.search(_word(token), text, flags=re.IGNORECASE))


def _instance_tokens(text: str, instance_token: str, class_token: str) -> str:
    if instance_token and class_token:
        if _has(class_token, text):
            if _has(instance_token, text):
                return text
            # "a girl" / "the girl" -> "scs girl": the article goes, as in the extension.
            pattern = rf"(?:(?<!\w)(?:a|an|the)\s+)?({_word(class_token)})"
            return re.sub(pattern, lambda m: f"{instance_token} {m.group(1)}", text, flags=re.IGNORECASE)
        if _has(instance_token, text):
            return re.sub(_word(instance_token), lambda m: f"{m.group(0)} {class_token}", text, flags=re.IGNORECASE)
        return f"{instance_token} {class_token}, {text}"
    if instance_token and not _has(instance_token, text):
        return f"{instance_token}, {text}"
    return text


def _class_tokens(text: str, instance_token: str, class_token: str) -> str:
    if instance_token and _has(instance_token, text):
        replacement = "" if not class_token or _has(class_token, text) else class_token
        text = re.sub(_word(instance_token), replacement, text, flags=re.IGNORECASE)
    if class_token and not _has(class_token, text):
        text = f"{class_token}, {text}"
    return text


def tidy(text: str) -> str:
    """One line: backslash escapes dropped, spaces collapsed, stray commas removed."""
    text = text.replace("\\", "")
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+,", ",", text)
    text = re.sub(r",(\s*,)+", ",", text)
    return text.strip(" ,")
