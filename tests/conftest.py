"""Shared fixtures. Fixtures that start services live in their own modules and are registered here."""

import os

import torch

# Two cores on CI: keep each test process to one torch thread so parallel pieces do not fight.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

from mosquitto_fixture import mosquitto, mosquitto_factory  # noqa: E402,F401  (a real broker)
