"""The Decathlon loader and the synthetic Task09 writer: layout, caching, site splits, batches, and error messages."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel", reason="reading and writing MSD NIfTI volumes needs nibabel")

from lightning_fhe.tasks import synthetic  # noqa: E402
from lightning_fhe.tasks.msd import (  # noqa: E402
    MSDCase,
    MSDDataModule,
    MSDDatasetError,
    read_msd_cases,
    split_cases,
)
from lightning_fhe.tasks.synthetic import MARKER_NAME, write_synthetic_msd  # noqa: E402

SIZE = (32, 32, 32)
NUM_CASES = 8


@pytest.fixture(scope="module")
def msd_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic dataset shared by the read-only tests; writing it takes well under a second."""
    return write_synthetic_msd(tmp_path_factory.mktemp("msd") / "Task09_Spleen", NUM_CASES, size=SIZE, seed=3)


@pytest.fixture()
def own_root(tmp_path: Path) -> Path:
    """A private copy for tests that break the dataset on purpose."""
    return write_synthetic_msd(tmp_path / "Task09_Spleen", 4, size=(24, 24, 24), seed=1)


def _datamodule(root: Path, site_index: int = 0, num_sites: int = 2, **kwargs) -> MSDDataModule:
    kwargs.setdefault("patch_size", 16)
    kwargs.setdefault("val_fraction", 0.25)
    return MSDDataModule(root, site_index, num_sites, **kwargs)


# -- the synthetic writer ---------------------------------------------------------------------------------------


def test_synthetic_dataset_has_the_task09_layout(msd_root: Path) -> None:
    listing = json.loads((msd_root / "dataset.json").read_text())
    assert listing["modality"] == {"0": "CT"}
    assert listing["labels"] == {"0": "background", "1": "spleen"}
    assert listing["numTraining"] == NUM_CASES == len(listing["training"])
    assert listing["test"] == [] and listing["numTest"] == 0
    assert {"name", "description", "tensorImageSize"} <= listing.keys()
    assert listing["training"][0] == {"image": "./imagesTr/spleen_1.nii.gz", "label": "./labelsTr/spleen_1.nii.gz"}

    for entry in listing["training"]:
        image = nib.load(msd_root / entry["image"])
        label = nib.load(msd_root / entry["label"])
        assert image.shape == label.shape == SIZE
        np.testing.assert_allclose(image.header.get_zooms(), (1.5, 1.5, 2.0))
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        hu = np.asarray(image.dataobj)
        mask = np.asarray(label.dataobj)
        assert hu.dtype == np.int16 and set(np.unique(mask)) == {0, 1}
        # The spleen tutorial's window (-57..164 HU) must separate sphere from most of the background.
        assert mask.mean() > 0.005
        assert hu[mask == 1].min() > -57
        assert np.median(hu[mask == 0]) < -57


def test_synthetic_writer_is_cached(msd_root: Path) -> None:
    files = [msd_root / "dataset.json", msd_root / "imagesTr" / "spleen_1.nii.gz", msd_root / MARKER_NAME]
    before = [os.stat(f).st_mtime_ns for f in files]
    inode = os.stat(msd_root).st_ino

    again = write_synthetic_msd(msd_root, NUM_CASES, size=SIZE, seed=3)

    assert again == msd_root
    assert [os.stat(f).st_mtime_ns for f in files] == before
    assert os.stat(msd_root).st_ino == inode
    assert not [p for p in msd_root.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_synthetic_writer_rewrites_on_new_parameters_and_is_deterministic(tmp_path: Path) -> None:
    a = write_synthetic_msd(tmp_path / "a", 3, size=(24, 24, 24), seed=5)
    b = write_synthetic_msd(tmp_path / "b", 3, size=(24, 24, 24), seed=5)
    same = [np.asarray(nib.load(r / "imagesTr" / "spleen_2.nii.gz").dataobj) for r in (a, b)]
    np.testing.assert_array_equal(*same)

    write_synthetic_msd(a, 5, size=(24, 24, 24), seed=6)
    assert json.loads((a / "dataset.json").read_text())["numTraining"] == 5
    assert not np.array_equal(np.asarray(nib.load(a / "imagesTr" / "spleen_2.nii.gz").dataobj), same[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_synthetic_writer_never_overwrites_other_data(tmp_path: Path) -> None:
    real = tmp_path / "Task09_Spleen"
    real.mkdir()
    (real / "dataset.json").write_text("{}")
    with pytest.raises(FileExistsError, match="refusing"):
        write_synthetic_msd(real, 2, size=(24, 24, 24))
    assert (real / "dataset.json").read_text() == "{}"


def test_interrupted_synthetic_write_leaves_nothing_that_looks_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = synthetic._write_dataset

    def write_then_crash(folder: Path, params: dict) -> None:
        real_write(folder, params)
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C just before the rename

    monkeypatch.setattr(synthetic, "_write_dataset", write_then_crash)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_msd(tmp_path / "T", 2, size=(24, 24, 24))
    assert list(tmp_path.iterdir()) == []

    monkeypatch.undo()
    root = write_synthetic_msd(tmp_path / "T", 2, size=(24, 24, 24))
    assert len(read_msd_cases(root)) == 2


def test_concurrent_synthetic_writers_agree(tmp_path: Path) -> None:
    """Simulated sites start together and may all ask for the dataset at once; every one must get it whole."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        roots = list(pool.map(lambda _: write_synthetic_msd(tmp_path / "T", 3, size=(24, 24, 24)), range(4)))
    assert set(roots) == {tmp_path / "T"}
    assert [p.name for p in tmp_path.iterdir()] == ["T"]
    assert len(read_msd_cases(tmp_path / "T")) == 3


def test_synthetic_writer_with_test_cases_reloads(tmp_path: Path) -> None:
    root = write_synthetic_msd(tmp_path / "T", 3, size=(24, 24, 24), num_test=2, num_objs=2)
    listing = json.loads((root / "dataset.json").read_text())
    assert listing["test"] == ["./imagesTs/spleen_4.nii.gz", "./imagesTs/spleen_5.nii.gz"]
    assert all((root / p).is_file() for p in listing["test"])
    assert [c.name for c in read_msd_cases(root)] == ["spleen_1", "spleen_2", "spleen_3"]


@pytest.mark.parametrize(
    "kwargs",
    [{"num_cases": 0}, {"size": (8, 8)}, {"radius": (5, 20)}, {"radius": (4, 4)}, {"spacing": (1.0, 0.0, 1.0)}],
)
def test_synthetic_writer_rejects_impossible_parameters(tmp_path: Path, kwargs: dict) -> None:
    args = {"num_cases": 2, "size": (24, 24, 24), **kwargs}
    with pytest.raises(ValueError):
        write_synthetic_msd(tmp_path / "T", **args)


# -- splits -----------------------------------------------------------------------------------------------------


def test_sites_get_disjoint_shares_and_the_same_validation_set(msd_root: Path) -> None:
    sites = [_datamodule(msd_root, i, 2) for i in range(2)]
    train = [{c.name for c in dm.train_cases} for dm in sites]
    val = [{c.name for c in dm.val_cases} for dm in sites]

    assert val[0] == val[1] and len(val[0]) == 2  # 25% of 8
    assert not train[0] & train[1]
    assert not (train[0] | train[1]) & val[0]
    assert len(train[0] | train[1] | val[0]) == NUM_CASES
    assert [dm.num_train_samples for dm in sites] == [3, 3]


def test_data_fraction_halves_a_share(msd_root: Path) -> None:
    full = _datamodule(msd_root, 1, 2)
    half = _datamodule(msd_root, 1, 2, data_fraction=0.5)
    assert full.num_train_samples == 3
    assert half.num_train_samples == 2  # rounded up, so a half site never ends up empty
    assert set(half.train_cases) < set(full.train_cases)
    assert half.val_cases == full.val_cases


def test_split_is_stable_per_seed_and_shares_are_balanced() -> None:
    cases = [MSDCase(f"c{i}", Path(f"/d/imagesTr/c{i}.nii.gz"), Path(f"/d/labelsTr/c{i}.nii.gz")) for i in range(12)]
    splits = [split_cases(cases, i, 3, val_fraction=0.2, seed=7) for i in range(3)]
    # round(12 * 0.2) = 2 held out; the other 10 go 4, 3, 3, every case exactly once.
    assert [len(s.train) for s in splits] == [4, 3, 3]
    assert len({c for s in splits for c in s.train} | set(splits[0].val)) == 12
    assert split_cases(cases, 0, 3, val_fraction=0.2, seed=7) == splits[0]
    assert split_cases(cases, 0, 3, val_fraction=0.2, seed=8) != splits[0]


def test_explicit_validation_cases(msd_root: Path) -> None:
    dm = _datamodule(msd_root, 0, 2, val_cases=["spleen_2", "./imagesTr/spleen_5.nii.gz"])
    assert [c.name for c in dm.val_cases] in (["spleen_2", "spleen_5"], ["spleen_5", "spleen_2"])
    assert dm.num_train_samples == 3

    with pytest.raises(MSDDatasetError, match="spleen_99"):
        _ = _datamodule(msd_root, val_cases=["spleen_99"]).val_cases


def test_invalid_split_arguments_fail_at_construction(msd_root: Path) -> None:
    with pytest.raises(ValueError, match="site_index"):
        MSDDataModule(msd_root, site_index=2, num_sites=2)
    with pytest.raises(ValueError, match="data_fraction"):
        MSDDataModule(msd_root, data_fraction=0.0)
    with pytest.raises(ValueError, match="val_fraction"):
        MSDDataModule(msd_root, val_fraction=1.0)
    with pytest.raises(MSDDatasetError, match="fewer than the 7 sites"):
        _ = MSDDataModule(msd_root, site_index=0, num_sites=7, val_fraction=0.25).num_train_samples


# -- batches ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cache", [False, True])
def test_batches_have_the_expected_shapes_and_binary_labels(msd_root: Path, cache: bool) -> None:
    dm = _datamodule(msd_root, 0, 2, patch_size=16, batch_size=2, samples_per_volume=2, cache=cache)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 2  # 3 volumes, 2 per batch
    first = batches[0]
    assert first["image"].shape == first["label"].shape == (4, 1, 16, 16, 16)  # batch_size * samples_per_volume
    assert first["image"].dtype == torch.float32
    assert 0.0 <= first["image"].min() and first["image"].max() <= 1.0
    assert set(torch.cat([b["label"].unique() for b in batches]).tolist()) == {0.0, 1.0}

    val = list(dm.val_dataloader())
    assert len(val) == 2
    for batch in val:
        assert batch["image"].shape[:2] == (1, 1) and batch["image"].shape == batch["label"].shape
        assert set(batch["label"].unique().tolist()) == {0.0, 1.0}


def test_validation_volumes_do_not_depend_on_caching(msd_root: Path) -> None:
    plain, cached = (_datamodule(msd_root, cache=c) for c in (False, True))
    for dm in (plain, cached):
        dm.setup("validate")
    for a, b in zip(plain.val_dataloader(), cached.val_dataloader()):
        torch.testing.assert_close(a["image"], b["image"])
        torch.testing.assert_close(a["label"], b["label"])


# -- errors name the file ---------------------------------------------------------------------------------------


def test_missing_root_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "Task09_Spleen"
    with pytest.raises(MSDDatasetError, match="nowhere"):
        _datamodule(missing).setup("fit")


def test_missing_dataset_json_is_named(own_root: Path) -> None:
    (own_root / "dataset.json").unlink()
    with pytest.raises(MSDDatasetError) as err:
        _datamodule(own_root).setup("fit")
    assert str(own_root / "dataset.json") in str(err.value)


def test_dataset_json_without_training_is_named(own_root: Path) -> None:
    (own_root / "dataset.json").write_text(json.dumps({"name": "Spleen", "test": []}))
    with pytest.raises(MSDDatasetError, match='"training"') as err:
        read_msd_cases(own_root)
    assert str(own_root / "dataset.json") in str(err.value)


def test_malformed_dataset_json_is_named(own_root: Path) -> None:
    (own_root / "dataset.json").write_text("{not json")
    with pytest.raises(MSDDatasetError) as err:
        read_msd_cases(own_root)
    assert str(own_root / "dataset.json") in str(err.value)


def test_missing_label_is_named(own_root: Path) -> None:
    label = own_root / "labelsTr" / "spleen_3.nii.gz"
    label.unlink()
    with pytest.raises(MSDDatasetError) as err:
        _datamodule(own_root).setup("fit")
    assert str(label) in str(err.value) and "label" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_missing_image_is_named(own_root: Path) -> None:
    image = own_root / "imagesTr" / "spleen_2.nii.gz"
    image.unlink()
    with pytest.raises(MSDDatasetError, match="spleen_2.nii.gz") as err:
        read_msd_cases(own_root)
    assert str(image) in str(err.value)


def test_label_shape_mismatch_is_named_before_loading_volumes(own_root: Path) -> None:
    label = own_root / "labelsTr" / "spleen_4.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((24, 24, 20), np.uint8), np.diag([1.5, 1.5, 2.0, 1.0])), str(label))
    with pytest.raises(MSDDatasetError) as err:
        _ = _datamodule(own_root).num_train_samples
    message = str(err.value)
    assert str(label) in message and "(24, 24, 20)" in message and "(24, 24, 24)" in message


def test_corrupt_volume_is_named(own_root: Path) -> None:
    image = own_root / "imagesTr" / "spleen_1.nii.gz"
    image.write_bytes(b"this is not a NIfTI file")
    with pytest.raises(MSDDatasetError) as err:
        read_msd_cases(own_root)
    assert str(image) in str(err.value)
