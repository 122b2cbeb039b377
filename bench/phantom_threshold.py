"""How far a global intensity threshold gets on the phantom: the bar a learned model must clear.

For each of the 5 documented sites, frames 0..TRAIN-1 are training images and frames from 10000 on
(other patients) are test images. The single threshold (either direction) with the best mean Dice
on all training images is scored on all test images. Also reports the generator's speed.

    .venv/bin/python bench/phantom_threshold.py [--train 200] [--test 50] [--seed 0]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

from fednca.data import concat
from fednca.phantom import best_threshold_dice, phantom_dataset

SITES = range(5)
TEST_START = 10_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=200, help="training frames per site")
    parser.add_argument("--test", type=int, default=50, help="test frames per site")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.perf_counter()
    train = [phantom_dataset(site=s, count=args.train, seed=args.seed) for s in SITES]
    test = [phantom_dataset(site=s, count=args.test, seed=args.seed, start=TEST_START) for s in SITES]
    seconds = time.perf_counter() - start
    result = best_threshold_dice(concat(train), concat(test))
    per_site = {
        str(s): round(best_threshold_dice(train[s], test[s])["test_dice"], 4) for s in SITES
    }  # best threshold fitted to each site alone: an even easier bar
    areas = [float(d.masks.mean()) for d in train]
    print(json.dumps({
        "sites": len(SITES),
        "train_per_site": args.train,
        "test_per_site": args.test,
        "seed": args.seed,
        "threshold": round(float(result["threshold"]), 4),
        "direction": result["direction"],
        "train_dice": round(float(result["train_dice"]), 4),
        "test_dice": round(float(result["test_dice"]), 4),
        "per_site_fitted_test_dice": per_site,
        "target_area_fraction": {str(s): round(a, 4) for s, a in zip(SITES, areas)},
        "generate_ms_per_image": round(1000 * seconds / (len(SITES) * (args.train + args.test)), 2),
    }, indent=2))


if __name__ == "__main__":
    main()
