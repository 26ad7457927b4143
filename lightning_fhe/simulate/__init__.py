"""Simulated federations on one machine: the seed's experiment as ``python -m lightning_fhe.simulate CONFIG``.

The orchestrator provisions a temporary federation, starts the aggregation server and one process per site over
mutual-TLS loopback, and turns what the sites measured into the seed's Table 1 and plots.

- :mod:`~lightning_fhe.simulate.config`: experiment YAML, ``base:`` chains, ``key=value`` overrides, validation.
- :mod:`~lightning_fhe.simulate.site`: one site's process (Lightning Trainer + ``HEFederation``), recording rounds.
- :mod:`~lightning_fhe.simulate.orchestrate`: provisioning, processes, progress and failure handling.
- :mod:`~lightning_fhe.simulate.ray_backend`: ``backend: ray``, the same processes started from Ray tasks and an
  actor, on a local Ray or a cluster.
- :mod:`~lightning_fhe.simulate.results`: per-round records into the summary table, CSV and JSON.
- :mod:`~lightning_fhe.simulate.plots`: Dice per round and time per round, as PNG.
"""
