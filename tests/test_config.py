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
        ("algorithm.name=mamal", "algorithm.name='mamal'"),
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
        ("algorithm.inner_lr=nan", "algorithm.inner_lr=nan must be a finite number > 0"),
        ("algorithm.inner_lr=inf", "algorithm.inner_lr=inf must be a finite number > 0"),
        ("algorithm.outer_lr=inf", "algorithm.outer_lr=inf must be a finite number > 0"),
        ("algorithm.test_inner_steps=0", "algorithm.test_inner_steps=0 must be >= 1"),
        ("algorithm.test_inner_batch=-2", "algorithm.test_inner_batch=-2 must be >= 0"),
        ("data.queries=0", "data.queries=0 must be >= 1"),
        ("train.log_every=0", "train.log_every=0 must be >= 1"),
        ("train.val_episodes=0", "train.val_episodes=0 must be >= 1"),
        ("ray.actor_cpus=0", "ray.actor_cpus=0.0 must be a finite number > 0"),
        ("ray.cpus_per_worker=-1", "ray.cpus_per_worker=-1.0 must be a finite number >= 0"),
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


@pytest.mark.parametrize("text, message", [
    ("name: x\ntracking:\n  run_name: ${oc.env:HOME}\n",
     r"tracking.run_name uses a resolver \(\$\{oc.env:...\}\)"),
    ("name: x\ndata:\n  dataset: ${oc.decode:'data'}\n", r"data.dataset uses a resolver"),
    ("name: [x\n", r"not a readable YAML file \(.* at line 2, column 1\)"),
    ("a: !!python/object/apply:os.system ['touch {marker}']\n",
     r"not a readable YAML file \(could not determine a constructor"),
    ("- a\n- b\n", "a config is a mapping of keys, not a ListConfig"),
    ("\xff\xfe\x00", "not a readable YAML file"),
])
def test_a_config_file_that_is_no_plain_mapping_is_refused(tmp_path, text, message):
    marker = tmp_path / "ran"
    path = tmp_path / "bad.yaml"
    path.write_bytes(text.replace("{marker}", str(marker)).encode("latin-1"))
    with pytest.raises(ConfigError, match=message) as raised:
        load_config(path)
    assert str(raised.value).startswith(f"{path}: ")
    assert not marker.exists()  # no Python object was built


def test_overrides_may_not_read_the_environment_and_key_interpolation_still_works(tmp_path):
    with pytest.raises(ConfigError, match="command-line overrides.*tracking.run_name uses a "
                                          "resolver"):
        load_config(CONFIGS[0], ["tracking.run_name=${oc.env:HOME}"])
    with pytest.raises(ConfigError, match="config: tracking.run_name uses a resolver"):
        config_from_dict({"name": "x", "tracking": {"run_name": "${oc.env:HOME}"}})
    cfg = load_config(CONFIGS[0], ["tracking.run_name=${name}-a"])
    assert cfg.tracking.run_name == f"{cfg.name}-a"


@pytest.mark.parametrize("override, shown", [
    ("tracking.tracking_uri=http://alice:s3cr3t@127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("tracking.tracking_uri=http://alice@127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("data.dataset=s3://bucket/omniglot?region=x&secret_key=s3cr3t", "s3://bucket/omniglot"),
    ("ray.address=ray://tok:s3cr3t@head:10001", "ray://head:10001"),
])
def test_a_uri_with_credentials_is_refused_without_showing_them(override, shown):
    with pytest.raises(ConfigError) as raised:
        load_config(CONFIGS[0], [override])
    message = str(raised.value)
    assert f"{override.split('=')[0]}={shown}..." in message and "carries credentials" in message
    assert "s3cr3t" not in message and "alice" not in message
