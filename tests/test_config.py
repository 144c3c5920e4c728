from pathlib import Path

import pytest
from pydantic import ValidationError

from ray_mgdspr.config import (
    ConfigError,
    DeploymentConfig,
    ProjectConfig,
    ResolvedServeConfig,
    load_config,
    load_preset,
    preset_names,
)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_empty_file_gives_laptop_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""))
    assert cfg == ProjectConfig()
    assert cfg.simulate.n_items == 2000 and cfg.simulate.lang == "en"


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    p = write(tmp_path, "simulate:\n  n_itemz: 10\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(f"{p}: simulate.n_itemz: unknown key")


def test_unknown_nested_key_and_wrong_type_are_both_reported(tmp_path: Path) -> None:
    p = write(tmp_path, "simulate:\n  seed: many\n  choice:\n    page_sise: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert f"{p}: simulate.seed: Input should be a valid integer" in msg and "'many'" in msg
    assert f"{p}: simulate.choice.page_sise: unknown key" in msg


def test_unknown_stage_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cfg.yaml: simulat: unknown key"):
        load_config(write(tmp_path, "simulat: {}\n"))


def test_cross_field_rule_says_how_to_fix(tmp_path: Path) -> None:
    p = write(tmp_path, "simulate:\n  choice:\n    relevant_share: 0.8\n    attractive_share: 0.5\n")
    with pytest.raises(ConfigError, match=r"relevant_share \+ choice.attractive_share must be <= 1"):
        load_config(p)


def test_a_moved_key_says_where_it_went(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cfg.yaml: optim: Value error, batch_size moved to train.batch_size"):
        load_config(write(tmp_path, "optim:\n  batch_size: 64\n"))
    assert load_config(write(tmp_path, "train:\n  batch_size: 64\n")).train.batch_size == 64


def test_serve_inherits_from_the_other_sections_in_one_place() -> None:
    """``ServeConfig.resolved`` fills what the serve section leaves unset from index and train, keeps what it
    sets, and gives a config with nothing left to default (``ResolvedServeConfig``)."""
    cfg = ProjectConfig.model_validate({"index": {"out": "ix", "nprobe": 7, "backend": "torch"},
                                        "train": {"world": "w"}, "serve": {"ef_search": 5}})
    resolved = cfg.serve.resolved(cfg)
    assert (resolved.index_root, resolved.world, resolved.backend, resolved.nprobe, resolved.ef_search) == \
        ("ix", "w", "torch", 7, 5)
    with pytest.raises(ValidationError, match="index_root"):
        ResolvedServeConfig.model_validate(cfg.serve.model_dump())


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "simulate: [\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", preset_names())
def test_presets_load(name: str) -> None:
    assert load_preset(name) == load_config(f"preset:{name}")


def test_presets_scale_up() -> None:
    sizes = [load_preset(n).simulate.n_items for n in ("demo", "small", "medium", "large")]
    assert sizes == sorted(sizes) and sizes[-1] >= 1_000_000


def test_deployment_options_carry_placement_with_and_without_autoscaling() -> None:
    from ray.serve.config import AutoscalingConfig  # Serve's own schema checks what we pass

    fixed = DeploymentConfig(min_replicas=2, max_replicas=2, resources={"worker": 0.1}, max_replicas_per_node=1)
    options = fixed.serve_options()
    assert options["num_replicas"] == 2 and options["max_replicas_per_node"] == 1
    assert options["ray_actor_options"] == {"num_cpus": 0.25, "resources": {"worker": 0.1}}
    scaled = DeploymentConfig(min_replicas=1, max_replicas=4, max_replicas_per_node=1).serve_options()
    assert scaled["max_replicas_per_node"] == 1 and "num_replicas" not in scaled
    AutoscalingConfig(**scaled["autoscaling_config"])
    assert "max_replicas_per_node" not in DeploymentConfig().serve_options()
