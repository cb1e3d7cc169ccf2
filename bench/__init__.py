"""Tools that are no part of a server: the benchmark harness (``gateway bench``), the load generator
(``gateway loadtest``), the mock upstream they drive, and the same-run A/B (``compare.py``)."""
