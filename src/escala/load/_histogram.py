"""Latency histograms that merge without loss: HdrHistogram, in microseconds.

A percentile of many processes is not the average of their percentiles. Each generator
process records every latency into log-bucketed counts (HdrHistogram: a fixed relative
precision at every magnitude), ships the counts (compressed, base64) to the parent, and the
parent adds them: the merged histogram is exactly the one a single process would have
recorded with all the values.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from hdrh.histogram import HdrHistogram

__all__ = ["PERCENTILES", "Histogram"]

# 1 µs to an hour covers any latency a bounded run can see.
_LOWEST = 1
_HIGHEST = 3_600_000_000
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


class Histogram:
    """Latencies in seconds, kept to ``digits`` significant digits (3: within 0.1%).

    Args:
        digits: significant decimal digits kept at every magnitude; 2 takes a tenth of the
            memory of 3 (about 26 kB against 190 kB) and suits per-second timelines.
    """

    __slots__ = ("_hdr",)

    def __init__(self, digits: int = 3) -> None:
        self._hdr = HdrHistogram(_LOWEST, _HIGHEST, digits)

    def record(self, seconds: float, count: int = 1) -> None:
        """Add ``count`` latencies of ``seconds`` (clamped to 1 µs … 1 h)."""
        micros = min(max(round(seconds * 1e6), _LOWEST), _HIGHEST)
        self._hdr.record_value(micros, count)

    def add(self, other: Histogram) -> None:
        """Add every value of ``other`` into this one (lossless for equal precision)."""
        self._hdr.add(other._hdr)

    def encode(self) -> bytes:
        """Return the counts compressed and base64-encoded (HdrHistogram's V2 format)."""
        encoded: bytes = self._hdr.encode()
        return encoded

    @classmethod
    def decode(cls, encoded: bytes | str) -> Histogram:
        """Return the histogram that :meth:`encode` wrote."""
        made = cls.__new__(cls)
        made._hdr = HdrHistogram.decode(encoded)
        return made

    @classmethod
    def merged(cls, parts: Sequence[Histogram], digits: int = 3) -> Histogram:
        """Return one histogram holding the values of all ``parts``."""
        total = cls(digits)
        for part in parts:
            total.add(part)
        return total

    @property
    def count(self) -> int:
        """How many values were recorded."""
        return int(self._hdr.get_total_count())

    def percentile(self, percent: float) -> float:
        """Return the latency in seconds below which ``percent`` of values fall (0 if none)."""
        if not self.count:
            return 0.0
        return float(self._hdr.get_value_at_percentile(percent)) / 1e6

    @property
    def max(self) -> float:
        """The largest value in seconds (to the histogram's precision; 0 if none)."""
        return float(self._hdr.get_max_value()) / 1e6 if self.count else 0.0

    @property
    def mean(self) -> float:
        """The mean in seconds (0 if none)."""
        return float(self._hdr.get_mean_value()) / 1e6 if self.count else 0.0

    def summary(self) -> dict[str, float]:
        """Return p50, p90, p99, p99.9 and max in seconds."""
        out = {f"p{p:g}": self.percentile(p) for p in PERCENTILES}
        out["max"] = self.max
        return out

    def spectrum(self, ticks: int = 5) -> Iterator[tuple[float, float]]:
        """Yield (percentile, seconds) pairs from 0 up to 100, finer towards the tail.

        The steps halve the distance to 100% ``ticks`` times per halving, as in
        HdrHistogram's own percentile distribution, so the tail gets as many points as the
        body.
        """
        if not self.count:
            return
        for step in self._hdr.get_percentile_iterator(ticks):
            yield float(step.percentile_level_iterated_to), float(step.value_iterated_to) / 1e6

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Histogram):
            return NotImplemented
        return bool(self._hdr.equals(other._hdr))

    __hash__ = None  # type: ignore[assignment]  # mutable: not hashable

    def __repr__(self) -> str:
        if not self.count:
            return "Histogram(empty)"
        p50, p99 = self.percentile(50) * 1e3, self.percentile(99) * 1e3
        return f"Histogram({self.count} values, p50 {p50:.3g} ms, p99 {p99:.3g} ms)"
