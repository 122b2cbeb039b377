"""Handlers of the `fednca` subcommands: argument parsing and printing around the library."""
