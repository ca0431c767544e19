"""Result statistics and output formats for ``ucxkv-perftest``.

Everything here mirrors ``ucx_perftest`` so the two can be read side by side:

* latency columns are microseconds; for latency tests they are one-way
  (half a round trip), for bandwidth tests they are the time per message
  (``ucx_perftest`` calls that column "overhead");
* "MB/s" is MiB/s (2**20 bytes per second);
* message rate is messages per second;
* a row is printed per reporting interval (1 s), the last one is ``Final:``.

``-v`` gives CSV with ucx_perftest's header, ``--json`` one JSON object per size.
"""

from __future__ import annotations

import json
import logging
import re
import statistics
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence, TextIO

import numpy as np

log = logging.getLogger(__name__)

CSV_HEADER = "iterations,50.0_percentile_lat,avg_lat,overall_lat,avg_bw,overall_bw,avg_mr,overall_mr"
MIB = float(1 << 20)
REPORT_INTERVAL_S = 1.0

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
          "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}


# --------------------------------------------------------------------------- sizes
def parse_size(text: str) -> int:
    """``"8"``, ``"4K"``, ``"1M"``, ``"2GiB"`` -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"bad size {text!r} (examples: 8, 4K, 1M, 1G)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def parse_sizes(text: str) -> list[int]:
    """Parse a size list: ``8,1K,1M`` and/or ranges ``4K:64M`` (powers of two, both ends included)."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if ":" in part:
            lo_s, hi_s = part.split(":", 1)
            lo, hi = parse_size(lo_s), parse_size(hi_s)
            if lo <= 0 or hi < lo:
                raise ValueError(f"bad size range {part!r}: need 0 < start <= end")
            s = lo
            while s <= hi:
                out.append(s)
                s *= 2
            if out[-1] != hi:
                out.append(hi)
        else:
            out.append(parse_size(part))
    if not out:
        raise ValueError(f"no sizes in {text!r}")
    return out


def human_size(n: int) -> str:
    """Bytes as a short binary-unit string (``64M``, ``8``)."""
    for unit, div in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


# --------------------------------------------------------------------------- stats
@dataclass
class Row:
    """One line of the report: ucx_perftest's eight numbers."""

    iterations: int
    p50_lat_us: float
    avg_lat_us: float
    overall_lat_us: float
    avg_bw_mbs: float
    overall_bw_mbs: float
    avg_mr: float
    overall_mr: float

    def csv(self) -> str:
        """The row as ucx_perftest ``-v`` prints it."""
        return (f"{self.iterations},{self.p50_lat_us:.3f},{self.avg_lat_us:.3f},{self.overall_lat_us:.3f},"
                f"{self.avg_bw_mbs:.2f},{self.overall_bw_mbs:.2f},{self.avg_mr:.0f},{self.overall_mr:.0f}")


@dataclass
class Result:
    """All rows of one (test, size) run plus what it ran on."""

    test: str
    size: int
    impl: str = "ucxkv"
    stages: list[Row] = field(default_factory=list)
    final: Row | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (the ``Final`` row flattened in, stages kept as a list)."""
        d: dict[str, Any] = {"impl": self.impl, "test": self.test, "size": self.size}
        if self.final is not None:
            d.update(asdict(self.final))
        d["stages"] = [asdict(r) for r in self.stages]
        d.update(self.info)
        return d


def _row(iters: int, durs: np.ndarray, interval_s: float, elapsed_s: float, size: int) -> Row:
    n = max(len(durs), 1)
    avg = interval_s / n
    overall = elapsed_s / max(iters, 1)
    p50 = float(np.median(durs)) if len(durs) else avg

    def bw(t: float) -> float:
        return size / t / MIB if t > 0 else 0.0

    def mr(t: float) -> float:
        return 1.0 / t if t > 0 else 0.0

    return Row(iters, p50 * 1e6, avg * 1e6, overall * 1e6, bw(avg), bw(overall), mr(avg), mr(overall))


def compute_rows(test: str, size: int, ends_s: Sequence[float], durs_s: Sequence[float] | None = None,
                 elapsed_s: float | None = None, one_way_div: float = 1.0,
                 interval_s: float = REPORT_INTERVAL_S) -> Result:
    """Build a :class:`Result` from per-iteration completion times.

    Args:
        ends_s: completion time of each measured iteration, seconds since the
            measured phase started.
        durs_s: per-iteration durations (defaults to differences of ``ends_s``).
        elapsed_s: total measured time (defaults to the last end); bandwidth
            tests pass the time including the receiver's final ack.
        one_way_div: 2.0 for ping-pong tests (report half the round trip).
    """
    ends = np.asarray(ends_s, dtype=np.float64)
    if durs_s is None:
        durs = np.diff(np.concatenate(([0.0], ends)))
    else:
        durs = np.asarray(durs_s, dtype=np.float64)
    ends = ends / one_way_div
    durs = durs / one_way_div
    total = (float(ends[-1]) if len(ends) else 0.0) if elapsed_s is None else elapsed_s / one_way_div
    if len(ends):  # stretch the last completion to the full elapsed time (ack included)
        ends = ends.copy()
        ends[-1] = max(ends[-1], total)
    res = Result(test=test, size=size)
    # Stage rows: one per reporting interval (wall-clock, so use the un-halved scale).
    start_i, t_prev = 0, 0.0
    boundary = interval_s / one_way_div
    for i in range(len(ends)):
        if ends[i] >= boundary and i + 1 < len(ends):
            seg = durs[start_i:i + 1]
            res.stages.append(_row(i + 1, seg, float(ends[i] - t_prev), float(ends[i]), size))
            start_i, t_prev = i + 1, float(ends[i])
            boundary = ends[i] + interval_s / one_way_div
    res.final = _row(len(ends), durs, total, total, size)
    return res


def result_from_row(test: str, size: int, impl: str, row: Row, info: dict[str, Any] | None = None) -> Result:
    """Wrap a single (e.g. parsed or baseline) row as a :class:`Result`."""
    return Result(test=test, size=size, impl=impl, final=row, info=dict(info or {}))


# --------------------------------------------------------------------------- table
_BAR = "+--------------+--------------+------------------------------+---------------------+-----------------------+"
_SUB = "+--------------+--------------+----------+---------+---------+----------+----------+-----------+-----------+"
_BOX = "+" + "-" * (len(_BAR) - 2) + "+"


def header_box(lines: Iterable[tuple[str, str]], out: TextIO) -> None:
    """ucx_perftest's description box (API, test, memory types, size...)."""
    width = len(_BAR) - 4
    print(_BOX, file=out)
    for k, v in lines:
        print(f"| {(k + ':').ljust(14)}{v}".ljust(width + 2)[: width + 2] + " |", file=out)
    print(_BOX, file=out)


def table_header(is_latency: bool, out: TextIO) -> None:
    """The column header of ucx_perftest's table."""
    what = ("       " + ("latency (usec)" if is_latency else "overhead (usec)")).ljust(30)
    print(_BAR, file=out)
    print(f"|              |              |{what}|   bandwidth (MB/s)  |  message rate (msg/s) |", file=out)
    print(_SUB, file=out)
    print("|    Stage     | # iterations | 50.0%ile | average | overall |  average |  overall |  average  |  overall  |",
          file=out)
    print(_SUB, file=out)


def format_row(row: Row, label: str = "") -> str:
    """One table row, column widths as ucx_perftest prints them."""
    return (f"{label:<14}{row.iterations:>14d} {row.p50_lat_us:10.3f} {row.avg_lat_us:9.3f} {row.overall_lat_us:9.3f} "
            f"{row.avg_bw_mbs:11.2f} {row.overall_bw_mbs:10.2f} {row.avg_mr:11.0f} {row.overall_mr:11.0f}")


def print_table(res: Result, is_latency: bool, out: TextIO, header: bool = True) -> None:
    """Stage rows then ``Final:``."""
    if header:
        table_header(is_latency, out)
    for r in res.stages:
        print(format_row(r), file=out)
    assert res.final is not None
    print(format_row(res.final, "Final:"), file=out)


def parse_table(text: str) -> list[Row]:
    """Parse every ``Final:`` row of a table (ucx_perftest's or ours)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("Final:"):
            rows.append(_row_from_numbers(line.split()[1:]))
    return rows


def parse_csv(text: str) -> list[Row]:
    """Parse the data rows that follow a ``-v`` CSV header."""
    rows, on = [], False
    for line in text.splitlines():
        if line.strip() == CSV_HEADER:
            on = True
            continue
        if on and re.fullmatch(r"[\d.,eE+-]+", line.strip() or "x") and line.count(",") == 7:
            rows.append(_row_from_numbers(line.strip().split(",")))
    return rows


def _row_from_numbers(nums: Sequence[str]) -> Row:
    if len(nums) < 8:
        raise ValueError(f"expected 8 numbers, got {list(nums)}")
    v = [float(x) for x in nums[:8]]
    return Row(int(v[0]), *v[1:])


# --------------------------------------------------------------------------- comparison, JSON, progress, plot
def print_comparison(ours: Result, baselines: dict[str, Result | str], is_latency: bool, out: TextIO) -> None:
    """Side by side: ucxkv vs each baseline, with the ratio (ucxkv / baseline; >1 = ucxkv better)."""
    assert ours.final is not None
    metric = "overall_lat_us" if is_latency else "overall_bw_mbs"
    unit = "usec (one-way)" if is_latency else "MB/s"
    mine = getattr(ours.final, metric)
    w = max([14] + [len(n) for n in baselines])
    print(f"  size {human_size(ours.size):>6}  {'impl':<{w}} {unit:>16}  ratio(ucxkv/impl, >1 = ucxkv better)", file=out)
    print(f"  {'':11}  {'ucxkv':<{w}} {mine:16.3f}", file=out)
    for name, b in baselines.items():
        if isinstance(b, str) or b.final is None:
            print(f"  {'':11}  {name:<{w}} {'skipped':>16}  ({b if isinstance(b, str) else 'no result'})", file=out)
            continue
        theirs = getattr(b.final, metric)
        ratio = (theirs / mine if is_latency else mine / theirs) if mine and theirs else float("nan")
        tls = b.info.get("tls")
        extra = f"  [{tls}]" if tls else ""
        print(f"  {'':11}  {name:<{w}} {theirs:16.3f}  {ratio:6.2f}x{extra}", file=out)


def json_line(ours: Result, baselines: dict[str, Result | str], extra: dict[str, Any] | None = None) -> str:
    """One JSON object for one size: our result plus a ``baselines`` mapping (and ``extra``'s keys)."""
    d = ours.to_json()
    d["baselines"] = {k: (v.to_json() if isinstance(v, Result) else {"skipped": v}) for k, v in baselines.items()}
    if extra:
        d.update(extra)
    return json.dumps(d, sort_keys=True)


def round_ratios(rounds: Sequence[tuple[Sequence[Result], dict[str, dict[int, Result | str]]]], is_latency: bool
                 ) -> dict[int, dict[str, list[tuple[float, float, float]]]]:
    """size -> baseline -> one (ucxkv, baseline, ratio) per round where both have a figure, in round order.

    The ratio is ucxkv / baseline for bandwidth and baseline / ucxkv for latency (> 1: ucxkv better), each
    round's ucxkv figure against the baseline run in that same round."""
    metric = "overall_lat_us" if is_latency else "overall_bw_mbs"
    out: dict[int, dict[str, list[tuple[float, float, float]]]] = {}
    for ours, base in rounds:
        for r in ours:
            if r.final is None:
                continue
            mine = getattr(r.final, metric)
            for name, per in base.items():
                b = per.get(r.size)
                if not isinstance(b, Result) or b.final is None:
                    continue
                theirs = getattr(b.final, metric)
                if not (mine and theirs):
                    continue
                ratio = theirs / mine if is_latency else mine / theirs
                out.setdefault(r.size, {}).setdefault(name, []).append((mine, theirs, ratio))
    return out


def print_round_summary(rounds: Sequence[tuple[Sequence[Result], dict[str, dict[int, Result | str]]]],
                        is_latency: bool, out: TextIO) -> None:
    """Min / median / max over the rounds of ucxkv, of each baseline and of their same-round ratio."""
    unit = "usec (one-way)" if is_latency else "MB/s"
    print(f"\nSummary over {len(rounds)} rounds ({unit}; min / median / max; the ratio is each round's ucxkv "
          "figure against the baseline run in the same round, >1 = ucxkv better)", file=out)
    for size, per in round_ratios(rounds, is_latency).items():
        for name, rows in per.items():
            cols = [_spread([row[i] for row in rows]) for i in range(3)]
            print(f"  size {human_size(size):>6}  ucxkv {cols[0]:<28} {name} {cols[1]:<28} "
                  f"ratio {_spread([row[2] for row in rows], '.2f')}x  ({len(rows)} rounds)", file=out)


def _spread(xs: Sequence[float], fmt: str = ".1f") -> str:
    """``min / median / max`` of ``xs``."""
    s = sorted(xs)
    return " / ".join(format(v, fmt) for v in (s[0], statistics.median(s), s[-1]))


class Progress:
    """A one-line progress bar on stderr (only for sweeps of more than one size)."""

    def __init__(self, total: int, enabled: bool = True, out: TextIO | None = None):
        self.total, self.done = total, 0
        self.enabled = enabled and total > 1
        self.out = out or sys.stderr

    def step(self, what: str) -> None:
        """Mark one more item done; ``what`` names it."""
        self.done += 1
        if not self.enabled:
            return
        width = 30
        fill = int(width * self.done / self.total)
        self.out.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} {what:<16}")
        if self.done == self.total:
            self.out.write("\n")
        self.out.flush()


def plot(results: dict[str, list[Result]], path: str, title: str) -> None:
    """Bandwidth (MiB/s) vs message size, one line per implementation, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for impl, rs in results.items():
        pts = sorted((r.size, r.final.overall_bw_mbs) for r in rs if r.final is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("bandwidth (MB/s = MiB/s)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    log.info("wrote plot %s", path)
