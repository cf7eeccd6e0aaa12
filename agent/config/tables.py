"""Reading TOML tables with messages that say where things are: every error and warning names
the file and the table.
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
from collections.abc import Mapping
from typing import Any

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class ConfigError(Exception):
    """The configuration cannot be used; the message is one line meant for the operator."""

    def __init__(self, message: str) -> None:
        super().__init__(message.replace("\n", " "))  # callers log it as one line


def _q(text: str) -> str:
    """Quote for messages; escapes newlines so a message stays on one line."""
    return json.dumps(text, ensure_ascii=False)


def _kind(value: Any) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}
    kinds.update({list: "an array", dict: "a table"})
    return kinds.get(type(value), "a date/time")


class _Table:
    """One TOML table and where it lives, so every error and warning can name file and table."""

    def __init__(self, data: Mapping[str, Any], file: str, name: str = "") -> None:
        self.data, self.file, self.name = data, file, name

    @property
    def where(self) -> str:
        return f"[{self.name}]" if self.name else "top level"

    def error(self, problem: str) -> ConfigError:
        return ConfigError(f"{self.file}: {self.where}: {problem}")

    def child_name(self, key: str) -> str:
        part = key if _BARE_KEY.fullmatch(key) else _q(key)
        return f"{self.name}.{part}" if self.name else part

    def _typed(self, key: str, kinds: tuple[type, ...], what: str, default: Any) -> Any:
        if key not in self.data:
            return default
        value = self.data[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise self.error(f"{key} must be {what}, not {_kind(value)}")
        return value

    def str_(self, key: str, default: str | None = None) -> str | None:
        return self._typed(key, (str,), "a string", default)

    def bool_(self, key: str, default: bool) -> bool:
        return self._typed(key, (bool,), "true or false", default)

    def int_(self, key: str, default: int) -> int:
        return self._typed(key, (int,), "an integer", default)

    def list_(self, key: str) -> list[Any]:
        return self._typed(key, (list,), "an array", [])

    def str_list(self, key: str) -> list[str]:
        values = self.list_(key)
        if not all(isinstance(v, str) for v in values):
            raise self.error(f'{key} must be an array of strings, e.g. {key} = ["--debug"]')
        return values

    def table(self, key: str) -> _Table:
        value = self._typed(key, (dict,), "a table", {})
        return _Table(value, self.file, self.child_name(key))

    def warn_unknown(self, known: set[str], warnings: list[str]) -> None:
        for key in self.data:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {_q(close[0])}?)" if close else ""
                warnings.append(f"{self.file}: {self.where}: unknown key {_q(key)} ignored{hint}")


def _read_toml(file: str, missing: str) -> dict[str, Any]:
    try:
        with open(file, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(missing) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{file}: malformed TOML: {e}; fix the syntax") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{file}: malformed TOML: not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"{file}: cannot read: {e.strerror or e}") from None
