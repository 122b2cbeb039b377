"""docs/operations.md followed command by command, with real processes on a real mosquitto over TLS.

The hub and two sites (``clinic-a``, ``clinic-b``) each get a scratch root; every ``sh`` block of
the operator's guide runs as written there (see :mod:`deploy_docs_support` for the few things a
test machine changes). On the way: mosquitto started as root from the files ``coordinator init``
wrote runs as its own ``mosquitto`` user, each site's daemon YAML as ``install-daemon.sh`` wrote it
passes ``--check-config``, rounds complete over ``mqtts://``, a revoked site's password stops
working at the HUP and the re-enrolled site trains again, ``fednca status`` and ``coordinator show``
show the Dice each site reported, and ``fednca segment`` makes masks with the model the daemon
exported. Then the upkeep: ``clinic-a``'s key is rotated and its next update accepted, the broker
gets a new certificate that the sites accept without a change, the hub is backed up, loses its
folders and is restored from the archive (``coordinator check`` passes on it), and a rollback to an
earlier round opens a round on that round's model, which both sites train on and complete. Every
command of the guide ran, and the README's Deploying commands are among them.

Only the model and the pace are shrunk, through settings the docs name (``model.input_size``,
``model.steps``, ``train.*`` in coordinator.yaml; ``cpu``, ``training``, ``telemetry`` in the
daemon's YAML), so that the whole day fits in a few minutes on two cores.
"""

from __future__ import annotations

import json
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy_docs_support import FEDNCA, REPO, Host, readme_commands, sh_blocks, user_exists
from fednca.transport.base import ConnectRefused
from fednca.transport.mqtt import MqttClient, TLSOptions
from fednca_app.harness import free_port
from fednca_broker.config import load_config
from fednca_broker.store import RoundStore
from mosquitto_fixture import MOSQUITTO

pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.slow,
    pytest.mark.skipif(MOSQUITTO is None or shutil.which("mosquitto_passwd") is None, reason="mosquitto is not installed"),
]
ROUND_WAIT = 150.0  # seconds for a round of the tiny model: a bound, not a measurement
HUB_DIR = "/var/lib/fednca-coordinator"


def wait_for(condition: Callable[[], Any], *, timeout: float, what: str, hosts: list[Host]) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = condition()
        if got:
            return got
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {h.name} {u}\n{h.log(u)[-3000:]}" for h in hosts for u in h.processes)
            raise AssertionError(f"timed out waiting for {what}\n{logs}")
        time.sleep(0.25)


def tiny_coordinator(path: Path) -> None:
    """The hub operator's edit of coordinator.yaml: a tiny model and recipe (docs/coordinator.md)."""
    cfg = yaml.safe_load(path.read_text())
    cfg["model"].update(input_size=16, steps=[3, 2])
    cfg["train"].update(local_epochs=1, batch_size=2)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def site_editor(host: Host) -> Callable[[Path], None]:
    """The site operator's edit of daemon.yaml: the installed file with its system paths where this
    host keeps them, and a fast pace (docs/daemon.md); the data folder and test split stay."""

    def edit(path: Path) -> None:
        cfg = yaml.safe_load(host.localize(path.read_text()))
        assert cfg["data"]["test_fraction"] > 0, "the installed daemon.yaml reports no test Dice"
        cfg["cpu"].update(threads=1, duty_cycle=1.0)
        cfg["training"].update(chunk_s=0.5, min_steps=1, deadline_margin_s=5.0, low_memory=False)
        cfg["telemetry"].update(interval_s=1.0)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    return edit


@pytest.fixture
def scratch():
    """A folder any user may enter (mosquitto reads the hub's broker files as its own user)."""
    folder = Path(tempfile.mkdtemp(prefix="fednca-deploy-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(not user_exists("mosquitto"), reason="needs the mosquitto user (Debian's mosquitto package)")
def test_the_operations_guide_runs_as_written(scratch):
    ops = sh_blocks((REPO / "docs" / "operations.md").read_text())
    port = free_port()
    hub = Host(name="hub", root=scratch / "hub", port=port)
    sites = {name: Host(name=name, root=scratch / name, port=port, site=name) for name in ("clinic-a", "clinic-b")}
    hosts = [hub, *sites.values()]
    try:
        _the_day(ops, hub, sites, hosts)
    finally:
        for host in hosts:
            host.close()
    ran = {c for h in hosts for c in h.ran}
    documented = [c.removeprefix("sudo ") for blocks in ops.values() for block in blocks for c in block]
    assert not [c for c in documented if c not in ran], "a command of the guide is not run here"
    readme = readme_commands((REPO / "README.md").read_text())
    assert readme and not [c for c in readme if c not in ran], "README's Deploying commands differ from the guide's"


def _the_day(ops: dict[str, list[list[str]]], hub: Host, sites: dict[str, Host], hosts: list[Host]) -> None:
    install_hub, init, start_hub, rewrite_broker = ops["Install the hub (coordinator and broker)"]
    hub.run(install_hub)
    # install-coordinator.sh --root chowns nothing; the table of operations.md says who owns what
    shutil.chown(hub.path("/etc/fednca/mosquitto"), "root", "mosquitto")
    shutil.chown(hub.path("/var/lib/fednca-mosquitto"), "mosquitto", "mosquitto")
    hub.run(init)
    tiny_coordinator(hub.path(f"{HUB_DIR}/coordinator.yaml"))
    hub.run(start_hub)
    hub.run(rewrite_broker)  # as after an edit of the mosquitto section: the coordinator reconnects
    assert _user_of(hub.processes["mosquitto"].pid) == "mosquitto"
    cfg = load_config(hub.path(f"{HUB_DIR}/coordinator.yaml"))
    assert cfg.broker.url == f"mqtts://localhost:{hub.port}"
    store = RoundStore(root=cfg.store_root, federation=cfg.federation.name)

    def aggregated() -> list[dict[str, Any]]:
        return _aggregated(store)

    def accepted_in(site: str, round: int) -> bool:
        return _accepted_in(store, site, round)

    (install_site,) = ops["Install a site"]
    enrol_hub, bundle, data, start_site = ops["Enrol a site"]

    def enrol(name: str) -> None:
        site = sites[name]
        hub.site = name  # the hub's commands name the site they are about
        shutil.copy(site.path("/etc/fednca/keys/signing.pub"), hub.path(f"/root/{name}-signing.pub"))
        hub.run(enrol_hub)
        shutil.copytree(hub.path(f"/root/bundle-{name}"), site.home / f"bundle-{name}", dirs_exist_ok=True)
        site.run(bundle)
        site.run(data)
        site.run(start_site, editor=site_editor(site))

    for name, site in sites.items():
        site.run(install_site)
        enrol(name)
    # A round may close with clinic-a alone, the only site enrolled while it trained (a tiny model
    # trains in well under a second); clinic-b joins the next one.
    def both_counted() -> bool:
        counted = {site for r in aggregated() for site in r["sites"]}
        return {"clinic-a", "clinic-b"} <= counted

    wait_for(both_counted, timeout=2 * ROUND_WAIT, what="both sites' updates aggregated over TLS", hosts=hosts)

    # Revoke clinic-b: at the HUP its password stops working
    old_password = (sites["clinic-b"].path("/etc/fednca/mqtt-password")).read_text().strip()
    hub.site = "clinic-b"
    hub.run(ops["Revoke a site"][0])
    ca = TLSOptions(ca_file=str(sites["clinic-b"].path("/etc/fednca/ca.crt")))

    def refused() -> bool:
        probe = MqttClient(url=f"mqtts://localhost:{hub.port}", client_id="clinic-b-probe", username="clinic-b",
                           password=old_password, tls=ca)  # fmt: skip
        try:
            probe.connect(2.0)
            return False  # connected, or no answer yet: not the refusal
        except ConnectRefused as e:
            return "Not authorized" in str(e)
        finally:
            probe.disconnect()

    wait_for(refused, timeout=10, what="mosquitto refusing the revoked site", hosts=hosts)
    closed_before = max(r["round"] for r in aggregated())

    # ... and take it back: enrol again, the new bundle, a restart of the daemon that kept running
    assert sites["clinic-b"].processes["fednca-daemon"].running()
    enrol("clinic-b")
    assert sites["clinic-b"].path("/etc/fednca/mqtt-password").read_text().strip() != old_password
    sites["clinic-b"].run(["systemctl restart fednca-daemon"])

    def rejoined() -> bool:
        return any(r["round"] > closed_before and accepted_in("clinic-b", r["round"]) for r in aggregated())

    wait_for(rejoined, timeout=2 * ROUND_WAIT, what="a round with the re-enrolled site", hosts=hosts)
    last = max(r["round"] for r in aggregated())
    assert last >= 2 and hub.processes["mosquitto"].running()

    # Watch: both views show each site's reported test Dice (a number, where "-" means none)
    watch, view_accounts = ops["Watch the federation"]
    status_out, show_out = hub.run(watch)
    by_site = {row["site"]: row["Dice"] for row in _table(status_out, "Dice") if row["site"] in sites}
    assert set(by_site) == set(sites) and all(_number(by_site[s]) for s in sites), status_out
    rounds = {int(row["round"]): row for row in _table(show_out, "mean Dice") if row["round"].isdigit()}
    # The federation keeps going while the views run (tiny rounds take about a second): the rounds
    # listed are the newest, `last` or later, and they hold each site's reported Dice
    assert rounds and max(rounds) >= last, show_out
    assert any(all(_number(row[s]) for s in sites) for row in rounds.values()), show_out
    hub.run(view_accounts)

    # Segment on a site with the model its daemon exported
    site = sites["clinic-a"]
    wait_for(lambda: site.path("/var/lib/fednca/inference/model.onnx").exists(), timeout=30,
             what="the exported inference model", hosts=hosts)  # fmt: skip
    site.run(ops["Segment on a site"][0])
    masks = list((site.home / "masks").rglob("*.png"))
    images = list(site.path("/srv/fednca/data/images").glob("*.png"))
    assert len(masks) >= len(images) > 0

    _upkeep(ops, hub, sites, hosts, store)
    for host in hosts:
        for unit, process in host.processes.items():
            assert process.running(), f"{host.name} {unit} exited:\n{process.log()[-3000:]}"


def _upkeep(ops: dict[str, list[list[str]]], hub: Host, sites: dict[str, Host], hosts: list[Host],
            store: RoundStore) -> None:  # fmt: skip
    """Rotate a site's key and the broker's certificate, back up and restore the hub, roll back."""
    # Rotate clinic-a's key: its next update, signed with the new key, is accepted
    site_stop, hub_enrol, site_start, new_certificate = ops["Rotate a key"]
    a = sites["clinic-a"]
    old_key = a.path("/etc/fednca/keys/signing.pub").read_bytes()
    old_password = a.path("/etc/fednca/mqtt-password").read_text()
    a.run(site_stop)
    assert a.path("/etc/fednca/keys/signing.pub").read_bytes() != old_key
    hub.site = "clinic-a"
    shutil.copy(a.path("/etc/fednca/keys/signing.pub"), hub.path("/root/clinic-a-signing.pub"))
    hub.run(hub_enrol)
    shutil.copytree(hub.path("/root/bundle-clinic-a"), a.home / "bundle-clinic-a", dirs_exist_ok=True)
    rotated_at = time.time()
    a.run(site_start)
    assert a.path("/etc/fednca/mqtt-password").read_text() != old_password

    def next_update() -> Any:
        mine = [r for r in store.read_log() if r.get("site") == "clinic-a" and r.get("at", 0) >= rotated_at
                and r.get("kind") in ("update_accepted", "update_rejected") and r.get("reason") != "wrong_key"]
        return mine[0] if mine else None  # an old-key update still in the outbox is refused as wrong_key

    first = wait_for(next_update, timeout=ROUND_WAIT, what="clinic-a's update with its new key", hosts=hosts)
    assert first.get("kind") == "update_accepted", first

    # A new broker certificate from the same CA: nothing changes on the sites
    certificate = hub.path("/etc/fednca/mosquitto/server.pem").read_bytes()
    hub.run(new_certificate)
    assert hub.path("/etc/fednca/mosquitto/server.pem").read_bytes() != certificate

    # Back up (coordinator stopped), lose both folders, restore from the archive and check it
    backup, restore = ops["Back up the coordinator"]
    hub.run(backup)
    (archive,) = hub.home.glob("fednca-backup-*.tar.gz")
    hub.examples["fednca-backup-2026-12-01.tar.gz"] = archive.name
    hub.run(restore[:1])
    for folder in (HUB_DIR, "/etc/fednca/mosquitto"):
        shutil.rmtree(hub.path(folder))
    resumes = hub.log("fednca-coordinator").count("coordinator_resumed")
    hub.run(restore[1:])

    def resumed() -> bool:  # from the restored store, under its lock (the event is logged, not stored)
        return hub.log("fednca-coordinator").count("coordinator_resumed") > resumes

    wait_for(resumed, timeout=30, what="the coordinator resuming from the restored folder", hosts=hosts)

    # Go back to the model of the last aggregated round: refused while the coordinator runs
    stop, rollback, start = ops["Recover from a bad round"][0]
    good = max(r["round"] for r in _aggregated(store))
    hub.examples["--to-round 12"] = f"--to-round {good}"
    busy = subprocess.run(["sh", "-ec", hub.localize(rollback.removeprefix("sudo "))], capture_output=True, text=True)
    assert busy.returncode != 0 and "stop it first" in busy.stderr, busy.stderr
    hub.run([stop])
    current = store.load_state().round
    hub.run([rollback])
    opened = _show_json(hub)["round"]
    assert (opened["round"], opened["status"]) == (current + 1, "open"), opened
    model = {r["round"]: r["model_sha256"] for r in store.read_log() if r.get("kind") == "round_opened"}
    assert model[current + 1] == model[good] != model[current]
    hub.run([start])

    def trained_on() -> bool:
        return (any(r["round"] == current + 1 for r in _aggregated(store))
                and all(_accepted_in(store, s, current + 1) for s in sites))  # fmt: skip

    wait_for(trained_on, timeout=ROUND_WAIT, what="a round on the rolled-back model", hosts=hosts)


def _show_json(hub: Host) -> dict[str, Any]:
    done = subprocess.run([FEDNCA, "coordinator", "show", str(hub.path(HUB_DIR)), "--json"], capture_output=True,
                          text=True, check=True)  # fmt: skip
    return json.loads(done.stdout)


def _aggregated(store: RoundStore) -> list[Any]:
    return [r for r in store.read_log() if r.get("kind") == "round_aggregated"]


def _accepted_in(store: RoundStore, site: str, round: int) -> bool:
    return any(r.get("kind") == "update_accepted" and r.get("site") == site and r.get("round") == round
               for r in store.read_log())  # fmt: skip


def _user_of(pid: int) -> str:
    status = Path(f"/proc/{pid}/status").read_text()
    return pwd.getpwuid(int(re.search(r"^Uid:\s+(\d+)", status, flags=re.MULTILINE).group(1))).pw_name


def _table(text: str, column: str) -> list[dict[str, str]]:
    """The lines below the first header in ``text`` that names ``column``, each cut into the cells
    below the headings (the columns are left-aligned); the caller keeps the rows it knows."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.search(rf"(^|\s{{2}}){re.escape(column)}(\s{{2}}|$)", line))
    heads = [(m.start(), m.group()) for m in re.finditer(r"\S+(?: \S+)*", lines[start])]
    bounds = [s for s, _ in heads[1:]] + [None]
    return [{name: line[s:e].strip() for (s, name), e in zip(heads, bounds)} for line in lines[start + 1:]]


def _number(cell: str) -> bool:
    return re.fullmatch(r"\d+\.\d+", cell) is not None
