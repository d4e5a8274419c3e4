"""The executors: how cells are evaluated (nnsight reference, fast, remote on NDIF)."""
