import numpy as np
import pytest

from fednca.metrics import dice, nqm


def test_dice_known_answers():
    truth = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]], bool)
    pred = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]], bool)
    np.testing.assert_allclose(dice(pred, truth), [2 / 3, 1.0, 0.0], atol=1e-5)


def test_dice_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        dice(np.zeros((2, 4)), np.zeros((2, 5)))


def test_nqm_is_zero_when_passes_agree_and_grows_with_spread():
    agree = np.full((5, 1, 4, 4), 0.8)
    spread = np.stack([np.full((1, 4, 4), v) for v in (0.2, 0.9, 0.1, 0.8, 0.5)])
    assert nqm(agree)[0] == pytest.approx(0.0)
    assert nqm(spread)[0] == pytest.approx(np.std([0.2, 0.9, 0.1, 0.8, 0.5]) / 0.5)
