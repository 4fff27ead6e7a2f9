"""Independent test references for fromage-bench.

Nothing in this package may import from ``model`` or ``fromage_bench``: it exists
to check those packages against an independent re-implementation of the original
FROMAGe behaviour (see README.md in this folder).
"""
