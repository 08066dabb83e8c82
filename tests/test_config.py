from pathlib import Path

import pytest

from metadist.config import ConfigError, config_from_dict, flatten, load_config, to_dict

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert config_from_dict(to_dict(cfg)) == cfg


def test_overrides_are_typed_and_win_over_the_file():
    cfg = load_config(CONFIGS[0], ["algorithm.inner_lr=0.05", "train.steps=7"])
    assert cfg.algorithm.inner_lr == 0.05 and cfg.train.steps == 7
    assert flatten(cfg)["algorithm.inner_lr"] == 0.05


@pytest.mark.parametrize(
    "override, message",
    [
        ("algorithm.inner_lr=fast", "algorithm.inner_lr"),
        ("algorithm.nope=1", "nope"),
        ("algorithm.name=protonet", "algorithm.name='protonet'"),
        ("data.ways=0", "data.ways=0"),
        ("train.steps", "key=value"),
        ("data.train_shots=0", "data.train_shots=0 must be >= 1"),
        ("algorithm.inner_batch=-1", "algorithm.inner_batch=-1 must be >= 0"),
        ("algorithm.inner_optimizer=rmsprop", "algorithm.inner_optimizer='rmsprop'"),
        ("algorithm.inner_optimizer=adam", "inner_optimizer='adam' needs a first-order"),
        ("algorithm.inner_betas=[0.9]", "algorithm.inner_betas=[0.9]"),
        ("algorithm.inner_state=shared", "algorithm.inner_state='shared'"),
        ("algorithm.inner_state=carried", "algorithm.inner_state='carried' carries the inner"),
        ("algorithm.outer_lr_final=1.0", "algorithm.outer_lr_final=1.0 must lie in"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(CONFIGS[0], [override])


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ntrain:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match="bad.yaml.*stepz"):
        load_config(path)


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/does-not-exist.yaml")
