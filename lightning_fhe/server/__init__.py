"""The aggregation server: ``python -m lightning_fhe.server --kit DIR``. See ``docs/server.md``.

The maths and the round logic (:mod:`rounds`, :mod:`membership`, :mod:`accumulator`, :mod:`store`,
:mod:`federation`) know nothing of gRPC; :mod:`servicer` translates, :mod:`app` runs it.
"""

from lightning_fhe.server.config import ServerConfig, ServerConfigError, load_server_config

__all__ = ["ServerConfig", "ServerConfigError", "load_server_config"]
