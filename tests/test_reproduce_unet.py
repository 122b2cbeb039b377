"""The federated UNet baselines of ``fednca reproduce``: real site processes, real messages, and the
bytes each uplink layout costs (app/reproduce/unet_arm.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("unet")

from fednca_app.reproduce.methods import FEDAVG, SMALL, Method, quick_plan  # noqa: E402
from fednca_app.reproduce.unet_arm import build_unet, run_unet, shapes, site_test_sets, weights  # noqa: E402
from fednca.aggregate import aggregate  # noqa: E402
from fednca.wire_large import Uplink  # noqa: E402

N_SMALL = 573_249
ENVELOPE = 16 + 48 + 64  # prefix, seal, signature


def test_the_two_unet_widths_have_the_documented_parameter_counts():
    small = build_unet(SMALL, seed=0)
    assert sum(math.prod(s) for s in shapes(small).values()) == N_SMALL
    w = weights(small)
    assert all(a.dtype == np.float32 for a in w.values()) and len(w) == len(dict(small.named_parameters()))


def test_the_same_seed_gives_the_same_initial_model():
    a, b = weights(build_unet(SMALL, seed=3)), weights(build_unet(SMALL, seed=3))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_plain_fedavg_is_the_sample_weighted_mean():
    d1, d2 = {"w": np.array([1.0, 2.0], np.float32)}, {"w": np.array([4.0, -1.0], np.float32)}
    np.testing.assert_allclose(aggregate([(d1, 1.0), (d2, 3.0)], FEDAVG)["w"], [3.25, -0.25])


@pytest.mark.slow
def test_one_round_of_each_uplink_counts_the_real_message_lengths():
    plan = quick_plan()
    tests = site_test_sets(plan)
    seen = []
    got = {}
    for uplink in (Uplink("float32"), Uplink("float16"), Uplink("topk", fraction=0.01)):
        method = Method(name=f"u-{uplink.label}", label="", family="unet", unet=SMALL, uplink=uplink)
        rounds, params = run_unet(method, plan, tests, on_round=seen.append)
        assert params == N_SMALL and len(rounds) == 1
        got[uplink.label] = rounds[0]
    plain, half, top1 = got["float32"], got["float16"], got["top1%"]
    for r in (plain, half, top1):
        assert set(r.dice) == {"site0", "site1"} and all(0.0 <= d <= 1.0 for d in r.dice.values())
        assert all(r.peak_rss[s] > 50 * 2**20 and r.train_s[s] > 0 for s in r.dice)
        # the full model goes down in float32 whatever the uplink
        assert all(ENVELOPE + 4 * N_SMALL < r.bytes_down[s] < ENVELOPE + 4 * N_SMALL + 1024 for s in r.dice)
    assert all(ENVELOPE + 4 * N_SMALL < plain.bytes_up[s] < ENVELOPE + 4 * N_SMALL + 1024 for s in plain.dice)
    assert all(plain.bytes_up[s] - half.bytes_up[s] == 2 * N_SMALL for s in plain.dice)
    k = math.ceil(0.01 * N_SMALL)
    assert all(8 * k < top1.bytes_up[s] - ENVELOPE < 8 * k + 1024 for s in top1.dice)
    assert [r.method for r in seen] == ["u-float32", "u-float16", "u-top1%"]
