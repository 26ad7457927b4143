import pytest

from lightning_fhe.he import CKKSParams, HEContext


@pytest.fixture(scope="session")
def site_context() -> HEContext:
    """The seed's parameters with a secret key; generating one takes a moment, so the session shares it."""
    return HEContext.generate(CKKSParams())


@pytest.fixture(scope="session")
def server_context(site_context) -> HEContext:
    return site_context.without_keys()
