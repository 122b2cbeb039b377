"""The buffered asynchronous mode's keys in coordinator.yaml: read, defaulted, refused by name."""

from pathlib import Path

import pytest

from fednca_broker.config import ConfigFileError, parse_config, to_yaml_dict


def parse(round_section):
    return parse_config({"federation": "clinics", "round": round_section}, folder=Path("/tmp/fed"))


def test_the_synchronous_mode_is_the_default():
    rounds = parse({}).federation.rounds
    assert (rounds.mode, rounds.buffer_size, rounds.max_staleness) == ("sync", 3, 4)


def test_async_keys_are_read_and_written_back():
    cfg = parse({"mode": "async", "buffer_size": 2, "max_staleness": 6})
    assert (cfg.federation.rounds.mode, cfg.federation.rounds.buffer_size, cfg.federation.rounds.max_staleness) == (
        "async", 2, 6)
    written = to_yaml_dict(cfg)["round"]
    assert (written["mode"], written["buffer_size"], written["max_staleness"]) == ("async", 2, 6)


@pytest.mark.parametrize("section, key", [
    ({"mode": "buffered"}, "round.mode"),
    ({"mode": "async", "buffer_size": 0}, "round.buffer_size"),
    ({"mode": "async", "max_staleness": 5000}, "round.max_staleness"),
    ({"mode": "async", "buffer_size": "3"}, "round.buffer_size"),
])  # fmt: skip
def test_a_bad_value_is_named_by_its_key(section, key):
    with pytest.raises(ConfigFileError) as e:
        parse(section)
    assert key in str(e.value)


def test_the_demo_sets_up_an_async_federation(tmp_path):
    import argparse

    from fednca_app.commands import demo

    parser = argparse.ArgumentParser()
    demo.configure(parser)
    args = parser.parse_args(["--rounds-mode", "async", "--buffer", "2", "--sites", "3", "--quorum", "2"])
    rounds = demo.setup(args, tmp_path / "work").config().federation.rounds
    assert (rounds.mode, rounds.buffer_size) == ("async", 2)
    plain = demo.setup(parser.parse_args(["--sites", "2", "--quorum", "2"]), tmp_path / "plain")
    assert plain.config().federation.rounds.mode == "sync"


def test_the_coordinator_refuses_worker_processes_in_the_async_mode(tmp_path, capsys):
    import dataclasses

    import yaml

    from fednca.atomic import write_text
    from fednca.config import preset, train_preset
    from fednca_app.cli import main
    from fednca_app.harness import set_up
    from fednca_broker.config import CONFIG_NAME, load_config

    folder = set_up(tmp_path / "fed", federation="clinics", sites=1, rounds=1, quorum=1, url="mqtt://127.0.0.1:1883",
                    model=preset(input_size=16, steps=(3, 2)), train=train_preset(local_epochs=1), grace=0.0,
                    train_images=2, round_settings={"mode": "async"}).folder
    cfg = load_config(folder / CONFIG_NAME)
    cfg = dataclasses.replace(cfg, mosquitto=dataclasses.replace(cfg.mosquitto, workers=1))
    write_text(folder / CONFIG_NAME, yaml.safe_dump(to_yaml_dict(cfg), sort_keys=False), mode=0o640)
    assert main(["coordinator", "run", str(folder), "--workers", "1"]) == 2
    assert "round.mode async runs without worker processes" in capsys.readouterr().out
