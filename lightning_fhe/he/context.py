"""Key material: a site's CKKS context with the secret key, and the server's parameters without any key."""

from __future__ import annotations

import math
import os
from pathlib import Path

import tenseal as ts
import tenseal.sealapi  # noqa: F401  registers SEAL's types, so TenSEAL's context can hand them to Python

from lightning_fhe.he.params import CKKSParams


class HEKeyError(ValueError):
    """A context file that is missing, unreadable, or holds the wrong kind of key material."""


class HEContext:
    """A TenSEAL CKKS context and the parameters it was made with.

    Sites hold a context with the secret key (``has_secret_key``); the aggregation server holds one made by
    :meth:`without_keys`, which can load and add ciphertexts but can neither encrypt nor decrypt.

    Example::

        >>> site = HEContext.generate(CKKSParams())
        >>> server = site.without_keys()
        >>> site.has_secret_key, server.has_secret_key
        (True, False)
    """

    def __init__(self, context: ts.Context) -> None:
        self.context = context
        self.params = _params_of(context)

    @classmethod
    def generate(cls, params: CKKSParams) -> HEContext:
        """A fresh secret key for ``params``, for symmetric (secret-key) encryption."""
        try:
            context = ts.context(
                ts.SCHEME_TYPE.CKKS,
                params.poly_modulus_degree,
                coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
                encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
            )
        except ValueError as err:  # SEAL's own refusal, for parameter sets our validation lets through
            raise HEKeyError(f"SEAL refused the CKKS parameters {params.to_dict()}: {err}") from err
        context.global_scale = params.scale
        return cls(context)

    @property
    def has_secret_key(self) -> bool:
        return self.context.has_secret_key()

    @property
    def seal_context(self):
        """The underlying ``tenseal.sealapi.SEALContext``."""
        return self.context.seal_context().data

    def secret_key(self):
        if not self.has_secret_key:
            raise HEKeyError("this context holds no secret key: it is the server's parameters-only context")
        return self.context.secret_key().data

    def without_keys(self) -> HEContext:
        """The parameters alone, with no key of any kind: what the server gets."""
        return HEContext(ts.context_from(self.serialize(with_secret_key=False)))

    def serialize(self, with_secret_key: bool) -> bytes:
        return self.context.serialize(
            save_public_key=False,
            save_secret_key=with_secret_key,
            save_galois_keys=False,
            save_relin_keys=False,
        )

    def save(self, path: str | os.PathLike, with_secret_key: bool) -> None:
        """Writes the context; a file holding the secret key is created 0600."""
        data = self.serialize(with_secret_key=with_secret_key and self.has_secret_key)
        write_private_file(Path(path), data) if with_secret_key else Path(path).write_bytes(data)

    @classmethod
    def load(cls, path: str | os.PathLike, require_secret_key: bool | None = None) -> HEContext:
        """Reads a context file. ``require_secret_key`` True (site) or False (server) checks what it holds."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise HEKeyError(f"{path}: cannot read the HE context file ({err.strerror})") from err
        try:
            context = ts.context_from(data)
        except Exception as err:  # TenSEAL raises bare exceptions for undecodable protobufs
            raise HEKeyError(f"{path}: not a TenSEAL context file ({err})") from err
        loaded = cls(context)
        if require_secret_key is True and not loaded.has_secret_key:
            raise HEKeyError(f"{path}: holds no secret key; a site needs he_context.tenseal from its site kit")
        if require_secret_key is False and loaded.has_secret_key:
            raise HEKeyError(
                f"{path}: holds a secret key; the server must only get the parameters (he_params.tenseal)"
            )
        return loaded


def write_private_file(path: Path, data: bytes) -> None:
    """Creates ``path`` with mode 0600 before any byte is written, so a secret is never world-readable."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
    finally:
        if fd >= 0:
            os.close(fd)


def _params_of(context: ts.Context) -> CKKSParams:
    parms = context.seal_context().data.key_context_data().parms()
    scale = context.global_scale
    scale_bits = round(math.log2(scale))
    if 2.0**scale_bits != scale:
        raise HEKeyError(f"context scale {scale} is not a power of two")
    return CKKSParams(
        poly_modulus_degree=parms.poly_modulus_degree(),
        coeff_mod_bit_sizes=tuple(m.bit_count() for m in parms.coeff_modulus()),
        scale_bits=scale_bits,
    )
