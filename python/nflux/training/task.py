"""What the trainer feeds a flow, per kind of data: model inputs, batches, NLL units.

- `VectorTask` (toy and tabular data): inputs are the data standardised with a `Standardizer`
  fitted on the train split (recorded in the run config); NLLs are reported in data units by
  adding back the standardiser's constant log|det|; samples are mapped back to data units.
- `ImageTask` (integer images, levels 0..L-1): inputs are dequantised to [0, 1)^D as
  `nflux.transforms.preprocess.Dequantize` does, y = (x + u) / L, with the noise u drawn from
  the trainer's data generator (so every rank of a distributed run sees the same global
  batch); validation and test images are dequantised once with a generator fixed by the seed,
  so their NLLs are deterministic. NLLs are in nats of the integer images (log p(y) - D log L,
  the bound behind bits/dim), and `bits_per_dim` divides by D log 2. Samples are quantised
  back to integer levels.
"""

from __future__ import annotations

import math
from typing import Any

import torch

import nflux
from nflux.data import Splits, Standardizer
from nflux.transforms.preprocess import dequantized, quantize as _quantize

__all__ = ["ImageTask", "VectorTask", "make_task", "nll_sum", "quantize", "unstandardize"]

# Seeds the dequantisation noise of the val/test images, apart from the training stream.
_EVAL_NOISE_SEED_OFFSET = 7919


class VectorTask:
    kind = "vector"

    def __init__(self, splits: Splits, device: torch.device, standardizer: Standardizer | None = None):
        self.std = standardizer if standardizer is not None else Standardizer.fit(splits.train)
        # Standardised in the data's own precision (float64 from `nflux train`), then float32.
        self.train, self.val, self.test = (self.std(t).float().to(device) for t in (splits.train, splits.val, splits.test))
        self.shape = tuple(splits.shape)
        self.nll_offset = -self.std.logabsdet()  # nats: standardised -> data units

    def record(self) -> dict[str, Any]:
        return {"standardizer": self.std.to_json()}

    def draw(self, batch: int, generator: torch.Generator, part: slice = slice(None)) -> torch.Tensor:
        """Rows `part` of a batch of model inputs drawn with replacement (the generator advances
        by the whole batch, whatever the part)."""
        idx = torch.randint(len(self.train), (batch,), generator=generator)[part]
        return self.train[idx.to(self.train.device)]

    def bits_per_dim(self, nll_nats: float) -> float | None:
        return None

    def to_data(self, x: torch.Tensor) -> torch.Tensor:
        return unstandardize(x, self.std)

    def data_for_plot(self, splits: Splits) -> torch.Tensor:
        return splits.train

    def plot_count(self, n: int) -> int:
        return n


class ImageTask:
    kind = "image"

    def __init__(self, splits: Splits, device: torch.device, seed: int):
        self.levels = int(splits.meta["levels"])
        self.shape = tuple(splits.shape)
        self.dims = math.prod(self.shape)
        self.train = splits.train.to(device)
        g = torch.Generator().manual_seed(int(seed) + _EVAL_NOISE_SEED_OFFSET)
        self.val, self.test = (self._dequantize(t, torch.rand(t.shape, generator=g)).to(device)
                               for t in (splits.val, splits.test))
        self.nll_offset = self.dims * math.log(self.levels)

    def _dequantize(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return dequantized(x, u.to(x.device, x.dtype), self.levels)

    def record(self) -> dict[str, Any]:
        return {"standardizer": None, "levels": self.levels}

    def draw(self, batch: int, generator: torch.Generator, part: slice = slice(None)) -> torch.Tensor:
        """Images `part` of a dequantised batch drawn with replacement (as `VectorTask.draw`)."""
        idx = torch.randint(len(self.train), (batch,), generator=generator)[part]
        u = torch.rand((batch, *self.shape), generator=generator)[part]
        return self._dequantize(self.train[idx.to(self.train.device)], u)

    def bits_per_dim(self, nll_nats: float) -> float:
        return nll_nats / (self.dims * math.log(2.0))

    def to_data(self, x: torch.Tensor) -> torch.Tensor:
        return quantize(x, self.levels)

    def data_for_plot(self, splits: Splits) -> torch.Tensor:
        return splits.train[:64]

    def plot_count(self, n: int) -> int:
        return min(n, 64)  # one grid


def unstandardize(x: torch.Tensor, std: Standardizer) -> torch.Tensor:
    """Standardised vectors -> data units (float64, on the CPU)."""
    return std.inverse(x.double().cpu())


def quantize(x: torch.Tensor, levels: int) -> torch.Tensor:
    """[0, 1) images -> integer levels 0..L-1 (float64, on the CPU)."""
    return _quantize(x.double().cpu(), levels)


def make_task(splits: Splits, device: torch.device, seed: int, record: dict[str, Any] | None = None):
    """The task of `splits`; with a run's config `record`, its recorded standardiser."""
    if splits.kind == "image":
        if "levels" not in splits.meta:
            name = splits.meta.get("name", "")
            if "integer_range" in splits.meta:
                low, high = splits.meta["integer_range"]
                raise ValueError(f"image data {name!r} holds integers {low}..{high}, outside 0..255 in a signed or "
                                 "wide type: save them as uint16 (levels 0..65535) or bool, or rescale to 0..255")
            raise ValueError(f"image data {name!r} has no intensity levels (float images): "
                             "save the images as integers, uint8 (0..255) or uint16 (0..65535)")
        return ImageTask(splits, device, seed)
    std = Standardizer.from_json(record["standardizer"]) if record is not None else None
    return VectorTask(splits, device, std)


def nll_sum(model: nflux.Flow, inputs: torch.Tensor, batch: int) -> float:
    """Sum over `inputs` of -log_prob (float64 accumulation), in eval mode."""
    was = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(inputs), batch):
            total -= float(model.log_prob(inputs[i:i + batch]).double().sum())
    model.train(was)
    return total
