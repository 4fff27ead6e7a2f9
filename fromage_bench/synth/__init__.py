"""Writers of small datasets in the real datasets' file formats and layouts (tests, the embedded default)."""
