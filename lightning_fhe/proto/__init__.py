"""The wire protocol: ``aggregator.proto`` (package ``lightning_fhe.v1``), its generated code, and :mod:`wire`."""
