"""A synthetic classification task for strategy comparisons: Gaussian classes, an MLP, IID or Dirichlet sites.

Generated, never downloaded: ``num_classes`` Gaussian clusters in ``num_features`` dimensions, each class a mixture
of ``clusters_per_class`` clusters so that a linear model is not enough. The defaults are hard enough not to
saturate: the MLP below, trained centrally, reaches about 88% validation accuracy after 20 epochs. Every site draws
the same dataset from ``seed``, holds out the same validation set (drawn from all classes, so every site measures
the global model on the same IID data), and takes its part of the rest by :mod:`~lightning_fhe.tasks.partition`.

Example::

    import lightning as L
    from lightning_fhe.tasks.classification import MLPClassifier, SyntheticClassificationData

    data = SyntheticClassificationData(site_index=0, num_sites=8, split="dirichlet", alpha=0.3)
    L.Trainer(max_epochs=5, accelerator="cpu").fit(MLPClassifier(), datamodule=data)
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_fhe.tasks.partition import dirichlet_partition, iid_partition

__all__ = ["MLPClassifier", "SyntheticClassificationData", "make_classification"]


def make_classification(
    num_samples: int, num_features: int, num_classes: int, clusters_per_class: int = 3, class_sep: float = 0.7,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """``(features float32 [n, d], labels int64 [n])``: balanced classes, each a mixture of Gaussian clusters with
    unit variance whose centres are ``class_sep`` standard deviations apart on average."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=class_sep, size=(num_classes, clusters_per_class, num_features))
    labels = rng.permutation(np.arange(num_samples) % num_classes)
    cluster = rng.integers(0, clusters_per_class, size=num_samples)
    features = centres[labels, cluster] + rng.normal(size=(num_samples, num_features))
    return features.astype(np.float32), labels.astype(np.int64)


class SyntheticClassificationData(L.LightningDataModule):
    """One site's part of a synthetic classification dataset (see the module docstring).

    Args:
        site_index: this site, ``0 <= site_index < num_sites`` (the simulator's site protocol).
        num_sites: the sites sharing the training samples.
        split: ``"iid"`` (shuffled, equal parts) or ``"dirichlet"`` (per-class shares from Dirichlet(alpha)).
        alpha: the Dirichlet concentration; small is strongly non-IID.
        num_samples: samples in all, validation included.
        num_features: input dimensions.
        num_classes: classes.
        clusters_per_class: Gaussian clusters per class.
        class_sep: spread of the cluster centres, in standard deviations of the noise.
        val_fraction: share of the samples held out as the validation set every site uses.
        batch_size: training batch size.
        seed: seeds the data and the split, the same at every site.
    """

    def __init__(
        self,
        site_index: int = 0,
        num_sites: int = 1,
        split: Literal["iid", "dirichlet"] = "iid",
        alpha: float = 0.3,
        num_samples: int = 12000,
        num_features: int = 32,
        num_classes: int = 10,
        clusters_per_class: int = 3,
        class_sep: float = 0.7,
        val_fraction: float = 0.2,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if split not in ("iid", "dirichlet"):
            raise ValueError(f'split must be "iid" or "dirichlet", got {split!r}')
        if not 0 <= site_index < num_sites:
            raise ValueError(f"site_index must be in 0..{num_sites - 1}, got {site_index}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self._train: TensorDataset | None = None
        self._val: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self._train is not None:
            return
        h = self.hparams
        features, labels = make_classification(
            h.num_samples, h.num_features, h.num_classes, h.clusters_per_class, h.class_sep, h.seed
        )
        held_out = int(round(h.val_fraction * h.num_samples))
        val, train = np.arange(held_out), np.arange(held_out, h.num_samples)  # the samples are shuffled already
        if h.split == "iid":
            parts = [train[p] for p in iid_partition(train.size, h.num_sites, seed=h.seed)]
        else:
            parts = [train[p] for p in dirichlet_partition(labels[train], h.num_sites, h.alpha, seed=h.seed)]
        mine = parts[h.site_index]
        self._train = TensorDataset(torch.from_numpy(features[mine]), torch.from_numpy(labels[mine]))
        self._val = TensorDataset(torch.from_numpy(features[val]), torch.from_numpy(labels[val]))

    @property
    def train_labels(self) -> np.ndarray:
        self.setup()
        return self._train.tensors[1].numpy()

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self._train, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self._val, batch_size=1024)


class MLPClassifier(L.LightningModule):
    """A two-layer perceptron trained with SGD; logs ``train/loss``, ``val/loss`` and ``val/acc``.

    Args:
        num_features: input dimensions.
        num_classes: classes.
        hidden: hidden units.
        lr: the local (client) SGD learning rate.
    """

    def __init__(self, num_features: int = 32, num_classes: int = 10, hidden: int = 64, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(num_features, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", torch.nn.functional.cross_entropy(logits, y), on_epoch=True, batch_size=len(y))
        self.log("val/acc", (logits.argmax(dim=1) == y).float().mean(), on_epoch=True, batch_size=len(y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
