"""The sites' side of the aggregation protocol: join, submit an update, fetch a global model.

TLS comes from the site kit (the site's certificate names it to the server). Calls that find the server
unavailable are retried with exponential backoff for up to ``retry_budget_s`` of continuous outage, so a server
restart is ridden out; :meth:`AggregatorClient.close` (from any thread) ends those retries and any call in flight at
once. While it waits (for the federation to form, for a round to close, for the server to come back) the client logs
what it waits for on the ``lightning_fhe.client`` logger at INFO, at least every ``log_every_s``. A site keeps its
last update (in an anonymous temporary file, not in memory) until that round's global model arrives: if the
server restarted and lost it, :meth:`AggregatorClient.fetch_global` submits it again by itself.

Example::

    with AggregatorClient("kits/site-1") as client:
        info = client.join(weight=1200, encrypted_layout=enc_layout, plaintext_layout=plain_layout)
        if info.send_initial_model:
            client.submit(0, [], np.concatenate([enc_layout.flatten(state), plain_layout.flatten(state)]))
        start = client.fetch_global(0)                        # every site starts from these weights
        for r in range(info.current_round, info.rounds + 1):
            ...                                                # train locally
            chunks = pool.iter_encrypt(enc_layout.flatten(state), info.share)   # a CipherPool
            client.submit(r, chunks, plain_layout.flatten(state))   # encryption and upload overlap
            tensors = enc_layout.empty()                            # the global model's encrypted tensors, filled
            write = lambda start, values: enc_layout.write(tensors, start, values)   # a batch at a time
            model = client.fetch_global(                            # download and decryption overlap
                r, chunks_into=lambda incoming: pool.decryption(enc_layout.numel, incoming.total_share, write)
            )

The package: :mod:`~lightning_fhe.client.aggregator` (the client, thin), :mod:`~lightning_fhe.client.upload`,
:mod:`~lightning_fhe.client.download`, :mod:`~lightning_fhe.client.retry`, :mod:`~lightning_fhe.client.status`
and :mod:`~lightning_fhe.client.errors`. The shape of each round's update is
:func:`lightning_fhe.proto.update_shape.update_shape`'s to decide.
"""

from lightning_fhe.client.aggregator import AggregatorClient, JoinInfo
from lightning_fhe.client.download import ChunkConsumer, GlobalModel, IncomingGlobalModel
from lightning_fhe.client.errors import ClientClosedError, FederationError, RoundClosedError, ServerUnavailableError
from lightning_fhe.client.retry import WaitLog
from lightning_fhe.client.status import MemberActivity, RoundStatus, round_status
from lightning_fhe.client.upload import SubmitReceipt

# The names these had when the client was one module; lightning_fhe.status and the tests import them so.
_WaitLog = WaitLog
_round_status = round_status

__all__ = [
    "AggregatorClient",
    "ChunkConsumer",
    "ClientClosedError",
    "FederationError",
    "GlobalModel",
    "IncomingGlobalModel",
    "JoinInfo",
    "MemberActivity",
    "RoundClosedError",
    "RoundStatus",
    "ServerUnavailableError",
    "SubmitReceipt",
]
