"""Why a sample was skipped: the reasons, the record the dataset returns, and the errors that stop a run."""

from __future__ import annotations

from dataclasses import dataclass

SKIP_REASONS: dict[str, str] = {
    "malformed_row": "a row or annotation is not an object, or lacks a required field (a truncated row)",
    "bad_field_type": "a field has the wrong type (e.g. non-string text, caption, language or img_name; "
                      "non-numeric polygon or colour)",
    "path_outside_root": "img_name is an absolute path (without data.allow_absolute_paths) or climbs out of data_root "
                         "with '..'",
    "image_missing": "the image file does not exist",
    "image_unreadable": "the image file cannot be decoded (corrupt, truncated, not an image)",
    "image_size": "the image size is absurd (too small, too large, or too elongated)",
    "polygon_degenerate": "a text polygon has < 3 finite points or is too thin to hold text",
    "polygon_outside": "a text polygon lies outside the image",
    "empty_text": "a valid line has no text",
    "unrenderable_text": "no available font has glyphs for every character of a line",
    "processing_error": "an unexpected error while processing the sample (logged with its traceback)",
}
"""Every reason a sample can be skipped for, with its meaning."""


@dataclass(frozen=True)
class SkipRecord:
    """What the dataset returns instead of a sample it cannot use. The collate function drops and counts these.

    Attributes:
        index: dataset index of the row.
        reason: one of :data:`SKIP_REASONS`.
        detail: what exactly was wrong (file path, field, characters, ...).
        source: ``file.json:row N`` (row N of that file's ``data_list``, counting from 0).
    """

    index: int
    reason: str
    detail: str
    source: str = ""

    def __post_init__(self) -> None:
        if self.reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {self.reason!r}")

    def __str__(self) -> str:
        return f"{self.source or f'index {self.index}'}: {self.reason}: {self.detail}"


class SampleError(Exception):
    """Raised inside sample processing to skip the sample with a reason."""

    def __init__(self, reason: str, detail: str):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class DataFileError(ValueError):
    """A whole annotation file is unusable (not JSON, wrong structure). The message names the file (and line)."""


class TooManySkipsError(RuntimeError):
    """More samples were skipped than ``max_skip_rate`` allows: the run stops with the counts and examples."""
