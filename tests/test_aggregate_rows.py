"""Aggregation over rows of a matrix equals aggregation over dicts, to the last bit."""

import numpy as np
import pytest

from fednca import aggregate
from fednca.aggregate import AggregationConfig, AggregationError
from fednca.aggregate_rows import aggregate_rows, flatten, row_norm, unflatten

LAYOUT = [("a.weight", (4, 3, 3)), ("a.bias", (1,)), ("b", (7,)), ("c", (2, 5))]


class Matrix:
    """Rows held in memory, served in blocks of ``width`` columns (the spool serves them from disk)."""

    def __init__(self, rows, width):
        self.m = np.stack(rows)
        self.n, self.size = self.m.shape
        self.width = width
        self.rows_read = 0

    def row(self, i):
        self.rows_read += 1
        return self.m[i].copy()

    def blocks(self):
        for j in range(0, self.size, self.width):
            yield j, self.m[:, j : j + self.width]


def deltas(n, seed=0, big=()):
    rng = np.random.default_rng(seed)
    return [{name: (rng.normal(0, 1e-2, shape) * (50 if i in big else 1)).astype(np.float16).astype(np.float32)
             for name, shape in LAYOUT} for i in range(n)]  # fmt: skip


CONFIGS = [
    AggregationConfig(),
    AggregationConfig(method="fedavg"),
    AggregationConfig(method="median"),
    AggregationConfig(method="fedavg", clip_norm=0.05, max_weight_ratio=None),
    AggregationConfig(clip_norm=0.05, median_norm_factor=1.0),
    AggregationConfig(method="median", median_norm_factor=None, trim=0.3),
]


@pytest.mark.parametrize("n", [1, 2, 5, 6, 31])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.method}-{c.clip_norm}-{c.median_norm_factor}")
@pytest.mark.parametrize("width", [1, 8, 512])
def test_rows_give_the_same_bits_as_dicts(n, cfg, width):
    ds = deltas(n, seed=n, big=(0, 3))
    weights = [float(w) for w in np.random.default_rng(n).integers(1, 100, n)]
    rows = [flatten(d, LAYOUT) for d in ds]
    got = aggregate_rows(Matrix(rows, width), weights=weights, norms=[row_norm(r, LAYOUT) for r in rows],
                         layout=LAYOUT, cfg=cfg)  # fmt: skip
    want = aggregate.aggregate(list(zip(ds, weights)), cfg)
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == np.float32 and got[name].shape == want[name].shape
        np.testing.assert_array_equal(got[name], want[name])


def test_only_rows_over_a_bound_are_read_again():
    ds = deltas(9, big=(4,))
    rows = [flatten(d, LAYOUT) for d in ds]
    source = Matrix(rows, 16)
    aggregate_rows(source, weights=[1.0] * 9, norms=[row_norm(r, LAYOUT) for r in rows], layout=LAYOUT,
                   cfg=AggregationConfig())  # fmt: skip
    assert source.rows_read == 1  # the one delta over twice the median norm


def test_a_row_norm_is_the_global_norm_to_the_bit():
    for i, d in enumerate(deltas(20, seed=3, big=(2,))):
        assert row_norm(flatten(d, LAYOUT), LAYOUT) == aggregate.global_norm(d), i


def test_flatten_and_unflatten_round_trip():
    d = deltas(1)[0]
    back = unflatten(flatten(d, LAYOUT), LAYOUT)
    assert list(back) == [name for name, _ in LAYOUT]
    for name in d:
        np.testing.assert_array_equal(back[name], d[name])


def test_nothing_or_zero_weights_cannot_be_aggregated():
    with pytest.raises(AggregationError, match="no updates"):
        _empty()
    rows = [flatten(d, LAYOUT) for d in deltas(2)]
    with pytest.raises(AggregationError, match="add up to 0"):
        aggregate_rows(Matrix(rows, 8), weights=[0.0, 0.0], norms=[row_norm(r, LAYOUT) for r in rows],
                       layout=LAYOUT, cfg=AggregationConfig(method="fedavg", max_weight_ratio=None))  # fmt: skip


def _empty():
    class Empty:
        n, size = 0, 54

        def row(self, i):
            raise AssertionError

        def blocks(self):
            return iter(())

    aggregate_rows(Empty(), weights=[], norms=[], layout=LAYOUT, cfg=AggregationConfig())
