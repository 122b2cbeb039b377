#!/bin/sh
# Install the FedNCA edge daemon on a board (Debian 12, Raspberry Pi OS bookworm, Jetson Linux, a laptop).
#
#   sudo systemd/install-daemon.sh [--source DIR|WHEEL] [--prefix /opt/fednca] [--dry-run]
#                                  [--site ID] [--federation ID] [--broker URL] [--with-torch]
#
# What it does, each step skipped when already done (--dry-run prints the steps instead):
#   0. checks that python3 is 3.11 or newer;
#   1. a system user and group "fednca" (no login, no home);
#   2. a virtual environment in PREFIX/venv with this package and the site's dependencies only: no
#      PyTorch (the daemon trains with numpy); --with-torch adds PyTorch 2.13.0 (CPU) and the
#      [torch] extra, for a site set to training.trainer: torch;
#   3. /etc/fednca (root:fednca 0750) with daemon.yaml from systemd/daemon.example.yaml (0640),
#      an empty coordinator/ folder for the coordinator's public keys; every path in daemon.yaml
#      is absolute and the password is read from /etc/fednca/mqtt-password (fednca 0600), so
#      `fednca daemon --config /etc/fednca/daemon.yaml` also runs by hand, outside systemd;
#   4. the site's signing key in /etc/fednca/keys (root only, 0700/0600); the daemon gets it
#      as the systemd credential "signing.key";
#   5. fednca-daemon.service in /etc/systemd/system, enabled but not started.
# It then prints what the operator still has to do (enrolment, password, coordinator keys).
#
# For packaging and tests: DESTDIR=ROOT installs below ROOT; SKIP_USER=1, SKIP_VENV=1 and
# SKIP_SYSTEMCTL=1 leave those steps out; FEDNCA_USER names another service user; FEDNCA=PATH
# is the fednca command used to make the key (default: the one in the new venv).
set -eu

SOURCE=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=/opt/fednca
SITE=""
FEDERATION=""
BROKER=""
DRY=""
WITH_TORCH=""
while [ $# -gt 0 ]; do
    case "$1" in
        --source) SOURCE=$2; shift 2 ;;
        --prefix) PREFIX=$2; shift 2 ;;
        --site) SITE=$2; shift 2 ;;
        --federation) FEDERATION=$2; shift 2 ;;
        --broker) BROKER=$2; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        --with-torch) WITH_TORCH=1; shift ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "install-daemon: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

DESTDIR=${DESTDIR:-}
USER_NAME=${FEDNCA_USER:-fednca}
HERE=$(cd "$(dirname "$0")" && pwd)
ETC="$DESTDIR/etc/fednca"
UNIT_DIR="$DESTDIR/etc/systemd/system"
VENV="$PREFIX/venv"
FEDNCA=${FEDNCA:-$DESTDIR$VENV/bin/fednca}

say() { printf 'install-daemon: %s\n' "$*"; }
do_() { if [ -n "$DRY" ]; then printf 'would run: %s\n' "$*"; else "$@"; fi; }

if [ -z "$DESTDIR" ] && [ -z "$DRY" ] && [ "$(id -u)" != 0 ]; then
    echo "install-daemon: run as root (or set DESTDIR to install below another root, --dry-run to look)" >&2
    exit 1
fi

# 0. Python
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "install-daemon: needs Python 3.11 or newer; $PYTHON is $("$PYTHON" -V 2>&1 || echo missing)" >&2
    exit 1
fi

# 1. the service user
if [ -z "${SKIP_USER:-}" ]; then
    if getent passwd "$USER_NAME" >/dev/null; then
        say "user $USER_NAME exists"
    else
        do_ useradd --system --user-group --home-dir /var/lib/fednca --no-create-home \
            --shell /usr/sbin/nologin --comment "FedNCA edge daemon" "$USER_NAME"
        say "user $USER_NAME created"
    fi
fi

# 2. the virtual environment
if [ -z "${SKIP_VENV:-}" ]; then
    if [ ! -x "$DESTDIR$VENV/bin/python" ]; then
        do_ "$PYTHON" -m venv "$DESTDIR$VENV"
    fi
    if [ -n "$WITH_TORCH" ]; then
        case "$(uname -m)" in
            x86_64) TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu" ;;  # PyPI's x86 wheel is the CUDA one
            *) TORCH_INDEX="" ;;  # aarch64 wheels on PyPI are CPU builds
        esac
        # shellcheck disable=SC2086
        do_ "$DESTDIR$VENV/bin/pip" install --quiet $TORCH_INDEX "torch==2.13.0"
        do_ "$DESTDIR$VENV/bin/pip" install --quiet "$SOURCE[torch]"
        say "installed $SOURCE with PyTorch into $VENV"
    else
        do_ "$DESTDIR$VENV/bin/pip" install --quiet "$SOURCE"
        say "installed $SOURCE into $VENV (no PyTorch: training.trainer numpy)"
    fi
fi

# 3. configuration
do_ install -d -m 0750 "$ETC"
do_ install -d -m 0755 "$ETC/coordinator"
if [ -n "$DRY" ]; then
    say "would write $ETC/daemon.yaml (unless it exists) from $HERE/daemon.example.yaml"
elif [ -e "$ETC/daemon.yaml" ]; then
    say "kept the existing $ETC/daemon.yaml"
else
    PLAIN=""  # a broker without TLS: no TLS files in the skeleton
    case "$BROKER" in mqtt://*) PLAIN="s|^\(  tls:\)|  # tls:|; s|^\(    ca_file:\)|  #   ca_file:|" ;; esac
    sed -e "s|^site: .*|site: ${SITE:-clinic-a}                    # this site's id, as enrolled at the coordinator|" \
        -e "s|^federation: .*|federation: ${FEDERATION:-liver-us}              # the federation's id|" \
        -e "s|^  url: .*|  url: ${BROKER:-mqtts://broker.example.org:8883}|" \
        -e "s|^  # password_file: |  password_file: |" \
        -e "${PLAIN:-s|^||}" \
        "$HERE/daemon.example.yaml" > "$ETC/daemon.yaml.new"
    chmod 0640 "$ETC/daemon.yaml.new"
    mv "$ETC/daemon.yaml.new" "$ETC/daemon.yaml"
    say "wrote $ETC/daemon.yaml: edit site, federation, broker and data"
fi
if [ -z "${SKIP_USER:-}" ] || [ -n "${FEDNCA_USER:-}" ]; then
    do_ chgrp "$USER_NAME" "$ETC" "$ETC/daemon.yaml"
fi

# 4. the site's identity
if [ -e "$ETC/keys/signing.key" ]; then
    say "kept the existing site key in $ETC/keys"
else
    do_ "$FEDNCA" keys generate --role site --out "$ETC/keys"
    say "made the site key in $ETC/keys"
fi

# 5. the unit
do_ install -d -m 0755 "$UNIT_DIR"
if [ -z "$DRY" ]; then
    sed -e "s|/opt/fednca/venv/bin/fednca|$VENV/bin/fednca|" "$HERE/fednca-daemon.service" > "$UNIT_DIR/fednca-daemon.service"
    chmod 0644 "$UNIT_DIR/fednca-daemon.service"
fi
if [ -z "${SKIP_SYSTEMCTL:-}" ]; then
    do_ systemctl daemon-reload
    do_ systemctl enable fednca-daemon.service
fi
say "installed $UNIT_DIR/fednca-daemon.service"

cat <<EOF

Next steps:
  1. Send this site's public key to the federation's operator (to enrol it):
       $VENV/bin/fednca keys show /etc/fednca/keys
  2. From the bundle the operator gives you (BUNDLE: its folder), put the coordinator's keys and,
     for an mqtts:// broker, the broker's CA in place, and the MQTT password (readable by $USER_NAME only):
       install -m 0644 BUNDLE/signing.pub BUNDLE/box.pub /etc/fednca/coordinator/
       install -m 0644 BUNDLE/ca.crt /etc/fednca/ca.crt
       install -m 0600 -o $USER_NAME -g $USER_NAME BUNDLE/mqtt-password /etc/fednca/mqtt-password
  4. Point data.folder in /etc/fednca/daemon.yaml at the images (readable by group $USER_NAME,
     outside /home), then check everything:
       $VENV/bin/fednca daemon --check-config /etc/fednca/daemon.yaml
  5. Start it and watch it:
       systemctl start fednca-daemon && journalctl -fu fednca-daemon
EOF
