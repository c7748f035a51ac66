"""From the loader's images to the model's input: batches of uint8 images (bad files named beside them), the loader
settings, and the conversion to float on the training device (normalisation, the device-side augmentation, random
erasing). Images leave the loader as uint8 tensors (channels_last batches from OpenCVAugment), which keeps the
worker processes light and the host-to-GPU copy 4x smaller."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from augment import BatchAugment, random_erasing
from config import Config, require_resolved


def collate_skipping_bad(batch: Sequence[tuple[torch.Tensor | None, int | str, str]]
                         ) -> tuple[torch.Tensor, torch.Tensor | list[str], list[str]]:
    """Stack the good images; return the paths (or messages) of the bad ones beside them."""
    good = [b for b in batch if b[0] is not None]
    bad = [b[2] for b in batch if b[0] is None]
    images = stack_images([b[0] for b in good]) if good else torch.empty(0, dtype=torch.uint8)
    second = [b[1] for b in good]
    if second and isinstance(second[0], int):
        second = torch.tensor(second)
    return images, second, bad


def stack_images(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """One uint8 batch. Images whose pixels lie channel-last in memory (OpenCVAugment's CHW views of HWC arrays) make
    a channels_last batch: no transpose here, and to_float_batch normalises it in one pass over rows of pixels."""
    if images[0].dim() == 3 and images[0].stride(0) == 1 and images[0].shape[0] > 1:
        return torch.stack([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)
    return torch.stack(images)


def loader_options(workers: int, device: torch.device) -> dict[str, Any]:
    """DataLoader settings shared by training and prediction: persistent, prefetching workers and pinned memory
    (so that the non-blocking copies to the GPU overlap the compute)."""
    options = dict(num_workers=workers, pin_memory=device.type == "cuda", collate_fn=collate_skipping_bad)
    if workers > 0:
        options.update(persistent_workers=True, prefetch_factor=4)
    return options


def normalisation(cfg: Config) -> tuple[Sequence[float], Sequence[float]]:
    """(mean, std) of the model's input, from the run's resolved settings (the model's own, or set by flags)."""
    require_resolved(cfg, "normalisation")
    return tuple(cfg.mean), tuple(cfg.std)


def to_float_batch(batch: torch.Tensor, device: torch.device, norm: tuple[Sequence[float], Sequence[float]],
                   erasing: float = 0.0, augment: BatchAugment | None = None,
                   channels_last: bool = False) -> torch.Tensor:
    """uint8 NCHW on any device -> float on `device`, normalised with norm = (mean, std); training adds the batch
    augmentation and per-image random erasing (after normalisation, as the seed's RandomErasing)."""
    x = batch.to(device, non_blocking=True).float()  # keeps the batch's memory format
    if augment is not None:
        mean, std = (torch.tensor(values, device=device).view(1, 3, 1, 1) for values in norm)
        x = augment(x.div_(255)).sub_(mean).div_(std)
    else:  # one scale and one shift: two passes over the batch instead of three
        x = scale_channels_(x, *norm_factors(norm, device))
    if erasing > 0:
        x = random_erasing(x, erasing)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def norm_factors(norm: tuple[Sequence[float], Sequence[float]],
                 device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / 255 - mean) / std as x * scale + shift: the per-channel (scale, shift), (1, 3, 1, 1) each. The exported
    graph holds these same factors, so its float rounding is the evaluation's."""
    mean, std = (torch.tensor(values, device=device).view(1, 3, 1, 1) for values in norm)
    return 1 / (255 * std), -mean / std


def scale_channels_(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x * scale + shift per channel, in place. A channels_last batch is seen as its image rows (W*C values, with
    the factors tiled along them): on the CPU a per-channel broadcast over an innermost dimension of C is several
    times slower than this long inner loop."""
    n, channels, height, width = x.shape
    if channels > 1 and x.is_contiguous(memory_format=torch.channels_last):
        rows = x.permute(0, 2, 3, 1).view(n * height, width * channels)
        rows.mul_(scale.flatten().repeat(width)).add_(shift.flatten().repeat(width))
        return x
    return x.mul_(scale).add_(shift)
