# Everything a fresh machine needs is set up by the targets themselves.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test bench mosquitto clean install-daemon

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# mosquitto backs the real-broker tests; install it when missing and we may (root + apt-get).
mosquitto:
	@command -v mosquitto >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null; \
	  else echo "mosquitto missing and not root: real-broker tests will be skipped"; fi; }

demo: $(STAMP)
	$(VENV)/bin/fednca demo

test: $(STAMP) mosquitto
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/run_all.py

# Install the edge daemon on this board (as root): user, venv, /etc/fednca skeleton, systemd unit.
install-daemon:
	systemd/install-daemon.sh --source .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
