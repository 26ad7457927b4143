"""A site's signed pairwise-mask key as it travels through the server: checked for size by the server, for
authenticity by every site (:func:`lightning_fhe.masking.keys.verify_announcements`).

The server only relays it: it checks the sizes (everything from the network is hostile until checked) and that the
name is the caller's, and keeps it with the federation's record so that a restarted server relays the same keys.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PUBLIC_KEY_BYTES = 32  # raw X25519
MAX_CERTIFICATE_BYTES = 16 * 1024  # a PEM client certificate takes about 700 bytes
MAX_SIGNATURE_BYTES = 80  # DER ECDSA P-256 takes at most 72
MAX_FINGERPRINT_CHARS = 128


class AnnouncementError(ValueError):
    """An announcement that cannot be one: wrong sizes, or another site's name."""


@dataclass(frozen=True)
class Announcement:
    site: str
    certificate: bytes  # PEM of the site's TLS client certificate
    public_key: bytes  # raw X25519, 32 bytes
    signature: bytes  # by the certificate's key, over the federation id, site, public key and key fingerprint
    key_fingerprint: str = ""  # he.key = sites: the CKKS key the site holds ("" when provisioned, or none yet)

    def check_form(self, caller: str) -> None:
        """Refuses an announcement whose sizes are impossible or that names another site than ``caller``."""
        if self.site != caller:
            raise AnnouncementError(f"the mask key names site {self.site!r}, but the caller is {caller!r}")
        if len(self.public_key) != PUBLIC_KEY_BYTES:
            raise AnnouncementError(f"the mask key takes {PUBLIC_KEY_BYTES} bytes (X25519), got {len(self.public_key)}")
        if not (0 < len(self.certificate) <= MAX_CERTIFICATE_BYTES and self.certificate.isascii()):
            raise AnnouncementError(
                f"the mask key's certificate takes {len(self.certificate)} bytes; a PEM of 1 to "
                f"{MAX_CERTIFICATE_BYTES} ASCII bytes is expected"
            )
        if not 0 < len(self.signature) <= MAX_SIGNATURE_BYTES:
            raise AnnouncementError(
                f"the mask key's signature takes {len(self.signature)} bytes; 1 to {MAX_SIGNATURE_BYTES} allowed"
            )
        if len(self.key_fingerprint) > MAX_FINGERPRINT_CHARS:
            raise AnnouncementError(f"the key fingerprint exceeds {MAX_FINGERPRINT_CHARS} characters")

    def to_dict(self) -> dict[str, str]:
        return {
            "site": self.site,
            "certificate": self.certificate.decode("ascii", "replace"),
            "public_key": base64.b64encode(self.public_key).decode(),
            "signature": base64.b64encode(self.signature).decode(),
            "key_fingerprint": self.key_fingerprint,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Announcement:
        return cls(
            site=str(data["site"]),
            certificate=str(data["certificate"]).encode("ascii"),
            public_key=base64.b64decode(data["public_key"]),
            signature=base64.b64decode(data["signature"]),
            key_fingerprint=str(data.get("key_fingerprint", "")),
        )
