"""The ``fednca`` command line.

Each subcommand lives in its own module, named in ``COMMANDS``, which provides
``configure(parser)`` and ``run(args) -> int``. Only the chosen subcommand's module is imported,
so ``fednca segment`` never loads PyTorch and ``fednca --help`` is instant.

A :class:`~fednca.errors.FedNCAError` (bad input, bad configuration) is printed as one line
naming what is at fault, with exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fednca.errors import FedNCAError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "phantom": ("fednca_app.commands.phantom", "write a phantom ultrasound dataset folder for one site"),
    "train": ("fednca_app.commands.train", "train the model on one machine (local or pooled data)"),
    "keys": ("fednca_app.commands.keys", "generate and show site or coordinator keys"),
    "wire": ("fednca_app.commands.wire", "print the wire size of an update and a round announcement"),
    "export": ("fednca_app.commands.export", "export a trained model to ONNX"),
    "segment": ("fednca_app.commands.segment", "segment images with an ONNX model (no PyTorch)"),
    "coordinator": ("fednca_broker.cli", "set up and run a federation's coordinator"),
    "daemon": ("fednca_daemon.cli", "run or check the edge daemon of one site"),
    "demo": ("fednca_app.commands.demo", "run a small federation end to end and report it"),
    "status": ("fednca_app.commands.status", "show the live state of a federation's sites"),
    "reproduce": ("fednca_app.commands.reproduce", "the FedNCA paper's figure: FedNCA against federated UNets, Dice against bytes"),
}


def _top_parser() -> argparse.ArgumentParser:
    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="fednca",
        description="Federated NCA segmentation for clinic edge devices.",
        epilog=f"commands:\n{listing}\n\nRun 'fednca COMMAND --help' for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        _top_parser().parse_args(argv[:1] or ["--help"])
        return 2
    name, rest = argv[0], argv[1:]
    module_name, text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"fednca {name}", description=text)
    module.configure(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except FedNCAError as e:
        print(f"fednca {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
