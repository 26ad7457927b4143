"""state_dir: atomic aggregate and federation files, lazy reading, pruning, leftovers of a killed server."""

from __future__ import annotations

import os

import numpy as np
import pytest

from lightning_fhe.he.layout import TensorLayout, TensorSpec
from lightning_fhe.server.accumulator import Aggregate
from lightning_fhe.server.membership import Membership
from lightning_fhe.server.store import FederationRecord, StateError, StateStore

LAYOUT = TensorLayout((TensorSpec("w", (3,), "float32"),))


def aggregate(round_number=2) -> Aggregate:
    return Aggregate(round_number, [b"\x01" * 10, b"\x02" * 300], np.arange(5, dtype=float) / 3, 0.75, ("a", "c"))


def test_an_aggregate_round_trips_and_streams_lazily(tmp_path):
    store = StateStore(tmp_path / "state")
    store.prepare()
    size = store.write_aggregate(aggregate())
    assert store.aggregate_path(2).stat().st_size == size
    with store.open_aggregate(2) as reader:
        read = reader.read()
    assert read.encrypted_chunks == aggregate().encrypted_chunks
    assert read.plaintext.tolist() == aggregate().plaintext.tolist()
    assert (read.round, read.total_share, read.participants) == (2, 0.75, ("a", "c"))
    with store.open_aggregate(2) as reader:
        assert list(reader.iter_chunks()) == aggregate().encrypted_chunks
        blocks = list(reader.iter_plaintext(2))
    assert [len(b) for b in blocks] == [16, 16, 8]


def test_a_corrupt_plaintext_is_noticed(tmp_path):
    store = StateStore(tmp_path)
    store.prepare()
    store.write_aggregate(aggregate())
    path = store.aggregate_path(2)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(StateError, match="checksum"), store.open_aggregate(2) as reader:
        reader.read()


def test_a_truncated_aggregate_is_noticed(tmp_path):
    store = StateStore(tmp_path)
    store.prepare()
    store.write_aggregate(aggregate())
    path = store.aggregate_path(2)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(StateError, match="truncated"), store.open_aggregate(2) as reader:
        reader.read()


def test_leftovers_of_a_killed_write_are_removed_and_never_read(tmp_path):
    store = StateStore(tmp_path)
    store.prepare()
    (tmp_path / ".tmp-round-0003.agg.1234").write_bytes(b"half")
    store.write_aggregate(aggregate(2))
    store.prepare()
    assert store.stored_rounds() == [2] and store.last_closed_round() == 2
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_failed_write_leaves_the_previous_file(tmp_path, monkeypatch):
    store = StateStore(tmp_path)
    store.prepare()
    store.write_aggregate(aggregate(2))
    before = store.aggregate_path(2).read_bytes()

    def boom(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        store.write_aggregate(Aggregate(2, [], np.zeros(3), 1.0, ("a",)))
    assert store.aggregate_path(2).read_bytes() == before and not list(tmp_path.glob(".tmp-*"))


def test_prune_keeps_the_most_recent(tmp_path):
    store = StateStore(tmp_path)
    store.prepare()
    for r in range(5):
        store.write_aggregate(aggregate(r))
    assert store.prune(2) == [0, 1, 2]
    assert store.stored_rounds() == [3, 4]
    assert store.prune(0) == []


def test_the_federation_record_round_trips(tmp_path):
    store = StateStore(tmp_path)
    store.prepare()
    assert store.load_federation() is None
    record = FederationRecord("p", "fp", {"n": 1}, Membership(("a", "b"), (1.0, 2.0), LAYOUT, LAYOUT, "a"), 3, 1)
    store.save_federation(record)
    assert store.load_federation() == record
    (tmp_path / "federation.json").write_text("{not json")
    with pytest.raises(StateError, match="move state_dir aside"):
        store.load_federation()
