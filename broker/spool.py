"""The verified deltas of the open round, kept so that closing it opens no update a second time.

Each update is unsealed, verified and parsed once, when it arrives. Its delta (float32, the model's
tensors one after another) is then written here as one row, at the moment its payload is stored;
the close aggregates these rows (:func:`fednca.aggregate_rows.aggregate_rows`) without any crypto.

Why on disk and not in memory: the default rule, a trimmed mean, needs every update at once, and
ten thousand float32 rows of the 7,262-parameter model are 290 MB (145 MB in float16). Written to
the store's folder, they cost the coordinator no memory: the page cache holds them, and the close
reads one block of columns for all rows at a time. Rows are split over column files of ``WIDTH``
values (``c000.f32``, ``c001.f32``, ...; row ``r`` of a file sits at ``r x width x 4``), so a
block of columns is one sequential read, and one row is a read per file.

Not durable, on purpose: nothing here is fsynced and the index of rows lives in memory. The
payloads in the store are the record; after a restart the spool of the round is made again from
them (each counted update opened once more, the only time one is), see
:meth:`DeltaSpool.missing`.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from fednca.aggregate import AggregationConfig, AggregationError, check_model
from fednca.aggregate import apply as apply_delta
from fednca.aggregate_rows import Layout, aggregate_rows

from .errors import StoreError

WIDTH = 512  # values per column file: a block of columns for 10,000 rows is 20 MB
Key = tuple[str, str]  # (site, update id)


class DeltaSpool:
    """Rows of float32 deltas of one round, keyed by (site, update id), in column files."""

    def __init__(self, *, folder: Path, layout: Layout) -> None:
        self.folder = folder
        self.layout = list(layout)
        self.size = sum(math.prod(shape) for _, shape in self.layout)
        self._columns = [(j, min(j + WIDTH, self.size)) for j in range(0, self.size, WIDTH)]
        self._rows: dict[Key, int] = {}
        self._norms: list[float] = []
        if folder.exists():
            shutil.rmtree(folder)  # rows of an earlier process: their index is gone with it
        folder.mkdir(mode=0o700, parents=True)
        self._fds = [os.open(folder / f"c{c:03d}.f32", os.O_RDWR | os.O_CREAT, 0o600) for c in range(len(self._columns))]

    def add(self, key: Key, row: np.ndarray, norm: float) -> None:
        """Keep ``row`` (``size`` float32 values) as ``key``'s delta, whose global norm is ``norm``."""
        if key in self._rows:
            return  # the same update stored again (a re-delivery): its row is already here
        if row.dtype != np.float32 or row.shape != (self.size,):
            raise StoreError(f"a spooled delta must be {self.size} float32 values, got {row.dtype} {row.shape}")
        r = len(self._norms)
        for fd, (j0, j1) in zip(self._fds, self._columns):
            data = row[j0:j1].tobytes()
            if os.pwrite(fd, data, r * len(data)) != len(data):
                raise StoreError(f"{self.folder}: short write")
        self._rows[key] = r
        self._norms.append(float(norm))

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def missing(self, keys: Sequence[Key]) -> list[Key]:
        """The keys of ``keys`` that have no row (updates counted before a restart)."""
        return [k for k in keys if k not in self._rows]

    def rows(self, keys: Sequence[Key]) -> "SpoolRows":
        """The rows of ``keys``, in that order (the round's acceptance order)."""
        missing = self.missing(keys)
        if missing:
            raise StoreError(f"{self.folder}: no delta kept for update {missing[0][1]} of site {missing[0][0]!r}")
        return SpoolRows(self, [self._rows[k] for k in keys])

    def norms(self, keys: Sequence[Key]) -> list[float]:
        return [self._norms[self._rows[k]] for k in keys]

    def remove(self) -> None:
        """Close the files and delete them (the round is aggregated)."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        shutil.rmtree(self.folder, ignore_errors=True)

    def _block(self, c: int) -> np.ndarray:
        j0, j1 = self._columns[c]
        count = len(self._norms) * (j1 - j0)
        data = os.pread(self._fds[c], count * 4, 0)
        if len(data) != count * 4:
            raise StoreError(f"{self.folder}: column file {c} is short")
        return np.frombuffer(data, dtype=np.float32).reshape(len(self._norms), j1 - j0)

    def _row(self, r: int) -> np.ndarray:
        parts = []
        for fd, (j0, j1) in zip(self._fds, self._columns):
            n = (j1 - j0) * 4
            parts.append(np.frombuffer(os.pread(fd, n, r * n), dtype=np.float32))
        return np.concatenate(parts)


class SpoolRows:
    """The :class:`fednca.aggregate_rows.Rows` of some of a spool's rows, in a given order."""

    def __init__(self, spool: DeltaSpool, rows: list[int]) -> None:
        self._spool = spool
        self._index = np.asarray(rows, dtype=np.int64)
        self._identity = rows == list(range(len(spool._norms)))
        self.n = len(rows)
        self.size = spool.size

    def row(self, i: int) -> np.ndarray:
        return self._spool._row(int(self._index[i]))

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        for c, (j0, _) in enumerate(self._spool._columns):
            block = self._spool._block(c)
            yield j0, block if self._identity else block[self._index]


def next_model(
    previous: dict[str, np.ndarray], rows: SpoolRows, *, weights: Sequence[float], norms: Sequence[float],
    layout: Layout, cfg: AggregationConfig,
) -> tuple[dict[str, np.ndarray], str | None]:  # fmt: skip
    """The next global model and None, or the previous model and why the aggregate was refused
    (over spooled rows): nothing a site sends stops the
    coordinator; a refused aggregate keeps the model the federation had."""
    try:
        candidate = apply_delta(previous, aggregate_rows(rows, weights=weights, norms=norms, layout=layout, cfg=cfg))
    except AggregationError as e:
        return dict(previous), f"aggregation failed: {e}"
    problem = check_model(candidate, previous, cfg)
    if problem is not None:
        return dict(previous), problem
    return candidate, None
