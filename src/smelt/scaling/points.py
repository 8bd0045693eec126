"""The scaling points file, ``<run>/scaling/points.csv``: one row per finished training run.

Format version 1 (written by `smelt scaling sweep` through `write_points`, read by `read_points`):

    params           total trainable parameters N (embeddings included: Chinchilla's N, and
                     Pearce & Song 2024 show that dropping them at small scale bends the law)
    tokens           training tokens D actually seen
    flops            6 N D, the budget the fits use (Kaplan et al. 2020; Hoffmann et al. 2022)
    loss             final held-out loss (nats/token), else the last training loss
    budget           the nominal compute budget C of the IsoFLOP profile the run belongs to (empty
                     for a run not on a profile); D = C / 6N rounded to whole optimizer steps
    size             the ladder's size label (e.g. L4-d128)
    params_nonembed  non-embedding parameters (Kaplan et al. 2020's N)
    flops_actual     flops_per_token x D (PaLM's count, attention included)
    run_dir          the run directory the row came from (relative to the points file)
    mode             isoflop or wsd (how the run was made)

`read_points` also accepts a user's CSV with only ``params``, ``loss`` and either ``tokens`` or
``flops`` (then D = C / 6N), e.g. published data, and `#` comment lines.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

from smelt.fsutil import atomic_write_text

FORMAT_VERSION = 1
COLUMNS = ["params", "tokens", "flops", "loss", "budget", "size", "params_nonembed", "flops_actual", "run_dir",
           "mode"]


class PointsError(ValueError):
    """A points file that cannot be fitted: the message names the file, row and column."""


@dataclass
class Point:
    params: float
    tokens: float
    loss: float
    budget: float | None = None
    size: str = ""
    params_nonembed: float | None = None
    flops_actual: float | None = None
    run_dir: str = ""
    mode: str = ""

    @property
    def flops(self) -> float:
        return 6.0 * self.params * self.tokens


def _num(row: dict[str, str], key: str) -> float | None:
    v = (row.get(key) or "").strip()
    return float(v) if v else None


def read_points(path: str | Path) -> list[Point]:
    """Rows of a points CSV; errors name the row and the missing or bad column."""
    p = Path(path)
    if not p.is_file():
        raise PointsError(f"{p}: no such file")
    text = "\n".join(line for line in p.read_text(encoding="utf-8").splitlines() if not line.lstrip().startswith("#"))
    reader = csv.DictReader(io.StringIO(text))
    cols = set(reader.fieldnames or [])
    missing = {"params", "loss"} - cols
    if missing or not ({"tokens", "flops"} & cols):
        has = ", ".join(sorted(cols)) or "none"
        raise PointsError(f"{p}: needs columns params, loss and tokens or flops; has {has}")
    out = []
    for i, row in enumerate(reader, start=2):
        try:
            n, loss = _num(row, "params"), _num(row, "loss")
            d, c = _num(row, "tokens"), _num(row, "flops")
            if n is None or loss is None or (d is None and c is None):
                raise ValueError("params, loss and tokens or flops must be given")
            if d is None:
                d = c / (6.0 * n)  # type: ignore[operator]
            if not (n > 0 and d > 0 and loss > 0 and all(map(math.isfinite, (n, d, loss)))):
                raise ValueError("params, tokens and loss must be positive and finite")
            out.append(Point(params=n, tokens=d, loss=loss, budget=_num(row, "budget"), size=row.get("size") or "",
                             params_nonembed=_num(row, "params_nonembed"), flops_actual=_num(row, "flops_actual"),
                             run_dir=row.get("run_dir") or "", mode=row.get("mode") or ""))
        except ValueError as e:
            raise PointsError(f"{p}, row {i}: {e}") from None
    return out


def write_points(path: str | Path, points: list[Point]) -> None:
    """All rows, atomically (the sweep rewrites the file after each run)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for pt in points:
        w.writerow([f"{pt.params:.0f}", f"{pt.tokens:.0f}", f"{pt.flops:.6e}", f"{pt.loss:.6f}",
                    "" if pt.budget is None else f"{pt.budget:.6e}", pt.size,
                    "" if pt.params_nonembed is None else f"{pt.params_nonembed:.0f}",
                    "" if pt.flops_actual is None else f"{pt.flops_actual:.6e}", pt.run_dir, pt.mode])
    atomic_write_text(Path(path), buf.getvalue())
