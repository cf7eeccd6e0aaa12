"""The [images] table: registry mirrors, insecure registries, image garbage collection."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.config.tables import _q, _Table

_IMAGES_KEYS = {"mirrors", "insecure_registries", "gc_high_percent", "gc_low_percent"}


@dataclass(frozen=True)
class ImageSettings:
    mirrors: Mapping[str, tuple[str, ...]] = field(default_factory=dict, hash=False)  # registry host -> URLs
    insecure_registries: tuple[str, ...] = ()  # hosts reached over plain http (127.0.0.1 always is)
    gc_high_percent: int = 85  # the kubelet's imageGCHighThresholdPercent
    gc_low_percent: int = 80

    def __post_init__(self) -> None:
        object.__setattr__(self, "mirrors", {k: tuple(v) for k, v in self.mirrors.items()})
        object.__setattr__(self, "insecure_registries", tuple(self.insecure_registries))


def _parse_images(t: _Table, warnings: list[str]) -> ImageSettings:
    t.warn_unknown(_IMAGES_KEYS, warnings)
    mirrors = t.table("mirrors")
    parsed: dict[str, tuple[str, ...]] = {}
    for host, urls in mirrors.data.items():
        if isinstance(urls, str):
            urls = [urls]
        schemes = ("http://", "https://")
        urls_ok = isinstance(urls, list) and all(isinstance(u, str) and u.startswith(schemes) for u in urls)
        if not urls_ok:
            raise mirrors.error(f'mirrors for {_q(host)} must be URLs, e.g. "{host}" = ["http://127.0.0.1:5000"]')
        parsed[host] = tuple(urls)
    high, low = t.int_("gc_high_percent", 85), t.int_("gc_low_percent", 80)
    if not 0 < low <= high <= 100:
        raise t.error(f"need 0 < gc_low_percent <= gc_high_percent <= 100, not {low} and {high}")
    return ImageSettings(
        mirrors=parsed,
        insecure_registries=tuple(t.str_list("insecure_registries")),
        gc_high_percent=high,
        gc_low_percent=low,
    )
