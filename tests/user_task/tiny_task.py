"""A user's own task, outside the package: what `python -m lightning_fhe.simulate` must run by class path.

The data module learns its site through ``partition(site_index, num_sites)`` (the protocol's second form), splits
its labels IID or by Dirichlet(alpha) with the package's helpers, and writes which labels it got to
``partition-site<i>.json`` in the working folder, so the test can see the split each site trained on.
"""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_fhe.tasks import dirichlet_partition, iid_partition


class TinyLabels(L.LightningDataModule):
    def __init__(self, split: str = "iid", alpha: float = 0.3, samples: int = 400, seed: int = 0) -> None:
        super().__init__()
        self.split, self.alpha, self.samples, self.seed = split, alpha, samples, seed
        rng = np.random.default_rng(seed)
        self.labels = rng.integers(0, 4, size=samples)
        self.features = (rng.normal(size=(samples, 8)) + self.labels[:, None]).astype(np.float32)
        self.indices: np.ndarray | None = None

    def partition(self, site_index: int, num_sites: int) -> None:
        if self.split == "iid":
            parts = iid_partition(self.samples, num_sites, seed=self.seed)
        else:
            parts = dirichlet_partition(self.labels, num_sites, self.alpha, seed=self.seed, min_samples=20)
        self.indices = parts[site_index]
        counts = np.bincount(self.labels[self.indices], minlength=4).tolist()
        with open(f"partition-site{site_index}.json", "w") as f:
            json.dump({"split": self.split, "counts": counts}, f)

    def _loader(self, indices: np.ndarray, shuffle: bool) -> DataLoader:
        data = TensorDataset(torch.from_numpy(self.features[indices]), torch.from_numpy(self.labels[indices]))
        return DataLoader(data, batch_size=16, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.indices, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.indices, shuffle=False)  # each site validates on its own data


class TinyClassifier(L.LightningModule):
    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.lr = lr
        self.net = torch.nn.Linear(8, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self.net(x).argmax(1) == y).float().mean(), batch_size=len(y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)
