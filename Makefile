# Everything a fresh machine needs is set up by the targets themselves.
VENV   ?= .venv
PY     := $(VENV)/bin/python
RUNTIME := $(VENV)/.runtime-stamp
STAMP  := $(VENV)/.test-stamp
PIP    := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: demo test bench mosquitto clean install-daemon install-coordinator

# The demo needs the runtime with PyTorch (setup.cfg's [torch] extra: the coordinator's model and the
# exporter; a site's own install leaves it out); the tests add pytest, pytest-timeout and
# hypothesis (the [test] extra).
$(RUNTIME): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) -e '.[torch]'
	touch $@

# The tests of `fednca reproduce` need its extra (unet, matplotlib); unet asks for torch unpinned, so
# it is resolved in the same pip command as the [torch] pin.
$(STAMP): $(RUNTIME)
	$(PIP) -e '.[torch,test]'
	$(PIP) -e '.[torch,test,reproduce]'
	touch $@

# mosquitto backs the real-broker tests (faketime, the hostile-clock ones); install them when missing
# and we may (root + apt-get).
mosquitto:
	@{ command -v mosquitto && command -v faketime; } >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients faketime >/dev/null; \
	  else echo "mosquitto or faketime missing and not root: the tests that need them will be skipped"; fi; }

# The demo sets up a federation as an operator would: its broker password file needs mosquitto_passwd.
demo: $(RUNTIME) mosquitto
	$(VENV)/bin/fednca demo

test: $(STAMP) mosquitto
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/run_all.py

# Install the edge daemon on this board (as root): user, venv without PyTorch, /etc/fednca skeleton,
# systemd unit. ARGS=--with-torch adds PyTorch (for training.trainer: torch), ARGS=--dry-run shows the steps.
install-daemon:
	systemd/install-daemon.sh --source . $(ARGS)

# Install the coordinator on the hub (as root): user, venv, /etc/fednca/mosquitto and
# /var/lib/fednca-coordinator, its unit and mosquitto's drop-in. ARGS=--dry-run shows the steps.
install-coordinator:
	systemd/install-coordinator.sh --source . $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
