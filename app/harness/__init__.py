"""The federation harness: a federation set up as an operator would, and run on one machine.

``fednca demo``, the end-to-end tests, the mosquitto test fixture and the coordinator benchmark
all need the same things, and take them from here:

* :func:`set_up` makes a federation folder with the real commands (``fednca coordinator init``,
  ``enroll``), each site's signing keys and enrolment bundle, and one daemon YAML per site, with
  the model and training configuration given (the demo's, or a tiny one for tests);
* :class:`Mosquitto` runs mosquitto on 127.0.0.1 from files that ``fednca_broker.mosquitto``
  generated (:meth:`Mosquitto.for_coordinator` from a federation's configuration), and can stop,
  kill, restart and reload it;
* :class:`InProcessParties` runs the coordinator and every site daemon in this process on the
  in-memory broker (a thread each), :class:`ProcessParties` runs them as OS processes
  (``python -m fednca_app.cli coordinator run`` and ``... daemon --config``), each in a process
  group of its own, so that any one can be killed (with its trainer child), stopped, restarted.
  Both read the sites' latest telemetry with the read-only observer account ``fednca-monitor``;
* :class:`Link` puts a bad link (a :class:`Profile`: bandwidth, latency, outages, cuts) between a
  party and the broker, a TCP proxy on 127.0.0.1; :class:`Links` is a set of them.

Broker-side files are always made by ``fednca_broker``'s public functions, never rewritten here,
so what an operator's ``fednca coordinator init`` produces is what the harness runs.
"""

from .folder import FederationFolder, SitePaths, set_up
from .link_proxy import Link, Links
from .links import Profile
from .parties import CLI, InProcessParties, ProcessParties
from .processes import (STOP_TIMEOUT, HarnessError, Mosquitto, Process, free_port, killpg, listening,
                        mosquitto_binary, survivors)

__all__ = ["CLI", "STOP_TIMEOUT", "FederationFolder", "HarnessError", "InProcessParties", "Link", "Links",
           "Mosquitto", "Process", "ProcessParties", "Profile", "SitePaths", "free_port", "killpg", "listening",
           "mosquitto_binary", "set_up", "survivors"]
