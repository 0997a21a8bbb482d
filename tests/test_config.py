"""Config validation: one clear line naming the field and what is allowed."""

import copy

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from treeffn.config import ConfigError, validate_train_config


@pytest.fixture(scope="module")
def base_cfg():
    with initialize_config_module("treeffn.conf", version_base="1.3"):
        cfg = compose("config", overrides=["data.cache_dir=/tmp/unused"])
    return OmegaConf.to_container(cfg, resolve=True)


def test_defaults_are_valid(base_cfg):
    validate_train_config(base_cfg)
    assert base_cfg["tree"]["depth"] == 6 and base_cfg["model"]["name"] == "tiny"


@pytest.mark.parametrize("section, key, value, fragment", [
    ("tree", "depth", -1, "tree.depth=-1"),
    ("tree", "depth", 99, "tree.depth=99"),
    ("tree", "depth", 2.5, "tree.depth=2.5"),
    ("tree", "trees", 0, "tree.trees=0"),
    ("tree", "placement", "middle", "tree.placement='middle'"),
    ("tree", "activation", "swish2", "tree.activation='swish2'"),
    ("tree", "impl", "fortran", "tree.impl='fortran'"),
    ("tree", "ffn", "moe", "tree.ffn='moe'"),
    ("data", "block_size", 100000, "data.block_size=100000"),
    ("data", "batch_size", 0, "data.batch_size=0"),
    ("data", "source", "ftp", "data.source='ftp'"),
    ("optim", "lr", -1.0, "optim.lr=-1.0"),
    ("trainer", "max_steps", 0, "trainer.max_steps=0"),
])
def test_bad_values_fail_with_one_line(base_cfg, section, key, value, fragment):
    cfg = copy.deepcopy(base_cfg)
    cfg[section][key] = value
    with pytest.raises(ConfigError) as err:
        validate_train_config(cfg)
    message = str(err.value)
    assert fragment in message and "\n" not in message


def test_depth_too_large_for_memory_names_the_memory(base_cfg):
    cfg = copy.deepcopy(base_cfg)
    cfg["model"].update(hidden_size=4096, num_attention_heads=32)
    cfg["tree"].update(depth=20, trees=64)
    with pytest.raises(ConfigError, match="more than this machine's"):
        validate_train_config(cfg)


def test_files_source_needs_a_path(base_cfg):
    cfg = copy.deepcopy(base_cfg)
    cfg["data"].update(source="files", path="???")
    with pytest.raises(ConfigError, match="data.path is missing"):
        validate_train_config(cfg)


def test_resume_values(base_cfg):
    cfg = copy.deepcopy(base_cfg)
    cfg["resume"] = "sometimes"
    with pytest.raises(ConfigError, match="resume='sometimes'"):
        validate_train_config(cfg)
