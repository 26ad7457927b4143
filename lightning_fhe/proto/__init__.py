"""The wire protocol: ``aggregator.proto`` (package ``lightning_fhe.v2``), its generated code, and :mod:`wire`."""
