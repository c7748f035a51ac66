"""TensorBoard logging for train.py --tensorboard: per-epoch scalars, the best confusion matrix, augmented images.

    tensorboard --logdir checkpoints        # every run folder's tensorboard/ events, side by side
"""
import numbers
import os

import numpy as np
from PIL import Image

from augment import preview_grid
from errors import UserError

# history columns grouped into TensorBoard sections; any other numeric column lands in "other/"
SECTIONS = {"loss": ["train_loss", "val_loss", "val_loss_ema"], "accuracy": ["train_acc", "val_acc", "val_acc_ema"],
            "schedule": ["lr", "focal_share"], "speed": ["images_per_s", "epoch_seconds"]}


def tag(column):
    return next((f"{section}/{column}" for section, columns in SECTIONS.items() if column in columns),
                f"other/{column}")


class Board:
    def __init__(self, run_dir, train_set, cfg):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        # the first training images with their evaluation view in the first column: what the augmentation does
        self.writer.add_image("augmentation", preview_grid(train_set.samples, cfg, images=8, views=7), 0)
        self.writer.flush()

    def log_epoch(self, row, confusion_png=None):
        """Every numeric history column (focal_share gives the loss phase: 0 = CE, 1 = focal) at step = epoch."""
        step = row["epoch"]
        for column, value in row.items():
            if column != "epoch" and isinstance(value, numbers.Number) and value == value:  # skips NaN
                self.writer.add_scalar(tag(column), value, step)
        if confusion_png:  # only written when the best epoch changes
            with Image.open(confusion_png) as img:
                self.writer.add_image("confusion_matrix", np.asarray(img.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self):
        self.writer.close()
