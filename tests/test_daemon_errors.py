"""One exception root for the daemon, with names of its own."""

import importlib
import inspect

import pytest

from fednca.errors import FedNCAError
from fednca_daemon.errors import DaemonError

MODULES = ("budget", "coordinator_inbox", "errors", "gates", "lifecycle", "lifecycle_vocab", "outbox", "sensors",
           "service", "shell_events", "submission", "supervisor", "telemetry", "trainer_protocol", "workerproc")


@pytest.mark.parametrize("name", MODULES)
def test_every_error_the_daemon_defines_sits_under_daemon_error(name):
    module = importlib.import_module(f"fednca_daemon.{name}")
    for _, cls in inspect.getmembers(module, inspect.isclass):
        if issubclass(cls, Exception) and cls.__module__.startswith("fednca_daemon"):
            assert issubclass(cls, DaemonError) and issubclass(cls, FedNCAError), cls


def test_the_daemons_error_names_differ_from_the_round_policys():
    broker_names = {n for n, c in inspect.getmembers(importlib.import_module("fednca_broker.rounds"), inspect.isclass)
                    if issubclass(c, Exception)}
    daemon_names = {n for n, c in inspect.getmembers(importlib.import_module("fednca_daemon.errors"), inspect.isclass)
                    if issubclass(c, Exception) and c.__module__ == "fednca_daemon.errors"}
    assert daemon_names and not daemon_names & broker_names
