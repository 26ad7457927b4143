"""The seed's experiment as reusable pieces: Decathlon data per site, the spleen model, a synthetic dataset.

- :class:`MSDDataModule` serves one site's disjoint share of a Medical Segmentation Decathlon task folder.
- :class:`SpleenSegmentation` is MONAI's SegResNet with Dice loss and Dice metric as a LightningModule.
- :func:`write_synthetic_msd` writes a small dataset in the Task09 layout, for runs without the real data.
- :class:`SyntheticClassificationData` and :class:`MLPClassifier`: a generated classification task split among
  sites IID or by Dirichlet(alpha) labels (:func:`iid_partition`, :func:`dirichlet_partition`), for strategies.

Settings for a quick CPU run where the Dice visibly climbs (measured on 2 cores, 8 epochs in about 8 s when the
machine is otherwise idle, Dice 0.6 -> 0.9): ``write_synthetic_msd(root, num_cases=12, size=(48, 48, 48))``,
``MSDDataModule(root, ..., patch_size=32, samples_per_volume=2, batch_size=1, val_fraction=0.25, cache=True)``,
``SpleenSegmentation(init_filters=8, lr=3e-3, roi_size=32)``. The real Task09 wants the defaults (96^3 patches,
``init_filters=16``, lr 1e-4) and a GPU.
"""

from lightning_fhe.tasks.classification import MLPClassifier, SyntheticClassificationData, make_classification
from lightning_fhe.tasks.msd import MSDCase, MSDDataModule, MSDDatasetError, MSDSplit, read_msd_cases, split_cases
from lightning_fhe.tasks.partition import PartitionError, dirichlet_partition, iid_partition
from lightning_fhe.tasks.spleen import SpleenSegmentation
from lightning_fhe.tasks.synthetic import synthetic_msd_root, write_synthetic_msd

__all__ = [
    "MLPClassifier",
    "MSDCase",
    "MSDDataModule",
    "MSDDatasetError",
    "MSDSplit",
    "PartitionError",
    "SpleenSegmentation",
    "SyntheticClassificationData",
    "dirichlet_partition",
    "iid_partition",
    "make_classification",
    "read_msd_cases",
    "split_cases",
    "synthetic_msd_root",
    "write_synthetic_msd",
]
