"""The worker side: everything that imports torch, transformers or DeepSpeed.

One process per rank, started by a launcher (never by hand): `python -m clustertune.worker`.
The launcher side (cli, config, plan, cluster/, local, report) never imports this package at
module level, so it runs where torch is not installed (tests/unit/test_import_boundary.py).
"""
