"""Kubernetes quantities ("100m", "1.5", "256Mi", "1e3", "2G") as Decimals, for configuration
values and the container environment. kubernetes_asyncio ships no parse_quantity, so this
follows apimachinery's grammar. (resources.py keeps exact Fractions for the cgroup math.)
"""

from __future__ import annotations

import re
from decimal import ROUND_CEILING, Decimal

_QUANTITY = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))(?:[eE]([+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]))?")
_DECIMAL_SI = {"n": -9, "u": -6, "m": -3, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_BINARY_SI = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}


def parse_quantity(value: str | int | float | Decimal) -> Decimal:
    """Parse a Kubernetes quantity ("100m", "1.5", "256Mi", "1e3", "2G") to a Decimal; ValueError if not one."""
    if isinstance(value, bool):  # TOML true is an int to Python, not a quantity
        raise ValueError(f"not a quantity: {value!r}")
    if isinstance(value, int | Decimal):
        number = Decimal(value)
    elif isinstance(value, float):
        number = Decimal(repr(value))  # repr avoids the binary expansion of e.g. 0.1
    elif isinstance(value, str) and (m := _QUANTITY.fullmatch(value)):
        number, exponent, suffix = Decimal(m[1]), m[2], m[3]
        try:
            if exponent is not None:
                number = number.scaleb(int(exponent))
            elif suffix in _BINARY_SI:
                number *= 1024 ** _BINARY_SI[suffix]
            elif suffix:
                number = number.scaleb(_DECIMAL_SI[suffix])
        except (ArithmeticError, ValueError):
            raise ValueError(f"quantity out of range: {value!r}") from None
    else:
        raise ValueError(f"not a quantity: {value!r}")
    if not number.is_finite():
        raise ValueError(f"not a quantity: {value!r}")
    return number


def _ceil(number: Decimal) -> int:
    return int(number.to_integral_value(rounding=ROUND_CEILING))


def cpu_millis(value: str | int | float | Decimal) -> int:
    return _ceil(parse_quantity(value) * 1000)


def memory_bytes(value: str | int | float | Decimal) -> int:
    return _ceil(parse_quantity(value))
