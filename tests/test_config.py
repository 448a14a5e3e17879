"""Model configuration: presets, the original yaml reader, validation messages."""

import pytest

from anytext2_lcm.config import (ConfigError, ModelConfig, UNetConfig, VAEConfig, WriteNetConfig, from_original_yaml,
                                 preset, sd15, tiny)

DATA = __import__("pathlib").Path(__file__).parent / "data"


def test_original_sd15_yaml_reads_as_the_sd15_preset():
    cfg = from_original_yaml(DATA / "anytext2_sd15.yaml")
    assert cfg.to_dict() | {"name": "sd15"} == sd15().to_dict()


def test_fixture_yaml_with_tiny_overrides_reads_as_the_tiny_preset(tiny_fixture_dir):
    cfg = from_original_yaml(tiny_fixture_dir / "config.yaml")
    assert cfg.to_dict() | {"name": "tiny"} == tiny().to_dict()
    assert cfg.writenet.num_residuals == 7 and sd15().writenet.num_residuals == 13


def test_dict_round_trip_and_unknown_fields():
    cfg = tiny()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unet.model_chanels: unknown field"):
        ModelConfig.from_dict({"unet": {"model_chanels": 32}})
    with pytest.raises(ConfigError, match="model preset 'sd21' is unknown"):
        preset("sd21")


@pytest.mark.parametrize("build, field", [
    (lambda: UNetConfig(model_channels=30), "unet.model_channels"),
    (lambda: UNetConfig(num_res_blocks=0), "unet.num_res_blocks"),
    (lambda: UNetConfig(attention_resolutions=(3,)), "unet.attention_resolutions"),
    (lambda: UNetConfig(output_attnx_level=(7,)), "unet.output_attnx_level"),
    (lambda: UNetConfig(num_heads=7), "unet.num_heads"),
    (lambda: WriteNetConfig(glyph_scale=3), "writenet.glyph_scale"),
    (lambda: WriteNetConfig(fast_control=False), "writenet.fast_control"),
    (lambda: VAEConfig(attn_resolutions=(16,)), "vae.attn_resolutions"),
    (lambda: ModelConfig(unet=UNetConfig(model_channels=64)), "writenet.model_channels"),
    (lambda: ModelConfig(unet=UNetConfig(context_dim=16)), "unet.context_dim"),
])
def test_invalid_values_name_the_field(build, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build()


def test_unsupported_original_variants_are_refused(tmp_path, tiny_fixture_dir):
    text = (tiny_fixture_dir / "config.yaml").read_text().replace("big_linear: false", "big_linear: true")
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match="big_linear"):
        from_original_yaml(p)
    p.write_text("model: {}\n")
    with pytest.raises(ConfigError, match="model: params"):
        from_original_yaml(p)
