"""The phantom federation of ``fednca reproduce``, described by numbers: what a reader needs to
judge how far it is from the FedNCA paper's fetal abdominal ultrasound (docs/phantom.md).

Per site, over the reproduction's images (frames 0..15 for training, 24 test frames of other
patients from 10000 on): the image's mean and standard deviation inside the fan (in [-1, 1]), the
target's share of the frame, the target's mean intensity against the surrounding fan's
(contrast, in standard deviations of the fan), and the Dice of the best single intensity
threshold fitted on the training frames and scored on the test frames.

    .venv/bin/python bench/phantom_stats.py > bench/results/reproduce/phantom_stats.json
"""

from __future__ import annotations

import json

from fednca.phantom import best_threshold_dice, phantom_dataset

SITES, TRAIN, TEST, TEST_START = range(5), 16, 24, 10_000


def describe(site: int) -> dict:
    train = phantom_dataset(site=site, count=TRAIN)
    test = phantom_dataset(site=site, count=TEST, start=TEST_START)
    x, m = train.images[:, 0], train.masks[:, 0] > 0.5
    fan = x > -0.999  # black outside the field of view
    inside, around = x[m], x[fan & ~m]
    return {"image_mean_in_fan": round(float(x[fan].mean()), 3), "image_std_in_fan": round(float(x[fan].std()), 3),
            "target_fraction": round(float(m.mean()), 3),
            "target_contrast_sd": round(float((inside.mean() - around.mean()) / x[fan].std()), 3),
            "threshold_test_dice": round(float(best_threshold_dice(train, test)["test_dice"]), 3)}


if __name__ == "__main__":
    print(json.dumps({f"site{s}": describe(s) for s in SITES}, indent=1))
