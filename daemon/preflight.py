"""``fednca daemon --check-config``: everything that would stop the daemon or fail at run time.

The configuration parser (:mod:`.config`) finds every bad key; this goes on to the files the
keys name and reports every problem at once, each with the key, the file and the fix:

* credentials: the MQTT password (inline in a file others cannot read, or a 0600 one-line
  password file, or the systemd credential), the site's signing key (0600), the coordinator's
  two public keys, and for an ``mqtts://`` broker its CA file and any client certificate;
* the state folder: made, or makeable, and writable;
* the trainer: PyTorch installed when ``training.trainer`` is ``torch``;
* the dataset (:mod:`.preflight_data`): pairing, sizes, decoding, the test split.

Readability is tried as the user running the check: run it as the daemon's user
(``sudo -u fednca fednca daemon --check-config ...``) to see what the daemon will see; root
reads everything. Under systemd the site key and the password arrive as credentials, which
systemd reads as root.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from fednca import keys as k
from fednca.checks import Finding, Report, open_problem, private_mode_problem, writable_folder_problem

from . import config as dc
from .preflight_data import ImageCheck, check_folder

SYSTEMD_STATE_DIR = Path("/var/lib/fednca")  # the unit's StateDirectory=fednca makes it
HIDDEN_BY_UNIT = (Path("/home"), Path("/root"), Path("/run/user"))  # ProtectHome=yes


def check(path: Path, *, images: ImageCheck = ImageCheck(), env: Mapping[str, str] | None = None) -> Report:
    """The report of a configuration file: its keys first; the files they name once the keys parse."""
    try:
        cfg, mode = dc.read(path, env=env)
    except dc.DaemonConfigError as e:
        return Report(source=str(path), findings=tuple(
            Finding(key, why, f"correct {path}" if key == "(file)" else
                    f"correct the key in {path} (docs/daemon.md lists every key)")
            for key, why in e.problems))
    findings = credential_findings(cfg, config_mode=mode, config_path=path)
    findings += state_findings(cfg.state_dir) + unit_findings(cfg) + trainer_findings(cfg)
    notes: list[str] = []
    facts: dict = {}
    if cfg.data.folder is not None:
        data, notes, facts = check_folder(cfg.data.folder, skip_bad=cfg.data.skip_bad,
                                          test_fraction=cfg.data.test_fraction, seed=cfg.seed, images=images)
        findings += data
    else:
        notes.append("data: phantom images, nothing to read")
    if os.geteuid() == 0:
        notes.append("checked as root, who reads every file: run it as the daemon's user (sudo -u fednca ...) "
                     "to check what the daemon may read")
    return Report(source=str(path), findings=tuple(findings), notes=tuple(notes),
                  facts={"data": facts, "effective": dc.to_dict(cfg)})


# ------------------------------------------------------------------------------------ credentials


def credential_findings(cfg: dc.DaemonConfig, *, config_mode: int, config_path: Path) -> list[Finding]:
    return (_password(cfg, config_mode, config_path) + _site_key(cfg.keys.site)
            + _coordinator_keys(cfg.keys.coordinator) + _tls(cfg))


def _password(cfg: dc.DaemonConfig, mode: int, config_path: Path) -> list[Finding]:
    b = cfg.broker
    if b.password is not None:
        if mode & 0o004:
            return [Finding("broker.password", "the file holds a password and anyone can read it",
                            f"chmod o-r {config_path}, or move the password to broker.password_file",
                            path=str(config_path))]
        return []
    if b.password_file is None:
        return [Finding("broker.password_file", "no MQTT password: neither broker.password nor "
                        f"broker.password_file is set, and no ${dc.CREDENTIALS_VAR}/{dc.PASSWORD_CREDENTIAL} "
                        "credential was given; the broker refuses a site without one",
                        "password_file: /etc/fednca/mqtt-password, the enrolment bundle's mqtt-password "
                        "(install -m 0600 -o fednca -g fednca BUNDLE/mqtt-password /etc/fednca/mqtt-password)")]
    p = b.password_file
    why = open_problem(p)
    if why is not None:
        fix = ("put the enrolment bundle's mqtt-password there: install -m 0600 -o fednca -g fednca "
               f"BUNDLE/mqtt-password {p}") if why == "no such file" else \
            f"let the daemon's user read it (chown fednca: {p}; chmod 600 {p})"
        return [Finding("broker.password_file", why, fix, path=str(p))]
    mode_problem = private_mode_problem(p)
    if mode_problem is not None:
        return [Finding("broker.password_file", mode_problem, f"chmod 600 {p}", path=str(p))]
    try:
        dc.read_password(p, str(config_path))
    except dc.DaemonConfigError as e:
        return [Finding("broker.password_file", e.why.split(": ", 1)[-1],
                        "write the password alone on one line (the bundle's mqtt-password)", path=str(p))]
    return []


def _site_key(folder: Path) -> list[Finding]:
    p = folder / k.SIGNING_KEY_FILE
    why = open_problem(p)
    if why == "no such file":
        return [Finding("keys.site", "no such key file (the site's signing key)",
                        f"make it with: fednca keys generate --role site --out {folder} (then enrol its signing.pub "
                        "at the coordinator), or point keys.site at the folder holding it", path=str(p))]
    if why is not None and folder == dc.KeysConfig().site:  # the unit passes it as a credential, read by root
        return [Finding("keys.site", f"{why}: fine under the unit, which hands it over as the credential "
                        "signing.key (LoadCredential=), but the daemon run by hand cannot sign",
                        "nothing under systemd; by hand run as root", path=str(p), severity="warning")]
    if why is not None:
        return [Finding("keys.site", why, f"let the daemon's user read it (chown fednca: {p}), or pass it as the "
                        "systemd credential signing.key", path=str(p))]
    mode = private_mode_problem(p)
    if mode is not None:
        return [Finding("keys.site", f"private key {mode}", f"chmod 600 {p}", path=str(p))]
    try:
        k.read_site_keys(folder)
    except k.KeyFileError as e:
        return [Finding("keys.site", str(e).split(": ", 1)[-1], "restore the key made by fednca keys generate "
                        "(a site with a new key must be enrolled again)", path=str(e).split(": ", 1)[0])]
    return []


def _coordinator_keys(folder: Path) -> list[Finding]:
    out: list[Finding] = []
    for name, read in ((k.SIGNING_PUB_FILE, k.read_verify_key), (k.BOX_PUB_FILE, k.read_box_public_key)):
        p = folder / name
        why = open_problem(p)
        if why is None:
            try:
                read(p)
                continue
            except k.KeyFileError as e:
                why = str(e).split(": ", 1)[-1]
        out.append(Finding("keys.coordinator", f"the coordinator's {name}: {why}",
                           f"copy it from the enrolment bundle: install -m 0644 BUNDLE/{name} {folder}/", path=str(p)))
    return out


def _tls(cfg: dc.DaemonConfig) -> list[Finding]:
    if not cfg.broker.url.startswith("mqtts://"):
        return []
    t = cfg.broker.tls
    out: list[Finding] = []
    if t.ca_file is None:
        out.append(Finding("broker.tls.ca_file", "not given: the system's CAs must trust the broker's certificate, "
                           "and a federation's own CA (coordinator init makes one) is not among them",
                           "ca_file: /etc/fednca/ca.crt, the enrolment bundle's ca.crt", severity="warning"))
    else:
        why = open_problem(t.ca_file)
        if why is None and b"-----BEGIN CERTIFICATE-----" not in t.ca_file.read_bytes()[:1 << 20]:
            why = "not a PEM certificate"
        if why is not None:
            out.append(Finding("broker.tls.ca_file", why, "install the enrolment bundle's ca.crt there: "
                               f"install -m 0644 BUNDLE/ca.crt {t.ca_file}", path=str(t.ca_file)))
    if (t.cert_file is None) != (t.key_file is None):
        given = "cert_file" if t.key_file is None else "key_file"
        out.append(Finding(f"broker.tls.{given}", "a client certificate needs both cert_file and key_file",
                           "give both, or neither"))
    for name in ("cert_file", "key_file"):
        p = getattr(t, name)
        if p is None:
            continue
        why = open_problem(p) or (private_mode_problem(p) if name == "key_file" else None)
        if why is not None:
            fix = f"chmod 600 {p}" if why.startswith("readable by") else "put the file there, readable by the daemon's user"
            out.append(Finding(f"broker.tls.{name}", why, fix, path=str(p)))
    return out


# ---------------------------------------------------------------------------------- state folder


def state_findings(state_dir: Path) -> list[Finding]:
    why = writable_folder_problem(state_dir)
    if why is None:
        return []
    if not state_dir.exists() and state_dir == SYSTEMD_STATE_DIR:
        return [Finding("state_dir", f"{why}; systemd makes it when the unit starts (StateDirectory=fednca)",
                        f"nothing under systemd; by hand: mkdir -m 700 {state_dir}", path=str(state_dir),
                        severity="warning")]
    return [Finding("state_dir", why, f"make it the daemon's own: mkdir -p -m 700 {state_dir} && "
                    f"chown fednca: {state_dir}", path=str(state_dir))]


def trainer_findings(cfg: dc.DaemonConfig, *,
                     find_spec: Callable[[str], Any] = importlib.util.find_spec) -> list[Finding]:
    """The PyTorch trainer on a site installed without PyTorch (looked up, not imported)."""
    if cfg.training.trainer != "torch" or find_spec("torch") is not None:
        return []
    return [Finding("training.trainer", "'torch' but PyTorch is not installed in this environment",
                    "set training.trainer: numpy (the site's trainer), or install PyTorch: "
                    "systemd/install-daemon.sh --with-torch")]


def unit_findings(cfg: dc.DaemonConfig) -> list[Finding]:
    """Paths that work by hand but not under systemd/fednca-daemon.service's sandbox (warnings:
    the daemon may run without the unit)."""
    out: list[Finding] = []
    if cfg.state_dir != SYSTEMD_STATE_DIR:
        out.append(Finding("state_dir", "under the unit (ProtectSystem=strict) the daemon may write only "
                           f"{SYSTEMD_STATE_DIR}, its StateDirectory", f"use {SYSTEMD_STATE_DIR}, or allow it: "
                           f"systemctl edit fednca-daemon, add [Service] ReadWritePaths={cfg.state_dir}",
                           path=str(cfg.state_dir), severity="warning"))
    folder = cfg.data.folder
    if folder is not None and any(folder == h or h in folder.parents for h in HIDDEN_BY_UNIT):
        out.append(Finding("data.folder", "hidden from the daemon under the unit (ProtectHome=yes)",
                           "move the images out of /home, e.g. to /srv/fednca/data (readable by group fednca)",
                           path=str(folder), severity="warning"))
    return out
