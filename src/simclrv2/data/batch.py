"""A batch of images of different sizes (image folders: each image decoded whole, its aspect ratio kept).

Built-in datasets give batches as one ``uint8`` tensor ``[B, C, S, S]``. Image folders keep every
image whole (docs/method.md §5: the random crop is cut from the whole image), so a batch holds
images of different heights and widths: :class:`ImageBatch` stores them in one zero-padded
``uint8`` tensor (each image in the top-left corner) plus their sizes. The augmentations
(:mod:`simclrv2.data.augment`) draw each image's crop against its own height and width and read
only the pixels inside the image, so the padding never reaches a view.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["ImageBatch", "collate_images"]


class ImageBatch:
    """``pixels``: uint8 ``[B, C, H, W]`` (H, W: the largest height and width in the batch), image
    ``i`` in ``pixels[i, :, :h_i, :w_i]``; ``sizes``: int64 ``[B, 2]`` of ``(h_i, w_i)``, always on
    the CPU (the crop parameters are drawn there). ``to``, ``pin_memory`` and ``shape`` behave as
    a tensor's, so the training loop moves a batch to the device as it moves a tensor."""

    def __init__(self, pixels: Tensor, sizes: Tensor):
        if pixels.dim() != 4 or sizes.shape != (pixels.shape[0], 2):
            raise ValueError(f"ImageBatch: pixels [B, C, H, W] and sizes [B, 2], got {tuple(pixels.shape)} "
                             f"and {tuple(sizes.shape)}")
        self.pixels = pixels
        self.sizes = sizes.to("cpu", torch.int64)

    @classmethod
    def from_images(cls, images: Sequence[Tensor], channels: int | None = None) -> ImageBatch:
        """One batch of uint8 ``[C, h, w]`` images (``channels`` gives an empty batch its channel count)."""
        if not images:
            return cls(torch.zeros((0, channels or 3, 0, 0), dtype=torch.uint8), torch.zeros((0, 2), dtype=torch.int64))
        c = images[0].shape[0]
        if any(im.dim() != 3 or im.shape[0] != c for im in images):
            raise ValueError(f"ImageBatch: images must all be [C, h, w] with C = {c}")
        sizes = torch.tensor([[im.shape[1], im.shape[2]] for im in images], dtype=torch.int64)
        height, width = int(sizes[:, 0].max()), int(sizes[:, 1].max())
        pixels = torch.zeros((len(images), c, height, width), dtype=images[0].dtype)
        for i, im in enumerate(images):
            pixels[i, :, : im.shape[1], : im.shape[2]] = im
        return cls(pixels, sizes)

    @property
    def shape(self) -> torch.Size:
        return self.pixels.shape

    @property
    def device(self) -> torch.device:
        return self.pixels.device

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def __getitem__(self, rows: slice) -> ImageBatch:
        if not isinstance(rows, slice):
            raise TypeError("an ImageBatch is sliced by a range of rows, e.g. batch[2:5]")
        return ImageBatch(self.pixels[rows], self.sizes[rows])

    def image(self, i: int) -> Tensor:
        """Image ``i`` without its padding: a view ``[C, h_i, w_i]``."""
        h, w = (int(v) for v in self.sizes[i])
        return self.pixels[i, :, :h, :w]

    def images(self) -> list[Tensor]:
        return [self.image(i) for i in range(len(self))]

    def repeat(self, n: int, *ones: int) -> ImageBatch:
        """The batch ``n`` times over: ``batch.repeat(n, 1, 1, 1)`` as a tensor's."""
        return ImageBatch(self.pixels.repeat(n, 1, 1, 1), self.sizes.repeat(n, 1))

    def to(self, device, non_blocking: bool = False) -> ImageBatch:
        return ImageBatch(self.pixels.to(device, non_blocking=non_blocking), self.sizes)

    def pin_memory(self) -> ImageBatch:
        return ImageBatch(self.pixels.pin_memory(), self.sizes)

    def __repr__(self) -> str:
        return f"ImageBatch({len(self)} images, {self.shape[1]} channels, padded to {self.shape[2]}x{self.shape[3]})"


def collate_images(samples: Sequence[tuple[Tensor, int]]) -> tuple[ImageBatch, Tensor]:
    """DataLoader ``collate_fn`` of image-folder datasets: ``(ImageBatch, int64 labels)``."""
    images = [s[0] for s in samples]
    labels = torch.tensor([int(s[1]) for s in samples], dtype=torch.int64)
    return ImageBatch.from_images(images), labels
