"""The installed distribution's version, read from its metadata so it has one source (pyproject)."""

from __future__ import annotations

import importlib.metadata

try:
    __version__ = importlib.metadata.version("edgerazor")
except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"
