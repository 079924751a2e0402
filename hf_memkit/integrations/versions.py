"""Techniques that hook library internals (module forwards, attention functions, the KV cache, PEFT tuner
classes) declare the releases they were verified on in ``Technique.verified_with`` (package -> version
specifier). Outside that range they still run, but the log says clearly that their effect is unverified: a new
transformers release silently undid Mesa once (hub kernels, 5.25), and tests on the locked versions did not see it.
"""

from __future__ import annotations

import logging
from importlib import metadata
from typing import Any, Iterable

logger = logging.getLogger("hf_memkit")
_warned: set[str] = set()

#: the ranges the suite runs on (constraints.txt pins inside them); techniques refer to these
TRANSFORMERS = ">=5.24,<5.26"
PEFT = ">=0.21,<0.22"


def installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def unverified(techniques: Iterable[Any]) -> list[str]:
    """One message per technique and package whose installed version lies outside the declared range."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    out = []
    for t in techniques:
        for package, spec in sorted(getattr(t, "verified_with", {}).items()):
            have = installed_version(package)
            if have is None:
                continue
            try:
                ok = Version(have) in SpecifierSet(spec)
            except InvalidVersion:
                ok = False
            if not ok:
                out.append(f"{t.name!r} hooks {package} internals and was verified with {package}{spec}, but "
                           f"{have} is installed: its effect is unchecked on this version (compare the memory "
                           "report's estimate with the measurement, or install the tested versions with "
                           "`pip install -c constraints.txt ...` / `make install`)")
    return out


def warn_unverified(techniques: Iterable[Any]) -> None:
    for message in unverified(techniques):
        if message not in _warned:
            _warned.add(message)
            logger.warning("hf_memkit: %s", message)
