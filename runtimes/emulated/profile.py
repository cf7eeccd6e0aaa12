"""An emulated handler's profile: how its Pods behave, from `[runtimes.NAME.options]`.

    [runtimes.kata.options]
    start_latency = { distribution = "lognormal", median = "2s", p99 = "10s" }
    image_pull = { distribution = "uniform", min = "1s", max = "4s" }   # per image not yet on the node
    failure_probability = 0.05      # a started app container fails at once ...
    failure_exit_code = 1           # ... with this code
    run_time = "30s"                # app containers exit 0 after this (Job-like Pods); default: run forever
    cpu_usage = "250m"              # per app container, reported by /stats/summary
    memory_usage = "160Mi"
    final_status = false            # skip the terminated status write before a deletion (scale runs)
    seed = 7                        # repeatable draws

A time is a duration ("500ms", "2s", "1m", or a number of seconds), which is a fixed value, or a
table naming its distribution: fixed (value), uniform (min, max), lognormal (median, p99). Pod
annotations (backend.py, agent/stats/emulated_usage.py) still override exits and usage per Pod.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

from cgroups.quantity import cpu_millis, memory_bytes

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_Z99 = NormalDist().inv_cdf(0.99)  # the p99 of a log-normal is median * exp(sigma * z99)

KEYS = frozenset(
    {
        "start_latency", "image_pull", "failure_probability", "failure_exit_code", "run_time",
        "cpu_usage", "memory_usage", "final_status", "seed",
    }
)  # fmt: skip
_DISTRIBUTION_KEYS = {"fixed": ("value",), "uniform": ("min", "max"), "lognormal": ("median", "p99")}


class ProfileError(ValueError):
    """An option is wrong; `key` is the option (dotted within a distribution table)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key = key


def parse_duration(text: str) -> float:
    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a duration such as 500ms, 2s or 1m")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass(frozen=True, slots=True)
class Distribution:
    """Seconds drawn as configured: fixed (a == value), uniform (a..b) or log-normal (mu, sigma)."""

    kind: str
    a: float
    b: float = 0.0

    def draw(self, rng: random.Random) -> float:
        if self.kind == "fixed":
            return self.a
        if self.kind == "uniform":
            return rng.uniform(self.a, self.b)
        return rng.lognormvariate(self.a, self.b)

    @staticmethod
    def lognormal(median: float, p99: float) -> Distribution:
        return Distribution("lognormal", math.log(median), (math.log(p99) - math.log(median)) / _Z99)


@dataclass(frozen=True, slots=True)
class Profile:
    start_latency: Distribution | None = None
    image_pull: Distribution | None = None
    failure_probability: float = 0.0
    failure_exit_code: int = 1
    run_time: Distribution | None = None
    usage: tuple[int, int] | None = None  # (millicores, bytes) per app container
    final_status: bool = True
    seed: int | None = None


def _seconds(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ProfileError(key, f'{key} must be a duration such as "2s" or a number of seconds')
    try:
        seconds = parse_duration(value) if isinstance(value, str) else float(value)
    except ValueError as exc:
        raise ProfileError(key, f"{key}: {exc}") from None
    if seconds < 0 or not math.isfinite(seconds):
        raise ProfileError(key, f"{key} must be a finite duration of 0 or more, not {value!r}")
    return seconds


def _distribution(key: str, value: Any) -> Distribution:
    if not isinstance(value, Mapping):
        return Distribution("fixed", _seconds(key, value))
    kind = value.get("distribution")
    names = ", ".join(f"{k} ({', '.join(v)})" for k, v in _DISTRIBUTION_KEYS.items())
    if kind not in _DISTRIBUTION_KEYS:
        got = "missing" if kind is None else repr(kind)
        raise ProfileError(f"{key}.distribution", f"{key}.distribution is {got}; use one of: {names}")
    wanted = _DISTRIBUTION_KEYS[kind]
    extra = sorted(set(value) - {"distribution", *wanted})
    if extra:
        raise ProfileError(f"{key}.{extra[0]}", f"{key}: {extra[0]} is not a {kind} parameter; set {', '.join(wanted)}")
    for k in wanted:
        if k not in value:
            raise ProfileError(f"{key}.{k}", f"{key}: a {kind} distribution needs {', '.join(wanted)}; {k} is missing")
    a, *rest = (_seconds(f"{key}.{k}", value[k]) for k in wanted)
    if kind == "fixed":
        return Distribution("fixed", a)
    b = rest[0]
    if kind == "uniform":
        if b < a:
            raise ProfileError(f"{key}.max", f"{key}: max ({b:g}s) is below min ({a:g}s)")
        return Distribution("uniform", a, b)
    if a <= 0:
        raise ProfileError(f"{key}.median", f"{key}: a lognormal median must be above 0")
    if b <= a:
        raise ProfileError(f"{key}.p99", f"{key}: p99 ({b:g}s) must be above the median ({a:g}s)")
    return Distribution.lognormal(a, b)


def parse_profile(options: Mapping[str, Any]) -> Profile:
    """The profile in a handler's options (unknown keys are the caller's to warn about).
    Raises ProfileError naming the option and the fix."""
    get = options.get
    kwargs: dict[str, Any] = {}
    for key in ("start_latency", "image_pull", "run_time"):
        if key in options:
            kwargs[key] = _distribution(key, options[key])
    p = get("failure_probability", 0.0)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ProfileError("failure_probability", f"failure_probability must be a number from 0 to 1, not {p!r}")
    code = get("failure_exit_code", 1)
    if isinstance(code, bool) or not isinstance(code, int) or not 1 <= code <= 255:
        raise ProfileError("failure_exit_code", f"failure_exit_code must be an integer from 1 to 255, not {code!r}")
    cpu, memory = get("cpu_usage"), get("memory_usage")
    if cpu is not None or memory is not None:
        try:
            millis = cpu_millis(cpu) if cpu is not None else 0
            if millis < 0:
                raise ValueError
        except (ValueError, ArithmeticError):
            raise ProfileError("cpu_usage", f'cpu_usage {cpu!r} is not a CPU quantity such as "250m" or "1"') from None
        try:
            size = memory_bytes(memory) if memory is not None else 0
            if size < 0:
                raise ValueError
        except (ValueError, ArithmeticError):
            raise ProfileError("memory_usage", f'memory_usage {memory!r} is not a size such as "64Mi"') from None
        kwargs["usage"] = (millis, size)
    final = get("final_status", True)
    if not isinstance(final, bool):
        raise ProfileError("final_status", f"final_status must be true or false, not {final!r}")
    seed = get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ProfileError("seed", f"seed must be an integer, not {seed!r}")
    return Profile(failure_probability=float(p), failure_exit_code=code, final_status=final, seed=seed, **kwargs)
