"""Integrations of SparseK attention with other libraries (imported on demand, never by ``sparsek``)."""
