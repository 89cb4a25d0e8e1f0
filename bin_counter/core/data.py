"""Images -> tensors: loading with clear failures, the study's transforms, Dataset/DataLoader over a manifest."""
from __future__ import annotations

import hashlib
import logging

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import transforms

from bin_counter.core.abid import read_image as open_image  # noqa: F401  (the loaders' and the pyfunc's entry point)
from bin_counter.core.models import backbone_spec

log = logging.getLogger(__name__)


def eval_transform(backbone: str, image_size: int = 224) -> transforms.Compose:
    spec = backbone_spec(backbone)
    return transforms.Compose([
        transforms.Resize((image_size, image_size)),  # the study squashes the whole bin to a square
        transforms.ToTensor(),
        transforms.Normalize(spec.mean, spec.std),
    ])


def train_transform(backbone: str, image_size: int = 224, rotation: float = 30.0, hflip: bool = False):
    spec = backbone_spec(backbone)
    steps = [transforms.Resize((image_size, image_size)), transforms.RandomRotation(rotation)]
    if hflip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)]
    return transforms.Compose(steps)


class ManifestImages(Dataset):
    """(image, label index) per manifest row; an unreadable image yields None and is reported, not crashed on."""

    def __init__(self, frame: pd.DataFrame, classes: list[int], transform, view_seed: int | None = None):
        self.paths = list(frame["abs_path"])
        self.ids = list(frame["image_id"])
        index = {count: i for i, count in enumerate(classes)}
        self.labels = [index[int(c)] for c in frame["count"]]
        self.transform = transform
        self.view_seed = view_seed  # set: each image's random augmentation is fixed by its id and this seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            image = open_image(self.paths[i])
        except ValueError as exc:
            log.warning("skipping image %s: %s", self.ids[i], exc)
            return None
        if self.view_seed is None:
            return self.transform(image), self.labels[i], i
        # torchvision's random transforms draw from the global generator: seed it for this image and view only,
        # and give the caller's random stream back untouched
        digest = hashlib.sha256(f"{self.ids[i]}:{self.view_seed}".encode()).digest()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int.from_bytes(digest[:8], "little"))
            return self.transform(image), self.labels[i], i


def dihedral_views(batch: torch.Tensor) -> list[torch.Tensor]:
    """The image and its flips/transpose: a bin photographed from above has no up or down (test-time augmentation)."""
    return [batch, batch.flip(-1), batch.flip(-2), batch.transpose(-1, -2)]


def collate_skipping_bad(batch):
    batch = [item for item in batch if item is not None]
    if not batch:
        return None
    images, labels, indices = zip(*batch)
    return torch.stack(images), torch.tensor(labels), torch.tensor(indices)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, seed: int = 0,
                drop_last: bool = False, collate_fn=collate_skipping_bad) -> DataLoader:
    """Seeded shuffling; under torchrun a training loader gives each rank its own share of the data.
    Pinned memory only where it helps: a CUDA device."""
    from bin_counter.core import distributed

    ctx = distributed.current()
    sampler = None
    if shuffle and ctx.enabled:
        sampler = DistributedSampler(dataset, num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=seed)
    per_rank = len(sampler) if sampler is not None else len(dataset)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=num_workers, collate_fn=collate_fn, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(seed), drop_last=drop_last and per_rank > batch_size)
