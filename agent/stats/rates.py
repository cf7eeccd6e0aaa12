"""usageNanoCores: a rate, computed from two samples of a cumulative CPU counter.

Per cgroup the tracker keeps one earlier sample (the base). A new sample at least `window` seconds
after the base yields the rate over that interval and becomes the next base; a sample sooner than
that returns the last rate, so frequent readers neither see noise nor shorten the interval.
A counter that went backwards belongs to a new cgroup of the same name (a restarted container):
the tracker starts over.
"""

from __future__ import annotations

from collections.abc import Iterable

NANOS = 1_000_000_000


class CpuRates:
    __slots__ = ("_bases", "window")

    def __init__(self, window: float = 1.0):
        self.window = window
        self._bases: dict[str, tuple[float, int, int | None]] = {}  # key -> (time, usage ns, rate)

    def observe(self, key: str, at: float, usage_ns: int) -> int | None:
        """The rate in nanocores (ns of CPU per s), or None until two samples are far enough apart."""
        base = self._bases.get(key)
        if base is None or usage_ns < base[1]:
            self._bases[key] = (at, usage_ns, None)
            return None
        then, before, rate = base
        if at - then >= self.window:
            rate = round((usage_ns - before) * 1.0 / (at - then))
            self._bases[key] = (at, usage_ns, rate)
        return rate

    def keep_only(self, keys: Iterable[str]) -> None:
        """Forget cgroups that are gone (called after a full sampling round)."""
        alive = set(keys)
        for key in [k for k in self._bases if k not in alive]:
            del self._bases[key]

    def __len__(self) -> int:
        return len(self._bases)


def nanocores_from_millis(millicores: int) -> int:
    return millicores * NANOS // 1000
