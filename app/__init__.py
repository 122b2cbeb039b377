"""The application layer: the ``fednca`` command line, the demo, the status and fleet views, the
baselines and plots, and the federation harness that composes the coordinator and the daemons.

It sits above ``fednca`` (the core), ``fednca_daemon`` and ``fednca_broker``; none of those imports it.
"""
