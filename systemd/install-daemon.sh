#!/bin/sh
# Install the FedNCA edge daemon on a board (Debian 12, Raspberry Pi OS bookworm, Jetson Linux, a laptop).
#
#   sudo systemd/install-daemon.sh [--source DIR|WHEEL] [--prefix /opt/fednca]
#                                  [--site ID] [--federation ID] [--broker URL]
#
# What it does, each step skipped when already done:
#   1. a system user and group "fednca" (no login, no home);
#   2. a virtual environment in PREFIX/venv with PyTorch 2.13.0 (CPU) and this package;
#   3. /etc/fednca (root:fednca 0750) with daemon.yaml from systemd/daemon.example.yaml (0640),
#      an empty coordinator/ folder for the coordinator's public keys;
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
while [ $# -gt 0 ]; do
    case "$1" in
        --source) SOURCE=$2; shift 2 ;;
        --prefix) PREFIX=$2; shift 2 ;;
        --site) SITE=$2; shift 2 ;;
        --federation) FEDERATION=$2; shift 2 ;;
        --broker) BROKER=$2; shift 2 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
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

if [ -z "$DESTDIR" ] && [ "$(id -u)" != 0 ]; then
    echo "install-daemon: run as root (or set DESTDIR to install below another root)" >&2
    exit 1
fi

# 1. the service user
if [ -z "${SKIP_USER:-}" ]; then
    if getent passwd "$USER_NAME" >/dev/null; then
        say "user $USER_NAME exists"
    else
        useradd --system --user-group --home-dir /var/lib/fednca --no-create-home \
            --shell /usr/sbin/nologin --comment "FedNCA edge daemon" "$USER_NAME"
        say "user $USER_NAME created"
    fi
fi

# 2. the virtual environment
if [ -z "${SKIP_VENV:-}" ]; then
    if [ ! -x "$DESTDIR$VENV/bin/python" ]; then
        python3 -m venv "$DESTDIR$VENV"
    fi
    case "$(uname -m)" in
        x86_64) TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu" ;;  # PyPI's x86 wheel is the CUDA one
        *) TORCH_INDEX="" ;;  # aarch64 wheels on PyPI are CPU builds
    esac
    # shellcheck disable=SC2086
    "$DESTDIR$VENV/bin/pip" install --quiet $TORCH_INDEX "torch==2.13.0"
    "$DESTDIR$VENV/bin/pip" install --quiet "$SOURCE"
    say "installed $SOURCE into $VENV"
fi

# 3. configuration
install -d -m 0750 "$ETC"
install -d -m 0755 "$ETC/coordinator"
if [ -e "$ETC/daemon.yaml" ]; then
    say "kept the existing $ETC/daemon.yaml"
else
    PLAIN=""  # a broker without TLS: no TLS files in the skeleton
    case "$BROKER" in mqtt://*) PLAIN="s|^\(  tls:\)|  # tls:|; s|^\(    ca_file:\)|  #   ca_file:|" ;; esac
    sed -e "s|^site: .*|site: ${SITE:-clinic-a}                    # this site's id, as enrolled at the coordinator|" \
        -e "s|^federation: .*|federation: ${FEDERATION:-liver-us}              # the federation's id|" \
        -e "s|^  url: .*|  url: ${BROKER:-mqtts://broker.example.org:8883}|" \
        -e "${PLAIN:-s|^||}" \
        "$HERE/daemon.example.yaml" > "$ETC/daemon.yaml.new"
    chmod 0640 "$ETC/daemon.yaml.new"
    mv "$ETC/daemon.yaml.new" "$ETC/daemon.yaml"
    say "wrote $ETC/daemon.yaml: edit site, federation, broker and data"
fi
if [ -z "${SKIP_USER:-}" ] || [ -n "${FEDNCA_USER:-}" ]; then
    chgrp "$USER_NAME" "$ETC" "$ETC/daemon.yaml"
fi

# 4. the site's identity
if [ -e "$ETC/keys/signing.key" ]; then
    say "kept the existing site key in $ETC/keys"
else
    "$FEDNCA" keys generate --role site --out "$ETC/keys"
    say "made the site key in $ETC/keys"
fi

# 5. the unit
install -d -m 0755 "$UNIT_DIR"
sed -e "s|/opt/fednca/venv/bin/fednca|$VENV/bin/fednca|" "$HERE/fednca-daemon.service" > "$UNIT_DIR/fednca-daemon.service"
chmod 0644 "$UNIT_DIR/fednca-daemon.service"
if [ -z "${SKIP_SYSTEMCTL:-}" ]; then
    systemctl daemon-reload
    systemctl enable fednca-daemon.service
fi
say "installed $UNIT_DIR/fednca-daemon.service"

cat <<EOF

Next steps:
  1. Send this site's public key to the federation's operator (to enrol it):
       $VENV/bin/fednca keys show /etc/fednca/keys
  2. Put the coordinator's signing.pub and box.pub into /etc/fednca/coordinator/.
  3. Write the MQTT password the operator gives you (one line, root only):
       install -m 0600 /dev/null /etc/fednca/mqtt-password && editor /etc/fednca/mqtt-password
  4. Point data.folder in /etc/fednca/daemon.yaml at the images (readable by group $USER_NAME,
     outside /home), then check everything:
       $VENV/bin/fednca daemon --check-config /etc/fednca/daemon.yaml
  5. Start it and watch it:
       systemctl start fednca-daemon && journalctl -fu fednca-daemon
EOF
