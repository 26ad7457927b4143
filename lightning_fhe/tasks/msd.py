"""Medical Segmentation Decathlon data for federated experiments: one site's disjoint share of a task folder.

The seed's experiment trains MONAI's SegResNet on the Decathlon spleen CT (Task09) with each site holding a
disjoint part of the training cases, and "half of the sites use half of the data". :class:`MSDDataModule` reads
the Decathlon layout from a folder (``dataset.json``, ``imagesTr/``, ``labelsTr/``), splits the cases the same
way in every site's process (a fixed-seed shuffle, a validation set common to all sites so the global model's
Dice is measured on the same volumes everywhere, then ``num_sites`` disjoint shares) and serves its site's share
with the preprocessing of MONAI's spleen tutorial.

A broken dataset should fail before any training starts and say which file is at fault, since a site operator
has to fix it by hand: :func:`read_msd_cases` checks that every listed file exists and that every label volume
has its image's shape, by reading NIfTI headers only (milliseconds per case), and raises
:class:`MSDDatasetError` naming the path.

The split itself is pure logic (:func:`split_cases`), testable without any file.

Example::

    >>> import tempfile
    >>> from pathlib import Path
    >>> from lightning_fhe.tasks.synthetic import write_synthetic_msd
    >>> root = write_synthetic_msd(Path(tempfile.mkdtemp()) / "Task09", num_cases=6, size=(32, 32, 32))
    >>> dm = MSDDataModule(root, site_index=0, num_sites=2, val_fraction=0.34, patch_size=16, pixdim=None)
    >>> dm.num_train_samples, len(dm.val_cases)
    (2, 2)
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from monai.data import CacheDataset, DataLoader, Dataset
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandCropByPosNegLabeld,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

__all__ = ["MSDCase", "MSDDataModule", "MSDDatasetError", "MSDSplit", "read_msd_cases", "split_cases"]

_KEYS = ("image", "label")


class MSDDatasetError(ValueError):
    """A Decathlon task folder is missing, incomplete or inconsistent; the message names the offending path."""


@dataclass(frozen=True)
class MSDCase:
    """One labelled training case: absolute paths, plus the name ``dataset.json`` lists it under."""

    name: str
    image: Path
    label: Path

    def as_dict(self) -> dict[str, str]:
        """The form MONAI's dictionary transforms expect."""
        return {"image": str(self.image), "label": str(self.label)}


@dataclass(frozen=True)
class MSDSplit:
    """One site's view of the task: its training cases and the validation cases every site shares."""

    train: tuple[MSDCase, ...]
    val: tuple[MSDCase, ...]


def _case_name(listed: str) -> str:
    """``./imagesTr/spleen_19.nii.gz`` -> ``spleen_19``: the identifier a user would type."""
    name = Path(listed).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_msd_cases(root: str | os.PathLike[str], check_headers: bool = True) -> list[MSDCase]:
    """The labelled training cases of a Decathlon task folder, in ``dataset.json`` order, checked.

    Args:
        root: The task folder (e.g. ``Task09_Spleen``) holding ``dataset.json``.
        check_headers: Read every image's and label's NIfTI header and compare their spatial shapes. Headers are
            a few hundred bytes, so this costs milliseconds per case and saves a crash hours into a run.

    Raises:
        MSDDatasetError: naming the path of the missing folder, the missing or malformed ``dataset.json``, the
            missing or unreadable image or label, or the label whose shape differs from its image's.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise MSDDatasetError(f"MSD task folder not found: {root}")
    index = root / "dataset.json"
    if not index.is_file():
        raise MSDDatasetError(f"MSD dataset.json not found: {index}")
    try:
        listing = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MSDDatasetError(f"cannot read {index}: {err}") from err
    if not isinstance(listing, dict) or not isinstance(listing.get("training"), list):
        raise MSDDatasetError(f'{index} has no "training" list of {{"image": ..., "label": ...}} entries')
    if not listing["training"]:
        raise MSDDatasetError(f'{index} lists no training cases under "training"')

    cases: list[MSDCase] = []
    for position, entry in enumerate(listing["training"]):
        if not (isinstance(entry, dict) and all(isinstance(entry.get(key), str) for key in _KEYS)):
            raise MSDDatasetError(
                f'{index}: training entry {position} must be {{"image": path, "label": path}}, got {entry!r}'
            )
        # Entries are relative to the task folder ("./imagesTr/x.nii.gz"); an absolute path is honoured as is.
        # abspath, not resolve: an error should show the path the user laid out, not where a symlink points.
        image, label = (Path(os.path.abspath(root / entry[key])) for key in ("image", "label"))
        for path, what in ((image, "image"), (label, "label")):
            if not path.is_file():
                raise MSDDatasetError(f"{what} listed in {index} not found: {path}")
        cases.append(MSDCase(name=_case_name(entry["image"]), image=image, label=label))

    names = [case.name for case in cases]
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise MSDDatasetError(f"{index} lists case {duplicate!r} more than once")
    if check_headers:
        for case in cases:
            image_shape, label_shape = _spatial_shape(case.image), _spatial_shape(case.label)
            if image_shape != label_shape:
                raise MSDDatasetError(
                    f"label {case.label} has shape {label_shape} but its image {case.image} has {image_shape}"
                )
    return cases


def _spatial_shape(path: Path) -> tuple[int, ...]:
    try:
        import nibabel as nib
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("reading MSD NIfTI volumes needs nibabel: pip install nibabel") from err
    try:
        # nib.load parses the header only; the voxel data stays on disk until asked for.
        return tuple(int(s) for s in nib.load(str(path)).shape[:3])
    except Exception as err:  # nibabel raises several unrelated types for a corrupt file
        raise MSDDatasetError(f"cannot read the NIfTI header of {path}: {err}") from err


def _check_split_arguments(site_index: int, num_sites: int, data_fraction: float, val_fraction: float) -> None:
    if num_sites < 1 or not 0 <= site_index < num_sites:
        raise ValueError(f"site_index must be in [0, {num_sites}) for {num_sites} sites, got {site_index}")
    if not 0.0 < data_fraction <= 1.0:
        raise ValueError(f"data_fraction must be in (0, 1], got {data_fraction}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")


def split_cases(
    cases: Sequence[MSDCase],
    site_index: int,
    num_sites: int,
    *,
    data_fraction: float = 1.0,
    val_fraction: float = 0.2,
    val_cases: Sequence[str] | None = None,
    seed: int = 0,
) -> MSDSplit:
    """Split cases into a shared validation set and ``num_sites`` disjoint training shares; return one site's.

    Every site must compute the same partition independently, so it depends only on the case list and ``seed``
    (a private :class:`random.Random`, untouched by ``seed_everything``). Shares are contiguous runs of the
    shuffled list whose sizes differ by at most one; ``data_fraction`` then keeps the first part of the site's
    share (rounded up, at least one case), so a smaller fraction is always a subset of a larger one.

    Args:
        cases: All labelled cases, e.g. from :func:`read_msd_cases`.
        site_index: This site, ``0 <= site_index < num_sites``.
        num_sites: How many sites share the training cases.
        data_fraction: Part of its share this site trains on, in ``(0, 1]``; the seed's "half of the sites use
            half of the data" is 0.5 for half of the sites.
        val_fraction: Part of all cases held out for validation (at least one case when positive). Ignored when
            ``val_cases`` is given.
        val_cases: Explicit validation cases, by name (``spleen_19``), file name or the path as listed.
        seed: Seeds the shuffle.
    """
    _check_split_arguments(site_index, num_sites, data_fraction, val_fraction)

    order = list(range(len(cases)))
    random.Random(seed).shuffle(order)
    if val_cases is not None:
        by_alias: dict[str, int] = {}
        for i, case in enumerate(cases):
            for alias in (case.name, case.image.name, str(case.image)):
                by_alias[alias] = i
        wanted: list[int] = []
        for name in val_cases:
            key = name if name in by_alias else _case_name(name)
            if key not in by_alias:
                raise MSDDatasetError(f"validation case {name!r} is not among the training cases of dataset.json")
            wanted.append(by_alias[key])
        held = set(wanted)
        val_idx = [i for i in order if i in held]
    else:
        num_val = max(1, round(len(cases) * val_fraction)) if val_fraction > 0 else 0
        val_idx = order[:num_val]
    held = set(val_idx)
    rest = [i for i in order if i not in held]
    if len(rest) < num_sites:
        raise MSDDatasetError(
            f"{len(cases)} cases leave {len(rest)} for training after validation, fewer than the {num_sites} sites"
        )

    # Contiguous shares, sizes differing by at most one (numpy.array_split's rule), stable as data_fraction varies.
    base, extra = divmod(len(rest), num_sites)
    start = site_index * base + min(site_index, extra)
    share = rest[start : start + base + (1 if site_index < extra else 0)]
    # The epsilon keeps 10 * 0.3 = 3.0000000000000004 from rounding up to 4.
    keep = max(1, math.ceil(len(share) * data_fraction - 1e-9))
    return MSDSplit(train=tuple(cases[i] for i in share[:keep]), val=tuple(cases[i] for i in val_idx))


def _synthetic_args(synthetic: Any) -> dict[str, Any]:
    allowed = {"num_cases", "size", "seed", "cache_dir"}
    if not isinstance(synthetic, dict) or "num_cases" not in synthetic or set(synthetic) - allowed:
        raise ValueError(
            f"root=None needs synthetic={{num_cases: N, size: S, seed: 0, cache_dir: null}} (keys {sorted(allowed)}), "
            f"got {synthetic!r}"
        )
    return {"size": 64, "seed": 0, "cache_dir": None, **synthetic}


class MSDDataModule(L.LightningDataModule):
    """One site's share of a Medical Segmentation Decathlon task, preprocessed as in MONAI's spleen tutorial.

    Example::

        from lightning_fhe.tasks import MSDDataModule, SpleenSegmentation, write_synthetic_msd

        root = write_synthetic_msd("data/Task09_Spleen_synthetic", num_cases=12, size=(48, 48, 48))
        dm = MSDDataModule(root, site_index=1, num_sites=2, data_fraction=0.5, patch_size=32, batch_size=1,
                           val_fraction=0.25, cache=True)
        model = SpleenSegmentation(init_filters=8, lr=3e-3, roi_size=32)
        L.Trainer(max_epochs=8, accelerator="cpu").fit(model, datamodule=dm)

    Training batches hold ``batch_size * samples_per_volume`` random patches of shape ``(1, *patch_size)``, half
    of them centred on foreground; validation serves whole volumes one at a time for sliding-window inference.

    Args:
        root: The task folder holding ``dataset.json``, ``imagesTr/`` and ``labelsTr/``; ``None``: the synthetic
            dataset that ``synthetic`` describes, written by :meth:`prepare_data` (once, cached) and then read
            like real data.
        site_index: This site, ``0 <= site_index < num_sites``.
        num_sites: How many sites split the training cases.
        data_fraction: Part of its share this site uses, in ``(0, 1]`` (the seed's half-data sites use 0.5).
        val_fraction: Part of all cases held out as the validation set common to every site.
        val_cases: Explicit validation cases by name (``spleen_19``) or path; overrides ``val_fraction``.
        patch_size: Training patch size (an int for a cube). The tutorial uses 96; small synthetic volumes 32.
        samples_per_volume: Random patches drawn per volume per epoch (``RandCropByPosNegLabeld.num_samples``).
        batch_size: Volumes per training batch.
        pixdim: Resample to this voxel size in mm (``Spacingd``); ``None`` keeps the stored spacing.
        intensity_window: CT window ``(a_min, a_max)`` in HU scaled to ``[0, 1]`` and clipped; ``None`` skips it.
        num_workers: DataLoader worker processes. 0 loads in the training process, which is best for tiny data.
        cache: Keep the deterministic part of the preprocessing in memory (``CacheDataset``), so each epoch only
            draws random patches; costs memory of the order of the preprocessed volumes.
        seed: Seeds the case shuffle (not the random patches, which follow ``seed_everything``).
        check_headers: Check label shapes against image shapes at setup (cheap; see :func:`read_msd_cases`).
        synthetic: With ``root=None``: :func:`~lightning_fhe.tasks.synthetic.write_synthetic_msd`'s ``num_cases``,
            ``size`` and ``seed``, and ``cache_dir`` (where it is written; default ``~/.cache/lightning_fhe``).
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None,
        site_index: int = 0,
        num_sites: int = 1,
        *,
        data_fraction: float = 1.0,
        val_fraction: float = 0.2,
        val_cases: Sequence[str] | None = None,
        patch_size: int | Sequence[int] = 96,
        samples_per_volume: int = 2,
        batch_size: int = 2,
        pixdim: Sequence[float] | None = (1.5, 1.5, 2.0),
        intensity_window: tuple[float, float] | None = (-57.0, 164.0),
        num_workers: int = 0,
        cache: bool = False,
        seed: int = 0,
        check_headers: bool = True,
        synthetic: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        patch = (int(patch_size),) * 3 if isinstance(patch_size, int) else tuple(int(p) for p in patch_size)
        if len(patch) != 3 or min(patch) < 1:
            raise ValueError(f"patch_size must be an int or three positive ints, got {patch_size!r}")
        if samples_per_volume < 1 or batch_size < 1 or num_workers < 0:
            raise ValueError("samples_per_volume and batch_size must be >= 1 and num_workers >= 0")
        # The split's own arguments are checked again by split_cases; checking here makes a bad config fail at
        # construction rather than at setup, when a Trainer may already be running.
        _check_split_arguments(site_index, num_sites, data_fraction, val_fraction)
        self.save_hyperparameters()
        self.synthetic = None if root is not None else _synthetic_args(synthetic)
        if root is None:
            from lightning_fhe.tasks.synthetic import synthetic_msd_root

            root = synthetic_msd_root(**self.synthetic)
        self.root = Path(root).expanduser()
        self.site_index = site_index
        self.num_sites = num_sites
        self.data_fraction = data_fraction
        self.val_fraction = val_fraction
        self.val_case_names = None if val_cases is None else list(val_cases)
        self.patch_size: tuple[int, int, int] = patch  # type: ignore[assignment]
        self.samples_per_volume = samples_per_volume
        self.batch_size = batch_size
        self.pixdim = None if pixdim is None else tuple(float(p) for p in pixdim)
        self.intensity_window = None if intensity_window is None else tuple(float(v) for v in intensity_window)
        self.num_workers = num_workers
        self.cache = cache
        self.seed = seed
        self.check_headers = check_headers
        self._split: MSDSplit | None = None
        self._train_ds: Dataset | None = None
        self._val_ds: Dataset | None = None

    def prepare_data(self) -> None:
        """Writes the synthetic dataset when there is no ``root`` (a no-op once written, and for real data)."""
        if self.synthetic is not None:
            from lightning_fhe.tasks.synthetic import write_synthetic_msd

            args = {k: v for k, v in self.synthetic.items() if k != "cache_dir"}
            write_synthetic_msd(self.root, **args)

    # -- the split ---------------------------------------------------------------------------------------------

    @property
    def split(self) -> MSDSplit:
        """This site's cases; reading and checking ``dataset.json`` on first use (cheap, headers only)."""
        if self._split is None:
            cases = read_msd_cases(self.root, check_headers=self.check_headers)
            self._split = split_cases(
                cases,
                self.site_index,
                self.num_sites,
                data_fraction=self.data_fraction,
                val_fraction=self.val_fraction,
                val_cases=self.val_case_names,
                seed=self.seed,
            )
        return self._split

    @property
    def train_cases(self) -> tuple[MSDCase, ...]:
        return self.split.train

    @property
    def val_cases(self) -> tuple[MSDCase, ...]:
        return self.split.val

    @property
    def num_train_samples(self) -> int:
        """Training volumes at this site: the weight of its update in federated averaging."""
        return len(self.split.train)

    # -- transforms --------------------------------------------------------------------------------------------

    def _deterministic_transforms(self) -> list[MapTransform]:
        """Loading and normalisation shared by training and validation: what ``cache=True`` keeps in memory."""
        transforms: list[MapTransform] = [
            LoadImaged(keys=_KEYS, image_only=True),
            EnsureChannelFirstd(keys=_KEYS),
            # Explicit labels keep "RAS" meaning what it meant in MONAI's tutorial across MONAI's default change.
            Orientationd(keys=_KEYS, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        ]
        if self.pixdim is not None:
            # Nearest for the label: interpolating a label would invent fractional classes.
            transforms.append(Spacingd(keys=_KEYS, pixdim=self.pixdim, mode=("bilinear", "nearest")))
        if self.intensity_window is not None:
            a_min, a_max = self.intensity_window
            transforms.append(
                ScaleIntensityRanged(keys="image", a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True)
            )
        transforms.append(
            # Dropping the air around the body shrinks volumes a lot on real CT; the coordinates it would record
            # are not needed and would only clutter batches.
            CropForegroundd(
                keys=_KEYS, source_key="image", allow_smaller=True, start_coord_key=None, end_coord_key=None
            )
        )
        return transforms

    def train_transforms(self) -> Compose:
        return Compose(
            [
                *self._deterministic_transforms(),
                # A cropped-to-foreground volume may be smaller than a patch; padding keeps every patch full size.
                SpatialPadd(keys=_KEYS, spatial_size=self.patch_size),
                RandCropByPosNegLabeld(
                    keys=_KEYS,
                    label_key="label",
                    spatial_size=self.patch_size,
                    pos=1,
                    neg=1,
                    num_samples=self.samples_per_volume,
                    image_key="image",
                    image_threshold=0,
                ),
                # Plain tensors: metadata is not needed downstream and MetaTensor adds overhead to every op.
                EnsureTyped(keys=_KEYS, track_meta=False),
            ]
        )

    def val_transforms(self) -> Compose:
        return Compose([*self._deterministic_transforms(), EnsureTyped(keys=_KEYS, track_meta=False)])

    # -- LightningDataModule -----------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Check the dataset and build this site's datasets; every process computes the same split."""
        self.prepare_data()  # synthetic data outside a Trainer, which calls prepare_data itself
        split = self.split  # raises MSDDatasetError before any volume is read
        if stage in (None, "fit") and self._train_ds is None:
            self._train_ds = self._dataset([c.as_dict() for c in split.train], self.train_transforms())
        if stage in (None, "fit", "validate") and self._val_ds is None and split.val:
            self._val_ds = self._dataset([c.as_dict() for c in split.val], self.val_transforms())

    def _dataset(self, items: list[dict[str, str]], transform: Compose) -> Dataset:
        if self.cache:
            # Caching stops at the first random transform, so training still sees fresh patches every epoch.
            return CacheDataset(items, transform, cache_rate=1.0, num_workers=max(1, self.num_workers), progress=False)
        return Dataset(items, transform)

    def train_dataloader(self) -> DataLoader:
        if self._train_ds is None:
            self.setup("fit")
        # monai.data.DataLoader seeds the transforms' random state from torch's generator (also with
        # num_workers=0), so patches are reproducible under seed_everything.
        return DataLoader(
            self._train_ds,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list[Any]:
        if self._val_ds is None:
            self.setup("validate")
        if self._val_ds is None:
            return []  # no validation cases (val_fraction=0): Lightning then skips validation
        # One volume per batch: volumes differ in shape after cropping to the foreground.
        return DataLoader(self._val_ds, batch_size=1, shuffle=False, num_workers=self.num_workers)
