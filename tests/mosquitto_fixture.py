"""A real mosquitto for integration tests, configured by broker/mosquitto.py under tmp_path.

``mosquitto_factory(federation=..., sites=..., observer_users=...)`` writes the broker files for those accounts
(``fednca_broker.mosquitto.write_files``) and starts :class:`fednca_app.harness.Mosquitto` on a
free 127.0.0.1 port; every one it started is stopped at teardown. ``mosquitto`` is one with the
defaults. ``restart()`` stops it cleanly (persistence saved) and starts it again on the same port;
``kill()`` is SIGKILL; ``reload()`` is SIGHUP. Tests are skipped only where the mosquitto binary
is absent.
"""

from __future__ import annotations

import os

import pytest

from fednca_app.harness import Mosquitto, free_port, mosquitto_binary
from fednca_broker.mosquitto import MosquittoSettings, write_files

MOSQUITTO = mosquitto_binary()

__all__ = ["MOSQUITTO", "RunningMosquitto", "free_port", "mosquitto", "mosquitto_factory"]


class RunningMosquitto(Mosquitto):
    """A harness mosquitto that also knows the passwords its accounts were given."""

    def __init__(self, *, settings: MosquittoSettings, passwords: dict[str, str]) -> None:
        super().__init__(settings=settings)
        self.passwords = passwords

    @property
    def federation(self) -> str:
        return self.settings.federation


@pytest.fixture
def mosquitto_factory(tmp_path):
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed")
    started: list[RunningMosquitto] = []

    def make(
        *, federation: str = "fed", sites: tuple[str, ...] = ("site-a", "site-b"), **settings
    ) -> RunningMosquitto:
        folder = tmp_path / f"mosquitto-{len(started)}"
        config = MosquittoSettings(
            federation=federation,
            folder=str(folder),
            port=free_port(),
            run_as_root=os.geteuid() == 0,
            **settings,
        )
        passwords = {config.coordinator_user: "coordinator-secret"}
        passwords.update({user: f"{user}-secret" for user in (*sites, *config.observer_users)})
        write_files(
            config,
            coordinator_password=passwords[config.coordinator_user],
            site_passwords={site: passwords[site] for site in sites},
            observer_passwords={user: passwords[user] for user in config.observer_users},
        )
        broker = RunningMosquitto(settings=config, passwords=passwords)
        broker.start()
        started.append(broker)
        return broker

    yield make
    for broker in started:
        broker.stop()


@pytest.fixture
def mosquitto(mosquitto_factory) -> RunningMosquitto:
    return mosquitto_factory()
