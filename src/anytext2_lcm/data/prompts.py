"""Prompt and caption text: quoted lines -> placeholders, the training text caption, caption truncation.

``*`` is AnyText2's placeholder: the text encoder replaces each whitespace-delimited ``*`` token with the next line
embedding (see DESIGN trap 6: ``*,`` or ``*.`` are other CLIP tokens and get no embedding).
"""

from __future__ import annotations

import logging
import re

import numpy as np

log = logging.getLogger(__name__)

PLACEHOLDER = "*"

TEXT_CAPTION_PHRASES = (
    "Text says ",
    "Image with words ",
    "The picture reads ",
    "Captions are ",
    "Texts are ",
    "Text:  ",  # the original's list lacks a comma after 'Text: ', which fuses it with the next entry ' '
)
"""Openings of the training text caption, as the original samples them (six entries)."""


def parse_prompt_lines(prompt: str, max_chars: int = 20, pad_placeholder: bool = False) -> tuple[str, list[str]]:
    """Split a text prompt into the prompt with placeholders and the quoted lines.

    As the original ``modify_prompt``: curly quotes become ``"``; every ``"..."`` span is a line, and its first
    occurrence in the prompt is replaced by ``*`` (``pad_placeholder=True``: by ``" * "``, which keeps the
    placeholder a separate token before punctuation). No quoted span gives the single line ``[' ']``. Lines longer
    than ``max_chars`` are cut (with a warning), as the original did before rendering.

    Returns:
        (prompt with placeholders, lines)
    """
    prompt = prompt.replace("\u201c", '"').replace("\u201d", '"')
    texts = re.findall('"(.*?)"', prompt)
    if not texts:
        return prompt, [" "]
    repl = f" {PLACEHOLDER} " if pad_placeholder else PLACEHOLDER
    for t in texts:
        prompt = prompt.replace(f'"{t}"', repl, 1)
    out = []
    for t in texts:
        if len(t) > max_chars:
            log.warning("line %r is longer than max_chars=%d and is cut to %r", t, max_chars, t[:max_chars])
        out.append(t[:max_chars])
    return prompt, out


def build_text_caption(n_lines: int, rng: np.random.Generator | None = None, phrase: str | None = None) -> str:
    """The training text caption: a random opening + ``" , ".join(["*"] * n_lines) + " . "``.

    ``rng`` picks the opening from :data:`TEXT_CAPTION_PHRASES` (``phrase`` overrides; neither: the first).
    """
    if phrase is None:
        phrase = TEXT_CAPTION_PHRASES[int(rng.integers(len(TEXT_CAPTION_PHRASES)))] if rng is not None \
            else TEXT_CAPTION_PHRASES[0]
    return phrase + " , ".join([PLACEHOLDER] * n_lines) + " . "


def watermark_caption(caption: str, wm_score: float | None, cap_watermark: bool = True) -> str:
    """Caption as loaded: " with watermarks " / " no watermarks " appended (when a score exists), ``*`` -> space."""
    if wm_score is not None and cap_watermark:
        caption += " with watermarks " if wm_score > 0.5 else " no watermarks "
    return caption.replace(PLACEHOLDER, " ")


def truncate_caption(caption: str, max_words: int, rng: np.random.Generator) -> str:
    """The original ``truncate_string``: cap a long caption at ``max_words`` words.

    The first 500 characters are kept; a caption of at most ``max_words`` words is returned as is. Otherwise the
    first sentence (split on '.') is kept (cut to ``max_words`` words if it alone is longer), then sentences drawn at
    random from the rest are appended until the word budget is reached (the last one cut and closed by '.').
    """
    caption = caption[:500]  # long repeated CJK captions would otherwise blow up the tokenizer's work
    if len(caption.split()) <= max_words:
        return caption
    sentences = caption.split(".")
    first = sentences[0].strip()
    rest = sentences[1:]
    out = first
    count = len(first.split())
    if count >= max_words:
        return " ".join(first.split()[:max_words])
    while count < max_words and rest:
        words = rest.pop(int(rng.integers(len(rest)))).strip().split()
        if count + len(words) > max_words:
            words = words[:max_words - count] + ["."]
        if words:
            out += ". " + " ".join(words)
            count += len(words)
    return out
