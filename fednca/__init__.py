"""FedNCA edge: federated training of a tiny Neural Cellular Automaton segmenter on edge devices."""

__version__ = "0.1.0"
