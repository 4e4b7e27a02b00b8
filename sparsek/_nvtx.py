"""NVTX ranges in the ``sparsek`` domain, so Nsight can attribute GPU work to a case, an
implementation or a phase of the op (``ncu --nvtx-include "sparsek@<impl>/"``).

Uses the ``nvtx`` package when it is installed; without it every range is a no-op, so the
library and the harness never depend on it.
"""

from __future__ import annotations

import contextlib

try:
    import nvtx as _nvtx_pkg
except ImportError:  # the bench extra installs it
    _nvtx_pkg = None

DOMAIN = "sparsek"
_enabled = True


def available() -> bool:
    return _nvtx_pkg is not None


def set_enabled(flag: bool) -> bool:
    """Turn ranges on or off (to measure their overhead); returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(flag)
    return previous


def annotate(name: str):
    """Context manager: a push/pop range ``name`` in the sparsek domain (no-op without nvtx)."""
    if _nvtx_pkg is None or not _enabled:
        return contextlib.nullcontext()
    return _nvtx_pkg.annotate(name, domain=DOMAIN)
