"""Config loading: every shipped config validates; unknown keys and bad values fail naming the key and file."""

from __future__ import annotations

import pytest

from ssjdn.config import (
    ConfigError,
    apply_overrides,
    available_configs,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_override,
)


def test_shipped_configs_load_and_round_trip():
    names = available_configs()
    assert {"ucm", "sydney", "rsicd", "rsitmd", "cpu-small", "tiny"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.name == name
        assert config_from_dict(config_to_dict(cfg)) == cfg


def test_base_inheritance_and_defaults():
    ucm, rsicd = load_config("ucm"), load_config("rsicd")
    assert rsicd.train.epochs == 30 and ucm.train.epochs == 50
    assert rsicd.model == ucm.model  # inherited unchanged
    assert ucm.model.image.depths == [3, 4, 6, 3] and ucm.model.image.pretrained


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("base: tiny\nmodel:\n  bsdd: true\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "model.bsdd" in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("loss: {name: hinge}", "loss.name"),
        ("loss: {variant: all}", "loss.variant"),
        ("model: {bsd: maybe}", "model.bsd"),
        ("train: {batch_size: 1}", "batch_size"),
        ("model: {image: {depths: 3}}", "model.image.depths"),
        ("model: {lsd: false}\nloss: {stl: {agreement: posterior}}", "agreement"),
        ("[1, 2]", "mapping"),
    ],
)
def test_bad_values_are_clear(tmp_path, text, fragment):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        load_config(path)


def test_overrides_dotted_and_nested():
    cfg = load_config("tiny", {"model.bsd": False, "loss": {"name": "triplet"}, "train.batch_size": "16"})
    assert cfg.model.bsd is False and cfg.loss.name == "triplet" and cfg.train.batch_size == 16
    assert cfg.model.lsd is True  # untouched siblings keep their values
    with pytest.raises(ConfigError, match="model.nope"):
        load_config("tiny", {"model.nope": 1})
    again = apply_overrides(cfg, {"loss.variant": "sum"})
    assert again.loss.variant == "sum" and cfg.loss.variant == "hardest"


def test_unknown_name_lists_available():
    with pytest.raises(ConfigError, match="cpu-small"):
        load_config("no-such-config")


def test_parse_override_uses_yaml_values():
    assert parse_override("model.bsd=false") == ("model.bsd", False)
    assert parse_override("model.image.depths=[1, 2]") == ("model.image.depths", [1, 2])
    with pytest.raises(ConfigError):
        parse_override("model.bsd")


def test_bsd_variant_keys_default_to_the_original_bsd():
    cfg = load_config("cpu-small")
    b = cfg.model.bsd_cfg
    assert (b.direction, b.suppression, b.fusion, b.scale_loss_weight) == ("chain", "spatial", "concat", 0.0)
    cfg = load_config(
        "cpu-small",
        {
            "model.bsd_cfg.direction": "parallel",
            "model.bsd_cfg.suppression": "content",
            "model.bsd_cfg.fusion": "gate",
            "model.bsd_cfg.scale_loss_weight": 0.5,
            "loss.name": "stl_nce",
        },
    )
    assert cfg.model.bsd_cfg.fusion == "gate" and cfg.loss.name == "stl_nce"
    with pytest.raises(ConfigError, match="posterior"):
        load_config(
            "cpu-small", {"loss.name": "stl_nce", "model.lsd": False, "loss.stl.agreement": "posterior"}
        )
