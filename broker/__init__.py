"""The coordinator and everything broker-side."""
