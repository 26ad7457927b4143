"""The seed's model: MONAI SegResNet segmenting the spleen in 3D CT, as a LightningModule.

Clara Train 4.0's HE benchmark trains SegResNet on the Decathlon spleen task and reports the best average
validation Dice of the global model. :class:`SpleenSegmentation` is that recipe in Lightning form, written like
MONAI's spleen tutorial: Dice loss on softmax outputs with one-hot labels, Adam, and validation by sliding-window
inference over whole volumes scored with the foreground Dice. It knows nothing about federation: the
``HEFederation`` callback averages its weights like any other module's, and the Dice logged after a round is the
global model's.

Logged metrics: ``train/loss`` (per epoch, mean over batches), ``val/loss`` and ``val/dice`` (mean foreground
Dice over the validation volumes of the epoch).

Example::

    import lightning as L
    from lightning_fhe.tasks import MSDDataModule, SpleenSegmentation, write_synthetic_msd

    L.seed_everything(0)
    root = write_synthetic_msd("data/Task09_Spleen_synthetic", num_cases=12, size=(48, 48, 48))
    dm = MSDDataModule(root, site_index=0, num_sites=1, patch_size=32, batch_size=1, val_fraction=0.25, cache=True)
    trainer = L.Trainer(max_epochs=8, accelerator="cpu")
    trainer.fit(SpleenSegmentation(init_filters=8, lr=3e-3, roi_size=32), datamodule=dm)
    print(trainer.callback_metrics["val/dice"])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import lightning as L
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss, DiceLoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

from lightning_fhe.models import segresnet

__all__ = ["SpleenSegmentation"]

_NUM_CLASSES = 2  # background, spleen


class SpleenSegmentation(L.LightningModule):
    """SegResNet (3D, 1 channel in, background/spleen out) trained with Dice loss and scored with Dice.

    Args:
        init_filters: SegResNet's first-level width, a multiple of 8 (its GroupNorm has 8 groups). 16 is the
            seed's 4.7 M-parameter model; 8 (1.2 M) trains on a CPU in seconds on small synthetic volumes.
        lr: Adam's learning rate. MONAI's tutorial uses 1e-4 for 96^3 patches of real CT over hundreds of epochs;
            a few epochs on small synthetic volumes want about 3e-3.
        weight_decay: Adam's L2 penalty.
        loss: ``"dice"`` (``DiceLoss``, as the seed) or ``"dicece"`` (Dice plus cross-entropy, which gives useful
            gradients sooner when the foreground is tiny).
        roi_size: Sliding-window size for validation (an int for a cube); normally the training patch size.
        sw_batch_size: Windows evaluated at once; more is faster and takes more memory.
        sw_overlap: Overlap between neighbouring windows; more is smoother and slower.
    """

    def __init__(
        self,
        init_filters: int = 16,
        lr: float = 1e-4,
        weight_decay: float = 1e-5,
        loss: Literal["dice", "dicece"] = "dice",
        roi_size: int | Sequence[int] = 96,
        sw_batch_size: int = 4,
        sw_overlap: float = 0.25,
    ) -> None:
        super().__init__()
        if loss not in ("dice", "dicece"):
            raise ValueError(f'loss must be "dice" or "dicece", got {loss!r}')
        if init_filters < 8 or init_filters % 8:
            # SegResNet normalises with GroupNorm(8 groups), which torch rejects with a less obvious message.
            raise ValueError(
                f"init_filters must be a positive multiple of 8 (SegResNet's GroupNorm), got {init_filters}"
            )
        self.save_hyperparameters()
        self.net = segresnet(init_filters)
        self.roi_size: tuple[int, ...] = (
            (int(roi_size),) * 3 if isinstance(roi_size, int) else tuple(int(r) for r in roi_size)
        )
        # to_onehot_y: labels arrive as one channel of class indices; softmax: the net outputs logits.
        self.loss_fn = (DiceLoss if loss == "dice" else DiceCELoss)(to_onehot_y=True, softmax=True)
        # Background Dice is near 1 on any CT and would hide how well the spleen itself is found.
        self.dice_metric = DiceMetric(include_background=False, reduction="mean", get_not_nans=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch["image"], batch["label"]
        loss = self.loss_fn(self(images), labels)
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=images.shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch["image"], batch["label"]
        # Whole volumes are larger than a training patch; windows of the patch size keep the receptive field and
        # the memory the network was trained with.
        logits = sliding_window_inference(
            images, self.roi_size, self.hparams.sw_batch_size, self.net, overlap=self.hparams.sw_overlap
        )
        val_loss = self.loss_fn(logits, labels)
        # sync_dist: under DDP each rank sees different volumes; unlike DiceMetric, self.log does not gather itself.
        self.log("val/loss", val_loss, on_epoch=True, batch_size=images.shape[0], sync_dist=True)
        preds = one_hot(logits.argmax(dim=1, keepdim=True), num_classes=_NUM_CLASSES)
        self.dice_metric(y_pred=preds, y=one_hot(labels.long(), num_classes=_NUM_CLASSES))

    def on_validation_epoch_end(self) -> None:
        # DiceMetric gathers its buffers across processes itself, so the value is already global under DDP and
        # must not be averaged again by Lightning. A volume without foreground gives NaN and is left out of the
        # mean; if every volume lacks foreground the mean is NaN, which is honest.
        dice = self.dice_metric.aggregate().item()
        self.dice_metric.reset()
        self.log("val/dice", dice, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
