"""Writers of small datasets in the real datasets' file formats and layouts (tests, the embedded default).

`formats`: one writer per dataset file format; `images`: the one image writer (file looks like a real
collection's); `captions`, `vist`, `visdial`: the test fixtures, which decide content and call both.
"""
