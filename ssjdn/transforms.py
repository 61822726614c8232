"""Image preprocessing with Pillow + numpy only (no torchvision): PIL RGB image -> normalised float tensor [3, H, W].

torch is imported only where it is needed (the tensor wrap and the training augmentations' random numbers):
`ImageTransform.array` at eval time needs no torch, so Ray Data's decode tasks do not pay its import.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageTransform:
    """`ImageTransform(size, train)(pil_image) -> FloatTensor[3, size, size]`.

    Eval: resize the whole scene to size x size (no centre crop: a remote-sensing scene has no centre object).
    Train: random resized crop (area in [crop_scale_min, 1], aspect in [3/4, 4/3]), random horizontal/vertical flip
    and, with `rotate90`, a random multiple of 90 degrees (aerial scenes have no canonical orientation).
    Randomness comes from torch's global generator, so DataLoader workers get distinct, seeded streams.
    Picklable (plain attributes) so it can be shipped to DataLoader / Ray workers.
    """

    def __init__(
        self,
        size: int,
        train: bool,
        *,
        crop_scale_min: float = 0.6,
        rotate90: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if size < 8:
            raise ValueError(f"image size {size} is too small")
        self.size = int(size)
        self.train = bool(train)
        self.crop_scale_min = float(crop_scale_min)
        self.rotate90 = bool(rotate90)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)

    @classmethod
    def from_config(cls, data_cfg, train: bool) -> ImageTransform:
        return cls(
            data_cfg.image_size,
            train,
            crop_scale_min=data_cfg.crop_scale_min,
            rotate90=data_cfg.rotate90,
            mean=data_cfg.mean,
            std=data_cfg.std,
        )

    def _crop_box(self, w: int, h: int) -> tuple[int, int, int, int]:
        import torch

        area = w * h
        for _ in range(10):
            target = area * (self.crop_scale_min + (1 - self.crop_scale_min) * torch.rand(()).item())
            log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(()).item()
            ratio = math.exp(log_ratio)
            cw = round(math.sqrt(target * ratio))
            ch = round(math.sqrt(target / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                x = int(torch.randint(0, w - cw + 1, ()).item())
                y = int(torch.randint(0, h - ch + 1, ()).item())
                return x, y, x + cw, y + ch
        return 0, 0, w, h

    def __call__(self, image: Image.Image):
        """FloatTensor [3, size, size]."""
        import torch

        return torch.from_numpy(self.array(image))

    def array(self, image: Image.Image) -> np.ndarray:
        """The same as a float32 numpy array [3, size, size] (eval: no torch involved)."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        if self.train:
            import torch

            image = image.resize((self.size, self.size), Image.BILINEAR, box=self._crop_box(*image.size))
            if torch.rand(()).item() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            if torch.rand(()).item() < 0.5:
                image = image.transpose(Image.FLIP_TOP_BOTTOM)
            if self.rotate90:
                k = int(torch.randint(0, 4, ()).item())
                if k:
                    image = image.transpose((Image.ROTATE_90, Image.ROTATE_180, Image.ROTATE_270)[k - 1])
        elif image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.BILINEAR)
        arr = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
        arr = (arr - self.mean) / self.std
        return np.ascontiguousarray(arr)
