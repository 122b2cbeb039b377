"""The shared configuration parser: every configuration (model, training, round, daemon,
coordinator) names a bad value by its dotted key, as one ConfigError, all problems at once."""

from pathlib import Path

import pytest

from fednca.config import ModelConfig, TrainConfig, preset
from fednca.errors import ConfigError, FedNCAError
from fednca.settings import BAD, Parser, from_mapping
from fednca_broker.config import ConfigFileError, parse_config
from fednca_broker.rounds import RoundConfig
from fednca_daemon import config as dc


def keys(err: ConfigError) -> list[str]:
    return [k for k, _ in err.problems]


@pytest.mark.parametrize(
    "data, key, why",
    [
        ({"channels": 1}, "model.channels", "needs at least 2"),
        ({"channels": "16"}, "model.channels", "must be an integer, got '16'"),
        ({"hidden": 0}, "model.hidden", "must be a positive integer, got 0"),
        ({"steps": [40]}, "model.steps", "must be a list of 2 values"),
        ({"steps": [40, "x"]}, "model.steps[1]", "must be an integer"),
        ({"kernels": [7, 4]}, "model.kernels[1]", "must be odd"),
        ({"fire_rate": 1.5}, "model.fire_rate", "must be in (0, 1]"),
        ({"perception": "full"}, "model.perception", "must be one of 'depthwise', 'dual3x3'"),
        ({"batch_norm": "yes"}, "model.batch_norm", "must be true or false"),
        ({"input_size": 65}, "model.input_size", "not divisible by pool=2"),
    ],
)
def test_a_bad_model_value_names_its_key(data, key, why):
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict(data)
    assert keys(err.value) == [key] and why in err.value.why and f"{key}: " in str(err.value)


@pytest.mark.parametrize(
    "data, key",
    [({"lr": 2}, "train.lr"), ({"lr": "fast"}, "train.lr"), ({"betas": [0.9]}, "train.betas"),
     ({"betas": [0.9, 1.5]}, "train.betas"), ({"batch_size": 0}, "train.batch_size"),
     ({"loss": "l2"}, "train.loss"), ({"local_epochs": 2.5}, "train.local_epochs")],
)
def test_a_bad_training_value_names_its_key(data, key):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict(data)
    assert keys(err.value) == [key]


@pytest.mark.parametrize(
    "data, key",
    [({"quorum_fraction": 0}, "quorum_fraction"), ({"quorum_fraction": "most"}, "quorum_fraction"),
     ({"quorum_count": 2.5}, "quorum_count"), ({"grace_s": -1}, "grace_s"), ({"round_s": 0}, "round_s")],
)
def test_a_bad_round_value_names_its_key(data, key):
    with pytest.raises(ConfigError) as err:
        RoundConfig.from_dict(data)
    assert keys(err.value) == [key] and str(err.value).startswith(f"{key}: ")


def test_independent_problems_are_all_listed_in_one_error():
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict({"channels": "x", "colour": 1, "kernels": [7, "3"], "pool": True})
    assert keys(err.value) == ["model.colour", "model.channels", "model.pool", "model.kernels[1]"]
    assert str(err.value).startswith("4 problem(s):")
    assert "model.colour: unknown field" in str(err.value)


def test_good_values_round_trip_and_lists_become_tuples():
    cfg = preset("mednca")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_dict({"steps": [3, 2]}).steps == (3, 2)
    assert from_mapping(TrainConfig, {"betas": [0.5, 0.5]}).betas == (0.5, 0.5)


def test_a_section_that_is_not_a_mapping_is_named():
    parser = Parser()
    assert parser.section(TrainConfig, {"batch_size": 8}, "train") == TrainConfig(batch_size=8)
    assert parser.section(TrainConfig, [1, 2], "train") is BAD
    assert parser.problems.items == [("train", "must be a mapping of keys, got list")]


def daemon_minimal():
    return {"site": "site-a", "federation": "fed", "broker": {"url": "mqtt://127.0.0.1:1883"},
            "data": {"folder": "/srv/data"}}


@pytest.mark.parametrize(
    "section, value, key",
    [("cpu", {"threads": 0}, "cpu.threads"), ("cpu", {"duty_cycle": "half"}, "cpu.duty_cycle"),
     ("training", {"chunk_s": 500}, "training.chunk_s"), ("training", {"delta_dtype": "int8"}, "training.delta_dtype"),
     ("gates", {"windows": "22:00-06:00"}, "gates.windows"), ("gates", {"windows": [5]}, "gates.windows[0]"),
     ("telemetry", {"interval_s": float("inf")}, "telemetry.interval_s"),
     ("data", {"folder": "/d", "phantom": {"count": 0}}, "data.phantom.count")],
)
def test_a_bad_daemon_value_names_its_key(section, value, key):
    data = daemon_minimal()
    data[section] = value
    with pytest.raises(ConfigError) as err:
        dc.parse(data, source="daemon.yaml", env={})
    assert isinstance(err.value, dc.DaemonConfigError) and keys(err.value) == [key]
    assert str(err.value).startswith("daemon.yaml: 1 problem(s):")


def coordinator(**changes):
    data = {"federation": "fed", "broker": {}, "round": {}, "model": {}, "train": {}, "mosquitto": {}}
    for section, value in changes.items():
        data[section] = value
    return data


@pytest.mark.parametrize(
    "changes, key",
    [({"round": {"grace_s": "soon"}}, "round.grace_s"), ({"round": {"max_rounds": 0}}, "round.max_rounds"),
     ({"model": {"kernels": [7, 4]}}, "model.kernels[1]"), ({"model": {"seed": -1}}, "model.seed"),
     ({"model": {"steps": [1, 2, 3]}}, "model.steps"), ({"train": {"betas": [0.5]}}, "train.betas"),
     ({"broker": {"keepalive": 0}}, "broker.keepalive"), ({"broker": {"protocol": 4}}, "broker.protocol"),
     ({"broker": {"url": "http://x"}}, "broker.url"), ({"mosquitto": {"port": 70000}}, "mosquitto.port"),
     ({"mosquitto": {"run_as_root": "no"}}, "mosquitto.run_as_root"), ({"update_dtype": "int8"}, "update_dtype"),
     ({"federation": "a b"}, "federation"), ({"aggregation": {"trim": "x"}}, "aggregation.trim")],
)
def test_a_bad_coordinator_value_names_its_key(changes, key):
    with pytest.raises(ConfigError) as err:
        parse_config(coordinator(**changes), folder=Path("/srv/fed"))
    assert isinstance(err.value, ConfigFileError) and keys(err.value) == [key]
    assert f"  {key}: " in str(err.value) and str(err.value).startswith("/srv/fed/coordinator.yaml: 1 problem(s) in the configuration:")


def test_the_coordinator_lists_problems_of_every_section_without_follow_up_errors():
    data = coordinator(round={"grace_s": -5, "max_rounds": 0}, model={"channels": "x", "seed": -1},
                       broker={"keepalive": "x", "colour": 1}, mosquitto={"port": 0})
    with pytest.raises(ConfigFileError) as err:
        parse_config(data, folder=Path("/srv/fed"))
    assert sorted(keys(err.value)) == sorted(["round.grace_s", "model.channels", "broker.colour", "broker.keepalive",
                                              "mosquitto.port", "round.max_rounds", "model.seed"])


def test_every_configuration_error_is_one_type_under_the_core_root():
    assert issubclass(dc.DaemonConfigError, ConfigError) and issubclass(ConfigFileError, ConfigError)
    assert issubclass(ConfigError, FedNCAError) and issubclass(ConfigError, ValueError)
