#!/bin/sh
# Install the FedNCA coordinator and its mosquitto on a hub (Debian 12 with Debian's mosquitto).
#
#   sudo systemd/install-coordinator.sh [--source DIR|WHEEL] [--prefix /opt/fednca]
#                                       [--root DIR] [--dry-run]
#
# What it does, each step skipped when already done:
#   1. checks Python (3.11 or newer) and that mosquitto is installed (apt-get installs it as root);
#   2. a system user and group "fednca-coordinator" (no login, home /var/lib/fednca-coordinator);
#   3. a virtual environment in PREFIX/venv with PyTorch 2.13.0 (CPU) and this package with its
#      [torch] extra (the coordinator builds the initial model with PyTorch);
#   4. the layout: /var/lib/fednca-coordinator (the federation folder, fednca-coordinator 0700),
#      /etc/fednca/mosquitto (the broker's files, root:mosquitto 0750; /etc/fednca may be entered
#      by mosquitto), /var/lib/fednca-mosquitto (mosquitto's persistence, mosquitto 0700);
#   5. fednca-coordinator.service in /etc/systemd/system (enabled, not started) and the drop-in
#      /etc/systemd/system/mosquitto.service.d/fednca.conf that starts mosquitto on the federation's
#      conf.
# It then prints the `fednca coordinator init` command to run (the federation's name and address).
#
# --root DIR installs below DIR (a scratch root: no user is made, nothing is chowned, systemctl is
# not run); --dry-run prints each step instead of doing it. For packaging and tests: SKIP_VENV=1
# leaves the virtual environment out; SKIP_USER=1 and SKIP_SYSTEMCTL=1 as for install-daemon.sh.
set -eu

SOURCE=$(cd "$(dirname "$0")/.." && pwd)
HERE=$(cd "$(dirname "$0")" && pwd)
PREFIX=/opt/fednca
ROOT=""
DRY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --source) SOURCE=$2; shift 2 ;;
        --prefix) PREFIX=$2; shift 2 ;;
        --root) ROOT=$2; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "install-coordinator: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

USER_NAME=fednca-coordinator
BROKER_USER=mosquitto
FED_DIR=/var/lib/fednca-coordinator
BROKER_DIR=/etc/fednca/mosquitto
BROKER_DATA=/var/lib/fednca-mosquitto
VENV="$PREFIX/venv"
UNIT_DIR="$ROOT/etc/systemd/system"
[ -n "$ROOT" ] && { SKIP_USER=1; SKIP_SYSTEMCTL=1; }

say() { printf 'install-coordinator: %s\n' "$*"; }
do_() { if [ -n "$DRY" ]; then printf 'would run: %s\n' "$*"; else "$@"; fi; }
# A file from a template with sed expressions; $1 template, $2 target, $3 mode, rest sed args.
render() {
    src=$1; dst=$2; mode=$3; shift 3
    if [ -n "$DRY" ]; then printf 'would write: %s (mode %s) from %s\n' "$dst" "$mode" "$src"; return; fi
    sed "$@" "$src" > "$dst.new" && chmod "$mode" "$dst.new" && mv "$dst.new" "$dst"
}
owned() {  # chown only on the real machine, where the users exist
    [ -n "${SKIP_USER:-}" ] && return 0
    do_ chown "$@"
}

if [ -z "$ROOT" ] && [ -z "$DRY" ] && [ "$(id -u)" != 0 ]; then
    echo "install-coordinator: run as root (or --root DIR to install below another root, --dry-run to look)" >&2
    exit 1
fi

# 1. Python and mosquitto
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "install-coordinator: needs Python 3.11 or newer; $PYTHON is $("$PYTHON" -V 2>&1 || echo missing)" >&2
    exit 1
fi
if [ -z "${SKIP_USER:-}" ] && ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    do_ apt-get update -qq
    do_ apt-get install -y mosquitto
fi
if [ -z "${SKIP_USER:-}" ] && ! getent passwd "$BROKER_USER" >/dev/null && [ -z "$DRY" ]; then
    echo "install-coordinator: no $BROKER_USER user: install Debian's mosquitto package (apt-get install mosquitto)" >&2
    exit 1
fi

# 2. the service user
if [ -z "${SKIP_USER:-}" ]; then
    if getent passwd "$USER_NAME" >/dev/null; then
        say "user $USER_NAME exists"
    else
        do_ useradd --system --user-group --home-dir "$FED_DIR" --no-create-home \
            --shell /usr/sbin/nologin --comment "FedNCA coordinator" "$USER_NAME"
        say "user $USER_NAME created"
    fi
fi

# 3. the virtual environment
if [ -z "${SKIP_VENV:-}" ]; then
    [ -x "$ROOT$VENV/bin/python" ] || do_ "$PYTHON" -m venv "$ROOT$VENV"
    case "$(uname -m)" in
        x86_64) TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu" ;;  # PyPI's x86 wheel is the CUDA one
        *) TORCH_INDEX="" ;;
    esac
    # shellcheck disable=SC2086
    do_ "$ROOT$VENV/bin/pip" install --quiet $TORCH_INDEX "torch==2.13.0"
    do_ "$ROOT$VENV/bin/pip" install --quiet "$SOURCE[torch]"
    say "installed $SOURCE into $VENV"
fi

# 4. the layout
do_ install -d -m 0755 "$ROOT/etc/fednca"
do_ chmod o+x "$ROOT/etc/fednca"  # mosquitto must pass through it (made 0750 by install-daemon.sh)
do_ install -d -m 0750 "$ROOT$BROKER_DIR"
owned "root:$BROKER_USER" "$ROOT$BROKER_DIR"
do_ install -d -m 0700 "$ROOT$BROKER_DATA"
owned "$BROKER_USER:$BROKER_USER" "$ROOT$BROKER_DATA"
do_ install -d -m 0700 "$ROOT$FED_DIR"
owned "$USER_NAME:$USER_NAME" "$ROOT$FED_DIR"
say "laid out $FED_DIR, $BROKER_DIR and $BROKER_DATA"

# 5. the units
do_ install -d -m 0755 "$UNIT_DIR" "$UNIT_DIR/mosquitto.service.d"
render "$HERE/fednca-coordinator.service" "$UNIT_DIR/fednca-coordinator.service" 0644 \
    -e "s|/opt/fednca/venv/bin/fednca|$VENV/bin/fednca|"
render "$HERE/mosquitto-fednca.conf" "$UNIT_DIR/mosquitto.service.d/fednca.conf" 0644 \
    -e "s|/etc/fednca/mosquitto/mosquitto.conf|$BROKER_DIR/mosquitto.conf|"
if [ -z "${SKIP_SYSTEMCTL:-}" ]; then
    do_ systemctl daemon-reload
    do_ systemctl enable fednca-coordinator.service
fi
say "installed $UNIT_DIR/fednca-coordinator.service and $UNIT_DIR/mosquitto.service.d/fednca.conf"

cat <<EOF

Next steps (docs/operations.md):
  1. Set up the federation (HUB: the name or address sites connect to; repeat --tls-name for each):
       $VENV/bin/fednca coordinator init $FED_DIR --federation clinics \\
           --broker mqtts://HUB:8883 --listen 0.0.0.0:8883 --tls-name HUB \\
           --broker-dir $BROKER_DIR --broker-data-dir $BROKER_DATA
  2. Start mosquitto on the federation's files, then the coordinator:
       systemctl restart mosquitto && systemctl start fednca-coordinator
       journalctl -fu fednca-coordinator
  3. Enrol each site (it sends you its signing.pub), hand it the bundle, reload mosquitto:
       $VENV/bin/fednca coordinator enroll $FED_DIR SITE signing.pub --out /root/bundle-SITE
       systemctl reload mosquitto
EOF
