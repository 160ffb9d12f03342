"""
Config files map onto the same settings as the command line: an INI file whose section is
the role (``[gateway]``, ``[device]``) and whose keys are the long option names.
Values given on the command line win.
"""

from __future__ import annotations

import configparser

from twisted.python import usage


def positive(kind):
    """An option coercer: a positive number of ``kind``."""

    def coerce(value):
        v = kind(value)
        if v <= 0:
            raise ValueError("must be positive")
        return v

    coerce.coerceDoc = "Must be positive."
    return coerce


_BOOLEAN = {"1": True, "yes": True, "true": True, "on": True, "0": False, "no": False, "false": False, "off": False}


class Options(usage.Options):
    """usage.Options with ``--config FILE`` and list-valued options named in ``multi``."""

    section = ""
    multi: dict = {}  # option name -> default list

    def __init__(self):
        super().__init__()
        for name in self.multi:
            self[name] = []
        self._multi_defaults = dict(self.multi)

    def opt_config(self, path):
        """Read settings from an INI file (section named after the role)."""
        self["config"] = path

    def postOptions(self):
        if self.get("config"):
            self._apply(self["config"])
        for name, default in self._multi_defaults.items():
            if not self[name]:
                self[name] = list(default)

    def _apply(self, path):
        parser = configparser.ConfigParser(interpolation=None)
        try:
            with open(path, encoding="utf-8") as f:
                parser.read_file(f)
        except OSError as e:
            raise usage.UsageError(f"cannot read config {path}: {e.strerror}")
        except configparser.Error as e:
            raise usage.UsageError(f"config {path} is not valid INI: {e}")
        if not parser.has_section(self.section):
            raise usage.UsageError(f"config {path} has no [{self.section}] section")
        params = {p[0]: p for p in self.optParameters}
        for key, value in parser.items(self.section):
            name = key.replace("_", "-")
            if name in self.multi:
                if not self[name]:
                    self[name] = [v.strip() for v in value.replace(",", "\n").splitlines() if v.strip()]
                continue
            if name in {f[0] for f in getattr(self, "optFlags", [])}:
                if not self[name]:  # a flag given on the command line wins
                    try:
                        self[name] = int(_BOOLEAN[value.strip().lower()])
                    except KeyError:
                        raise usage.UsageError(f"config {path}: {key} = {value!r}: not yes/no, true/false, on/off or 1/0")
                continue
            if name not in params:
                raise usage.UsageError(f"config {path}: unknown setting {key!r} in [{self.section}]")
            default = params[name][2]
            coerce = params[name][4] if len(params[name]) > 4 else None
            if self[name] != default:
                continue  # given on the command line
            try:
                self[name] = coerce(value) if coerce else value
            except ValueError as e:
                raise usage.UsageError(f"config {path}: {key} = {value!r}: {e}")


def within(name, kind, low, high=None):
    """An option coercer for a limit: a ``kind`` in [low, high], the error naming the option."""

    def coerce(value):
        try:
            v = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"--{name} must be a number, not {value!r}")
        if v < low or (high is not None and v > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise ValueError(f"--{name} must be {bound}, not {value}")
        return v

    coerce.coerceDoc = f"At least {low}." if high is None else f"Between {low} and {high}."
    return coerce
