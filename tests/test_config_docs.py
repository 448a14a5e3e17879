"""docs/config.md is generated from the config dataclasses and must be up to date."""

from pathlib import Path

from anytext2_lcm.config_docs import render, undocumented

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_every_config_field_has_a_docstring():
    assert undocumented() == []


def test_config_reference_is_up_to_date():
    assert DOC.is_file(), "docs/config.md is missing: run 'anytext2-lcm config-docs'"
    assert DOC.read_text(encoding="utf-8") == render(), \
        "docs/config.md is stale: run 'anytext2-lcm config-docs' and commit the result"


def test_reference_lists_fields_with_type_default_and_meaning():
    text = render()
    assert "| `train.max_steps` |" in text and "| `unet.model_channels` | `int` | `320` |" in text
    assert "| `guidance_scale` | `float` | `7.5` |" in text
    assert "| `cfg_scale` | `float \\| None` | `None` |" in text  # a union's bar is escaped inside the table
