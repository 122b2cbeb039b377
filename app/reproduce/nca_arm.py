"""The NCA methods of the reproduction, run as the product runs them: a coordinator and one real
daemon per site on the in-memory broker (:class:`fednca_app.harness.InProcessParties`), each site
training in its trainer child process, updates signed and sealed, rounds closed when every site has
reported, plain FedAvg.

Per round it reads what the parties recorded, never estimates: the bytes up are the lengths of the
update payloads the coordinator stored for that round (each site's signed, sealed message), the
bytes down the length of the signed round announcement as a site received and stored it (the
global model it trains from); the Dice is that of the round's aggregated model on each site's own
test patients; the training seconds are the samples a site trained in the round over the rate its
trainer measured; the peak RSS is its trainer child's (``ru_maxrss``).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

from fednca.data import Dataset

from ..harness import InProcessParties, set_up
from .methods import FEDAVG, Method, Plan
from .records import RoundResult

FEDERATION = "reproduce"
POLL_S = 0.5


def _configs(method: Method, plan: Plan) -> tuple:
    from fednca.config import preset, train_preset

    if method.preset == "mednca":  # Med-NCA's own steps (64, 64), unless the plan shortens them
        steps = {} if plan.mednca_steps is None else {"steps": tuple(plan.mednca_steps)}
        model = preset("mednca", input_size=plan.size, train_patch=plan.size, **steps)
    else:
        model = preset(method.preset, input_size=plan.size, steps=tuple(plan.nca_steps))
    train = train_preset(method.preset, batch_size=plan.batch, local_epochs=plan.local_epochs)
    return model, train


def run_nca(method: Method, plan: Plan, tests: Sequence[Dataset], *, work: Path,
            on_round: Callable[[RoundResult], None]) -> tuple[list[RoundResult], int]:
    """Run ``method`` (an NCA preset) for the plan's rounds; returns the rounds and the parameter count."""
    from fednca_broker.roundlog import RoundAggregatedRecord
    from fednca_broker.store import RoundStore
    from fednca_daemon.outbox import StateFolder

    from fednca.config import tensor_shapes
    from ..compare import Site

    rounds = plan.rounds_of(method)
    model_cfg, train_cfg = _configs(method, plan)
    if work.exists():
        shutil.rmtree(work)
    initial = _initial_model(work / "initial-model", model_cfg, seed=plan.seed)
    federation = set_up(work, federation=FEDERATION, sites=plan.sites, rounds=rounds, quorum=plan.sites,
                        url="mqtt://127.0.0.1:1883", model=model_cfg, train=train_cfg, grace=1.0,
                        train_images=plan.train_images, seed=plan.seed,
                        wire={"update_dtype": method.uplink.encoding}, trainer="torch", aggregation=FEDAVG,
                        initial_model=initial)
    names = [s.name for s in federation.sites]
    sites = [Site(name=n, train=t, test=t) for n, t in zip(names, tests)]  # only the test images are scored
    store = RoundStore(root=federation.config().store_root, federation=FEDERATION)
    parties = InProcessParties(federation=federation)
    results: list[RoundResult] = []
    trained = dict.fromkeys(names, 0)
    try:
        parties.start()
        while len(results) < rounds:
            done = parties.finished()
            closed = [r for r in store.read_log() if isinstance(r, RoundAggregatedRecord)]
            for record in closed[len(results):]:
                result = _round(method, record, store=store, parties=parties, sites=sites, model_cfg=model_cfg,
                                seed=plan.seed, trained=trained, state=StateFolder)
                results.append(result)
                on_round(result)
            if done and len(results) < rounds:
                raise RuntimeError(f"{method.name}: the coordinator finished after {len(results)} of {rounds} rounds")
            time.sleep(POLL_S)
    finally:
        parties.close()
    return results, sum(_size(s) for s in tensor_shapes(model_cfg).values())


def _initial_model(folder: Path, cfg, *, seed: int) -> Path:
    """The first global model of ``cfg`` (``coordinator init`` would draw the default preset's)."""
    from fednca import modelfile
    from fednca.model import build, tensors

    modelfile.save(folder, {k: v.numpy() for k, v in tensors(build(cfg, seed=seed)).items()}, cfg)
    return folder


def _size(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _round(method: Method, record, *, store, parties, sites, model_cfg, seed: int, trained: dict, state) -> RoundResult:
    from ..compare import site_dice

    rnd = record.round
    dice = site_dice(store.load_model(rnd + 1), model_cfg, sites, seed=seed)
    folder = store.folder / "rounds" / str(rnd)
    up = {s.name: sum(p.stat().st_size for p in folder.glob(f"{s.name}-*.bin")) for s in sites}
    down, train_s, peak = {}, {}, {}
    for s in parties.federation.sites:
        path = state(path=s.state_dir).announcement_path
        down[s.name] = path.stat().st_size if path.exists() else 0
        supervisor = parties.services[s.name].trainer
        samples = supervisor.samples_trained - trained[s.name]
        trained[s.name] = supervisor.samples_trained
        train_s[s.name] = samples / supervisor.samples_per_s if supervisor.samples_per_s else 0.0
        peak[s.name] = supervisor.peak_rss
    return RoundResult(method=method.name, round=rnd, dice=dice, bytes_up=up, bytes_down=down, train_s=train_s,
                       peak_rss=peak)
