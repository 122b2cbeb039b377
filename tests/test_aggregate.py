import gc
import weakref

import numpy as np
import pytest

from fednca.aggregate import (
    AGGREGATORS,
    AggregationConfig,
    AggregationError,
    aggregate,
    apply,
    bound_by_median,
    cap_weights,
    check_model,
    clip_norm,
    fedavg,
    global_norm,
    median,
    trim_count,
    trimmed_mean,
)
from fednca.errors import ConfigError


def d(a, b):
    """A two-tensor delta: a vector 'w' and a scalar-like 'b'."""
    return {"w": np.array(a, dtype=np.float32), "b": np.array([b], dtype=np.float32)}


def test_fedavg_weights_by_samples():
    out = fedavg([(d([1.0, 0.0], 2.0), 1), (d([4.0, 3.0], 8.0), 3)])
    np.testing.assert_allclose(out["w"], [13 / 4, 9 / 4])
    np.testing.assert_allclose(out["b"], [26 / 4])
    assert out["w"].dtype == np.float32 and out["b"].dtype == np.float32


def test_fedavg_of_float16_deltas_is_float32():
    half = {"w": np.array([0.5, -0.25], dtype=np.float16)}
    out = fedavg([(half, 1), (half, 1)])
    assert out["w"].dtype == np.float32
    np.testing.assert_array_equal(out["w"], [0.5, -0.25])


def test_fedavg_streams_without_holding_earlier_updates():
    refs: list[weakref.ref] = []
    alive_when_asked: list[int] = []

    def updates():
        for i in range(6):
            gc.collect()
            # while update i is produced, the consumer may still hold update i-1 but no older one
            alive_when_asked.append(sum(r() is not None for r in refs[: max(0, i - 1)]))
            delta = d([float(i), 1.0], float(i))
            refs.append(weakref.ref(delta["w"]))
            yield delta, 1

    out = fedavg(updates())
    assert alive_when_asked == [0] * 6
    np.testing.assert_allclose(out["w"], [2.5, 1.0])


def test_median_and_trimmed_mean_resist_an_outlier():
    honest = [(d([1.0, 2.0], 0.0), 10), (d([1.2, 2.2], 0.1), 10), (d([0.8, 1.8], -0.1), 10), (d([1.1, 2.1], 0.0), 10)]
    attacker = (d([1000.0, -1000.0], 500.0), 10_000)  # huge values and a lie about its samples
    updates = honest + [attacker]
    # first coordinate: 0.8 1.0 1.1 1.2 1000; second: -1000 1.8 2.0 2.1 2.2
    np.testing.assert_allclose(median(updates)["w"], [1.1, 2.0], rtol=1e-6)
    np.testing.assert_allclose(median(updates)["b"], [0.0], atol=1e-7)
    # 5 values, trim 0.2 drops one at each end: mean of the middle three
    expected = [(1.0 + 1.1 + 1.2) / 3, (1.8 + 2.0 + 2.1) / 3]
    np.testing.assert_allclose(trimmed_mean(updates, trim=0.2)["w"], expected, rtol=1e-6)
    assert fedavg(updates)["w"][0] > 900  # the plain weighted mean is captured by the attacker


def test_median_of_an_even_count_averages_the_middle_pair():
    out = median([(d([1.0, 0.0], 0.0), 1), (d([3.0, 10.0], 0.0), 1), (d([2.0, 4.0], 0.0), 1), (d([9.0, 6.0], 0.0), 1)])
    np.testing.assert_array_equal(out["w"], [2.5, 5.0])


def test_trimmed_mean_below_one_whole_value_is_the_plain_mean():
    updates = [(d([v, 0.0], 0.0), 1) for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
    np.testing.assert_allclose(trimmed_mean(updates, trim=0.1)["w"], [22.0, 0.0])


def test_clip_norm_scales_to_the_bound_exactly():
    out = clip_norm({"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}, 1.0)
    np.testing.assert_allclose(out["a"], [0.6, 0.0], rtol=3e-7)
    np.testing.assert_allclose(out["b"], [[0.8]], rtol=3e-7)
    assert global_norm(out) <= 1.0


def test_clip_norm_leaves_a_small_delta_as_it_is():
    small = {"a": np.array([0.3, 0.4], dtype=np.float32)}
    out = clip_norm(small, 1.0)
    np.testing.assert_array_equal(out["a"], small["a"])
    assert out["a"] is not small["a"]


def test_clip_norm_bound_holds_after_float32_rounding():
    rng = np.random.default_rng(0)
    for _ in range(200):
        delta = {"a": rng.normal(size=37).astype(np.float32) * 10, "b": rng.normal(size=(3, 5)).astype(np.float32)}
        bound = float(rng.uniform(0.01, 5.0))
        assert global_norm(clip_norm(delta, bound)) <= bound


@pytest.mark.parametrize("fn", [fedavg, median, trimmed_mean])
def test_inputs_are_not_mutated(fn):
    a, b = d([1.0, 2.0], 3.0), {"w": np.array([5.0, 6.0]), "b": np.array([7.0])}  # float32 and float64
    before = {k: v.copy() for k, v in a.items()}, {k: v.copy() for k, v in b.items()}
    fn([(a, 1), (b, 2)])
    aggregate([(a, 1), (b, 2)], AggregationConfig(clip_norm=0.5))
    apply(a, b)
    for delta, saved in zip((a, b), before):
        for name in delta:
            np.testing.assert_array_equal(delta[name], saved[name])


def test_aggregate_clips_before_combining():
    updates = [({"w": np.array([30.0, 40.0])}, 1), ({"w": np.array([0.0, 0.5])}, 1)]
    out = aggregate(updates, AggregationConfig(method="fedavg", clip_norm=1.0))
    np.testing.assert_allclose(out["w"], [(0.6 + 0.0) / 2, (0.8 + 0.5) / 2], rtol=1e-6)


def test_aggregate_uses_the_configured_trim():
    updates = [({"w": np.array([v])}, 1) for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
    np.testing.assert_allclose(aggregate(updates, AggregationConfig(method="trimmed_mean", trim=0.2))["w"], [3.0])
    np.testing.assert_allclose(aggregate(updates, AggregationConfig(method="median"))["w"], [3.0])


def test_apply_adds_the_delta_in_float32():
    new = apply({"w": np.array([1.0, 2.0], dtype=np.float32)}, {"w": np.array([0.5, -1.0], dtype=np.float16)})
    assert new["w"].dtype == np.float32
    np.testing.assert_array_equal(new["w"], [1.5, 1.0])


def test_apply_refuses_a_delta_that_does_not_fit():
    with pytest.raises(AggregationError, match="'w' has shape"):
        apply({"w": np.zeros(2, np.float32)}, {"w": np.zeros(3, np.float32)})
    with pytest.raises(AggregationError, match="'v' is missing"):
        apply({"w": np.zeros(2, np.float32), "v": np.zeros(1, np.float32)}, {"w": np.zeros(2, np.float32)})


@pytest.mark.parametrize("fn", list(AGGREGATORS.values()))
def test_empty_input_is_a_clear_error(fn):
    with pytest.raises(AggregationError, match="no updates"):
        fn(iter([]))


@pytest.mark.parametrize("fn", list(AGGREGATORS.values()))
def test_mismatched_updates_name_the_tensor(fn):
    with pytest.raises(AggregationError, match="update 1: tensor 'w' has shape"):
        fn([({"w": np.zeros(2)}, 1), ({"w": np.zeros(3)}, 1)])


@pytest.mark.parametrize("weight", [-1, float("nan"), float("inf"), "3", True])
def test_bad_weights_are_refused(weight):
    with pytest.raises(AggregationError, match="update 0: weight"):
        fedavg([({"w": np.zeros(2)}, weight)])


def test_weights_that_add_up_to_zero_are_refused():
    with pytest.raises(AggregationError, match="add up to 0"):
        fedavg([({"w": np.zeros(2)}, 0), ({"w": np.ones(2)}, 0)])


def test_integer_deltas_are_refused():
    with pytest.raises(AggregationError, match="'w' is not floating point"):
        median([({"w": np.array([1, 2])}, 1)])


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"method": "mean"}, "method"),
        ({"method": None}, "method"),
        ({"trim": 0.5}, "trim"),
        ({"trim": -0.1}, "trim"),
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"clip_norm": float("inf")}, "clip_norm"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as info:
        AggregationConfig(**kwargs)
    assert info.value.field == field


# -- bounded influence: the defaults against one poisoning site ---------------------------------


def test_min_trim_trims_at_small_n_and_leaves_two_alone():
    assert [trim_count(n, trim=0.1, min_trim=1) for n in (1, 2, 3, 5, 10, 20)] == [0, 0, 1, 1, 1, 2]
    updates = [({"w": np.array([v])}, 1) for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
    np.testing.assert_allclose(trimmed_mean(updates, trim=0.1, min_trim=1)["w"], [3.0])


def test_bound_by_median_scales_only_the_outlier():
    updates = [({"w": np.array([3.0, 4.0])}, 1), ({"w": np.array([0.0, 1.0])}, 1), ({"w": np.array([1e30, 0.0])}, 1)]
    out = bound_by_median(updates, 2.0)
    assert [global_norm(d) for d, _ in out] == pytest.approx([5.0, 1.0, 10.0], rel=1e-6)


def test_a_liar_cannot_lift_the_median_of_two():
    updates = [({"w": np.array([1.0])}, 1), ({"w": np.array([1e6])}, 1)]
    out = bound_by_median(updates, 2.0)
    assert global_norm(out[1][0]) == pytest.approx(2.0)


def test_cap_weights_stops_an_inflated_sample_count():
    updates = [({"w": np.array([1.0])}, 10), ({"w": np.array([1.0])}, 12), ({"w": np.array([-50.0])}, 1e9)]
    assert [w for _, w in cap_weights(updates, 2.0)] == [10, 12, 24]


@pytest.mark.parametrize("method", ["fedavg", "median", "trimmed_mean"])
def test_default_bounds_keep_one_poisoner_in_five_near_the_honest_mean(method):
    rng = np.random.default_rng(1)
    honest = [({"w": (np.ones(50) + 0.1 * rng.normal(size=50)).astype(np.float32)}, 16) for _ in range(4)]
    attacks = [({"w": np.full(50, 3e38, np.float32)}, 1e9),  # huge finite values, inflated count
               ({"w": -honest[0][0]["w"] * 40}, 16),  # sign-flipped and scaled
               ({"w": -sum(d["w"] for d, _ in honest)}, 16)]  # the negated sum of the others
    for bad in attacks:
        out = aggregate(honest + [bad], AggregationConfig(method=method))["w"]
        assert np.all(np.isfinite(out))
        assert np.abs(out - 1.0).max() < 0.7, (method, np.abs(out - 1.0).max())


def test_check_model_names_what_is_wrong():
    cfg = AggregationConfig()
    old = {"w": np.ones(4, np.float32)}
    assert check_model({"w": np.full(4, 1.1, np.float32)}, old, cfg) is None
    assert "not finite" in check_model({"w": np.array([1, np.nan, 1, 1], np.float32)}, old, cfg)
    assert "max_abs_weight" in check_model({"w": np.array([1, 1, 1, 2e4], np.float32)}, old, cfg)
    assert "move by" in check_model({"w": np.full(4, 3.0, np.float32)}, old, cfg)
    assert check_model({"w": np.full(4, 3.0, np.float32)}, old, AggregationConfig(max_model_change=None)) is None


@pytest.mark.parametrize(
    "kwargs, field",
    [({"min_trim": -1}, "min_trim"), ({"median_norm_factor": 0}, "median_norm_factor"),
     ({"max_weight_ratio": 0.5}, "max_weight_ratio"), ({"max_model_change": float("nan")}, "max_model_change"),
     ({"max_abs_weight": None}, "max_abs_weight")],
)
def test_new_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as info:
        AggregationConfig(**kwargs)
    assert info.value.field == field
