"""THE registry of implementations: every front end (CLI, asv, pytest-benchmark, Nsight) looks
ids up here. Each adapter module exports ``IMPLS``, a tuple of ``base.Impl``; the order below is
the order of tables. An id names one implementation across kinds: ``sdpa-cudnn`` runs prefill
cases and, with its backward, train cases (``Impl.kinds``).
"""

from __future__ import annotations

from ..cases import Case, UnknownName
from . import decode, dense, sparsek_impls, structured
from .base import Impl, Prepared, Unavailable

_MODULES = (sparsek_impls, dense, structured, decode)


def _collect() -> dict[str, Impl]:
    out: dict[str, Impl] = {}
    for module in _MODULES:
        for impl in module.IMPLS:
            if impl.id in out:
                raise RuntimeError(f"implementation id {impl.id!r} is registered twice ({module.__name__})")
            out[impl.id] = impl
    return out


IMPLS: dict[str, Impl] = _collect()


def get_impl(id: str) -> Impl:
    try:
        return IMPLS[id]
    except KeyError:
        raise UnknownName(f"unknown implementation {id!r}; valid ids: {', '.join(IMPLS)}") from None


def impls_for(case: Case) -> list[Impl]:
    """Every implementation that runs the case's kind (train: those with a backward), available
    or not (unavailable ones are listed as skipped with their reason, never dropped)."""
    return [impl for impl in IMPLS.values() if case.kind in impl.kinds]


__all__ = ["IMPLS", "Impl", "Prepared", "Unavailable", "get_impl", "impls_for"]
