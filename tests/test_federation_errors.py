"""HEFederation fails before training wastes time, and says why."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_fhe import HEFederation
from lightning_fhe.client import AggregatorClient, FederationError, ServerUnavailableError
from lightning_fhe.federation import FederationSetupError
from lightning_fhe.he.layout import TensorLayout
from lightning_fhe.provision import load_provision_config, load_server_kit, provision
from lightning_fhe.server.app import AggregatorServer
from lightning_fhe.server.config import load_server_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kits")
    provision(load_provision_config(REPO / "configs" / "provision.yaml", ["clients=[site-1,site-2]"]), out)
    return out


def trainer(federation: HEFederation, max_epochs: int = 2) -> L.Trainer:
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        callbacks=[federation],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(kits, tmp_path, request):
    options = getattr(request, "param", [])
    config = load_server_config(
        None, ["port=0", "bind=127.0.0.1", f"state_dir={tmp_path}", "rounds=2", "linger_s=1", *options]
    )
    server = AggregatorServer(config, load_server_kit(kits / "server"))
    server.start()
    yield server
    server.stop(grace=0)


def test_missing_kit_is_named_before_any_data_loads(tmp_path):
    model = BoringModel()
    model.train_dataloader = lambda: pytest.fail("data was loaded before the kit was checked")
    with pytest.raises(FederationSetupError, match="nowhere"):
        trainer(HEFederation(kit=tmp_path / "nowhere")).fit(model)


def test_selection_that_matches_nothing_is_refused(kits):
    with pytest.raises(FederationSetupError, match="encrypt='conv'"):
        trainer(HEFederation(kit=kits / "site-1", encrypt="conv")).fit(BoringModel())
    with pytest.raises(FederationSetupError, match="decoder"):
        trainer(HEFederation(kit=kits / "site-1", encrypt=["decoder.*"])).fit(BoringModel())


class LazyModel(BoringModel):
    """Builds its layer in configure_model, as large models do, so it has no tensors when callbacks' setup runs."""

    def __init__(self) -> None:
        super().__init__()
        del self.layer
        self.layer = None

    def configure_model(self) -> None:
        if self.layer is None:
            self.layer = torch.nn.Linear(32, 2)


def test_layers_built_in_configure_model_are_selected(kits):
    # The selection passes and the site goes on to connect; no server is there, so it stops at that.
    federation = HEFederation(kit=kits / "site-1", server=f"localhost:{free_port()}", retry_budget_s=0.5)
    with pytest.raises(ServerUnavailableError):
        trainer(federation).fit(LazyModel())


def test_unreachable_server_fails_after_the_retry_budget(kits):
    federation = HEFederation(kit=kits / "site-1", server=f"localhost:{free_port()}", retry_budget_s=1.0)
    with pytest.raises(ServerUnavailableError):
        trainer(federation).fit(BoringModel())


def test_model_layout_different_from_the_federation_is_refused(kits, server):
    # site-1 joins with a 32->2 linear layer; site-2's model has another shape.
    state = BoringModel().state_dict()
    layout = TensorLayout.from_tensors(state)
    site_1 = AggregatorClient(kits / "site-1", f"localhost:{server.port}")
    threading.Thread(target=lambda: _join_quietly(site_1, layout), daemon=True).start()

    other = BoringModel()
    other.layer = torch.nn.Linear(32, 3)
    federation = HEFederation(kit=kits / "site-2", server=f"localhost:{server.port}")
    with pytest.raises(FederationError, match="layout"):
        trainer(federation).fit(other)
    site_1.close()


def _join_quietly(client: AggregatorClient, layout: TensorLayout) -> None:
    try:
        client.join(1.0, layout, TensorLayout(()))
    except Exception:
        pass  # the server stops under it at the end of the test


@pytest.mark.parametrize("server", [["min_clients=1", "wait_after_min_s=0"]], indirect=True)
def test_rounds_that_disagree_with_the_server_are_refused(kits, server):
    federation = HEFederation(kit=kits / "site-1", server=f"localhost:{server.port}", local_epochs=1)
    with pytest.raises(FederationSetupError, match="server runs 2 rounds, but this site would run 5"):
        trainer(federation, max_epochs=5).fit(BoringModel())


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"local_epochs": 0}, "local_epochs"),
        ({"optimizer_state": "forget"}, "optimizer_state"),
        ({"weight": -1}, "weight"),
        ({"fedprox_mu": -0.1}, "fedprox_mu"),
        ({"rounds": 0}, "rounds"),
        ({"rounds": True}, "rounds"),
        ({"strategy": {"fedadam": {}}}, r"strategy.fedadam.lr: required"),
        ({"strategy": "fedsgd"}, r"strategy.fedsgd: unknown strategy"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, words):
    with pytest.raises(ValueError, match=words):
        HEFederation(kit="kits/site-1", **kwargs)


@pytest.mark.parametrize(
    "schedule, words",
    [
        ({"check_val_every_n_epoch": 2}, "check_val_every_n_epoch=2 would validate local models: with local_epochs=3"),
        ({"check_val_every_n_epoch": None, "val_check_interval": 4}, "check_val_every_n_epoch=None validates every"),
        ({"val_check_interval": 0.5}, "val_check_interval=0.5 validates within the epoch"),
    ],
)
def test_a_trainer_that_would_validate_local_models_is_refused(kits, schedule, words):
    model = BoringModel()
    model.train_dataloader = lambda: pytest.fail("data was loaded before the schedule was checked")
    federation = HEFederation(kit=kits / "site-1", local_epochs=3)
    trainer = L.Trainer(max_epochs=6, accelerator="cpu", callbacks=[federation], logger=False, **schedule)
    with pytest.raises(FederationSetupError, match=words):
        trainer.fit(model)


def test_the_default_validation_schedule_becomes_every_round(kits):
    # Validating every epoch (Lightning's default) becomes every local_epochs-th epoch; the site then connects, and
    # no server is there.
    server = f"localhost:{free_port()}"
    federation = HEFederation(kit=kits / "site-1", local_epochs=3, server=server, retry_budget_s=0.5)
    trainer = L.Trainer(max_epochs=6, accelerator="cpu", callbacks=[federation], logger=False)
    with pytest.raises(ServerUnavailableError):
        trainer.fit(BoringModel())
    assert trainer.check_val_every_n_epoch == 3
