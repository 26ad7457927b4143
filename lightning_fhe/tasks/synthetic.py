"""A small stand-in for the Medical Segmentation Decathlon spleen task (Task09), written in its exact folder layout.

The real dataset cannot be downloaded where this project runs (no network beyond package registries), yet the
experiments must exercise the real loading code. So the default run first writes a synthetic dataset that is
indistinguishable from Task09 to the loader: the same ``dataset.json`` keys, ``imagesTr/`` and ``labelsTr/``
holding gzipped NIfTI volumes with an affine, CT-like intensities in Hounsfield-ish units (so the spleen
tutorial's intensity window applies unchanged) and binary labels. The volumes come from MONAI's 3D test-image
generator: one or a few bright spheres ("spleens") in uniform noise.

Writing is cached and atomic: a marker file records the parameters, a folder that already holds a complete dataset
written with the same parameters is left alone, and a new dataset is written into a temporary sibling folder that
is renamed into place only once complete. Several simulated sites may therefore call the writer at the same time,
and an interrupted write never looks like a finished dataset.

Example::

    >>> import tempfile
    >>> from pathlib import Path
    >>> root = write_synthetic_msd(Path(tempfile.mkdtemp()) / "Task09_Spleen", num_cases=2, size=(24, 24, 24))
    >>> sorted(p.name for p in root.iterdir())
    ['.synthetic-msd.json', 'dataset.json', 'imagesTr', 'labelsTr']
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MARKER_NAME", "synthetic_msd_root", "write_synthetic_msd"]

# The marker doubles as the "complete" flag: it is the last file written into the temporary folder, and the folder
# only becomes visible under its final name by an atomic rename.
MARKER_NAME = ".synthetic-msd.json"

# Bumped whenever the generated content changes for the same parameters, so stale caches are rewritten.
_FORMAT_VERSION = 1


def synthetic_msd_root(
    num_cases: int, size: int | Sequence[int] = 64, seed: int = 0, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Where the synthetic dataset of these parameters lives: one folder per parameter set under ``cache_dir``
    (default ``~/.cache/lightning_fhe/synthetic``), reused across runs and processes."""
    cache = Path(cache_dir or Path.home() / ".cache" / "lightning_fhe" / "synthetic").expanduser().absolute()
    sides = [int(size)] * 3 if isinstance(size, int) else [int(s) for s in size]
    return cache / f"Task09_Spleen-{num_cases}x{'x'.join(map(str, sides))}-seed{seed}"


def write_synthetic_msd(
    root: str | os.PathLike[str],
    num_cases: int,
    size: Sequence[int] = (64, 64, 64),
    seed: int = 0,
    *,
    num_objs: int = 1,
    radius: tuple[int, int] | None = None,
    noise: float = 0.4,
    hu_range: tuple[float, float] = (-160.0, 240.0),
    spacing: Sequence[float] = (1.5, 1.5, 2.0),
    num_test: int = 0,
) -> Path:
    """Write (or reuse) a synthetic spleen dataset in the MSD Task09 layout and return its root folder.

    Args:
        root: The task folder to create, e.g. ``data/Task09_Spleen_synthetic``. Its parent is created if needed.
            An existing folder is only ever replaced if it holds a synthetic dataset written by this function (or
            is empty): real data is never overwritten.
        num_cases: Number of labelled training cases (``imagesTr``/``labelsTr`` pairs).
        size: Volume shape in voxels (x, y, z). Each side must exceed twice the largest sphere radius.
        seed: Seeds the generator; the same parameters always give the same volumes.
        num_objs: Spheres per case. One mimics a single organ; a few make the task slightly harder.
        radius: ``(min, max)`` sphere radius in voxels; by default about a sixth to a third of the smallest side,
            so the foreground is a few percent of the volume, as the spleen is in abdominal CT.
        noise: Upper bound of the uniform noise, on the scale where a case's spheres have one level drawn from
            ``[0.5, 1]``. Below 0.5 the classes are separable, so a small network learns quickly.
        hu_range: Intensities in ``[0, 1]`` are mapped linearly onto this range and stored as int16 "HU". With the
            defaults, spheres lie at 40..240 HU and the background at -160..0 HU, so the spleen tutorial's window
            (-57..164 HU) keeps the spheres and clips most of the background to zero, as it does on real CT.
        spacing: Voxel size in mm written into the NIfTI affine (RAS, origin 0). The default equals the spleen
            tutorial's resampling target, so ``Spacingd`` with its default is an identity.
        num_test: Unlabelled cases written to ``imagesTs`` and listed under ``"test"``, as the real dataset does.

    Returns:
        ``Path(root)``, holding ``dataset.json``, ``imagesTr/``, ``labelsTr/`` (and ``imagesTs/`` if requested).

    Raises:
        ValueError: for impossible parameters (non-positive counts, spheres that do not fit).
        FileExistsError: if ``root`` exists and holds something other than a dataset written by this function.
    """
    root = Path(root)
    size = tuple(int(s) for s in size)
    if len(size) != 3 or min(size) < 4:
        raise ValueError(f"size must be three sides of at least 4 voxels, got {size}")
    if num_cases < 1:
        raise ValueError(f"num_cases must be at least 1, got {num_cases}")
    if num_test < 0 or num_objs < 1:
        raise ValueError(f"num_test must be >= 0 and num_objs >= 1, got {num_test} and {num_objs}")
    if radius is None:
        # create_test_image_3d needs every side > 2 * rad_max and rad_min < rad_max.
        rad_max = max(2, (min(size) - 1) // 3)
        radius = (max(1, rad_max // 2), rad_max)
    rad_min, rad_max = int(radius[0]), int(radius[1])
    if not 1 <= rad_min < rad_max or 2 * rad_max >= min(size):
        raise ValueError(f"radius {radius} must satisfy 1 <= min < max < {min(size)}/2 for size {size}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive numbers, got {tuple(spacing)}")

    params: dict[str, Any] = {
        "format_version": _FORMAT_VERSION,
        "num_cases": int(num_cases),
        "size": list(size),
        "seed": int(seed),
        "num_objs": int(num_objs),
        "radius": [rad_min, rad_max],
        "noise": float(noise),
        "hu_range": [float(hu_range[0]), float(hu_range[1])],
        "spacing": [float(s) for s in spacing],
        "num_test": int(num_test),
    }
    if _read_marker(root) == params:
        return root
    if root.exists() and not _is_replaceable(root):
        raise FileExistsError(
            f"{root} exists and is not a synthetic dataset written by write_synthetic_msd "
            f"(no {MARKER_NAME}); refusing to overwrite it"
        )

    root.parent.mkdir(parents=True, exist_ok=True)
    # The temporary folder sits beside the target so the final rename stays on one filesystem (atomic).
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a dataset folder is meant to be readable like any other
    try:
        _write_dataset(tmp, params)
        _publish(tmp, root, params)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _read_marker(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def _is_replaceable(root: Path) -> bool:
    """Only our own output (stale parameters) or an empty folder may be replaced; anything else may be real data."""
    return (root / MARKER_NAME).is_file() or (root.is_dir() and not any(root.iterdir()))


def _publish(tmp: Path, root: Path, params: dict[str, Any]) -> None:
    """Move the finished folder into place, coping with a concurrent writer and with a stale dataset."""
    try:
        os.rename(tmp, root)  # fails if root exists and is non-empty, which is what protects a concurrent winner
        return
    except OSError:
        pass
    if _read_marker(root) == params:
        return  # another process wrote the same dataset first; ours is discarded by the caller
    if not _is_replaceable(root):
        raise FileExistsError(f"{root} appeared while writing and is not a synthetic dataset; not replacing it")
    # Replace a stale dataset: move it aside first so there is never a half-deleted folder under the final name.
    trash = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
    os.rename(root, trash / "old")
    try:
        os.rename(tmp, root)
    except OSError:
        if _read_marker(root) != params:
            raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def _write_dataset(folder: Path, params: dict[str, Any]) -> None:
    import nibabel as nib  # imported here so that importing the package does not require nibabel
    from monai.data.synthetic import create_test_image_3d

    size = params["size"]
    rad_min, rad_max = params["radius"]
    lo, hi = params["hu_range"]
    affine = np.diag([*params["spacing"], 1.0])
    rng = np.random.RandomState(params["seed"])

    def volume() -> tuple[np.ndarray, np.ndarray]:
        # MONAI draws the spheres (and their binary label with num_seg_classes=1). Intensities follow its recipe,
        # a sphere level in [0.5, 1] and the voxel-wise maximum with uniform noise in [0, noise), but without its
        # per-volume rescale to [0, 1]: that rescale stretches the noise by 1/level, so the background of a dim
        # case would reach into the spleen's HU range and the contrast would vary wildly between cases.
        _, label = create_test_image_3d(
            *size,
            num_objs=params["num_objs"],
            rad_max=rad_max,
            rad_min=rad_min,
            noise_max=0.0,
            num_seg_classes=1,
            random_state=rng,
        )
        mask = label > 0
        level = rng.uniform(0.5, 1.0)
        intensity = np.maximum(mask * level, rng.uniform(0.0, params["noise"], size=mask.shape))
        hu = np.rint(lo + intensity * (hi - lo)).astype(np.int16)
        return hu, mask.astype(np.uint8)

    def save(array: np.ndarray, path: Path) -> None:
        img = nib.Nifti1Image(array, affine)
        img.header.set_xyzt_units("mm")
        # sform and qform both say "scanner" coordinates, as CT volumes from the real dataset do.
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        nib.save(img, str(path))

    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir()
    training = []
    for i in range(1, params["num_cases"] + 1):
        image, label = volume()
        name = f"spleen_{i}.nii.gz"
        save(image, folder / "imagesTr" / name)
        save(label, folder / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    test = []
    if params["num_test"]:
        (folder / "imagesTs").mkdir()
        for i in range(params["num_cases"] + 1, params["num_cases"] + params["num_test"] + 1):
            image, _ = volume()
            name = f"spleen_{i}.nii.gz"
            save(image, folder / "imagesTs" / name)
            test.append(f"./imagesTs/{name}")

    # The same keys as the real Task09_Spleen/dataset.json, so code written against this runs on the real thing.
    dataset = {
        "name": "Spleen",
        "description": "Synthetic spleen segmentation (MONAI test volumes in the MSD Task09 layout)",
        "reference": "generated by lightning_fhe.tasks.synthetic.write_synthetic_msd",
        "licence": "CC-BY-SA 4.0",
        "release": "1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "spleen"},
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
    }
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=4) + "\n")
    (folder / MARKER_NAME).write_text(json.dumps(params, indent=2) + "\n")
