"""What a dataset is, by name: ``register_dataset(DatasetSpec(...))``.

Each dataset's module (cifar.py, imagenet.py, ...) holds everything about it
-- its statistics, layout, loaders and defaults -- and registers its spec at
import; ``freeadv_fast.data`` imports every module of this package, so a new
dataset is one new module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..common import register
from .errors import DataError


@dataclass
class Data:
    """What a run gets from a dataset on one rank."""
    train: object  # per-rank batches of the training split
    val: object  # per-rank batches of the evaluation split, unaugmented, each image once over all ranks
    num_classes: int
    in_channels: int
    mean: tuple
    std: tuple
    image_size: int


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    title: str  # how results name it
    build: Callable  # (cfg, rank, world_size, device) -> (train, val, num_classes, image_size)
    mean: tuple  # per-channel statistics of the pixels in [0, 1]: the model's input normalization
    std: tuple
    image_size: int  # the size a run trains at unless --image-size (where the loader can resize) says otherwise
    default_arch: str
    channels: int = 3
    preset: str | None = None  # the paper setting `train DATASET` runs (config.PRESETS)
    data_help: str | None = None  # what --data must hold; None: --data is optional
    check_layout: Callable | None = None  # cfg -> None; cheap, before any worker starts; DataError names the problem
    epsilon: str = "8/255"  # the usual L-inf budget of robustness results on it
    eval_attack: tuple | None = None  # (PGD steps, step size) of the paper's evaluation, when it has one
    compare: dict = field(default_factory=dict)  # bench/compare.py's "full" and "quick" settings
    resizable: bool = False  # its loader makes any --image-size (and so can run phases)
    reads_data: bool = True  # it reads --data (False: its images come from elsewhere; a --data there is a slip)
    in_folders: bool = False  # its images are read from files during training (--loader and --workers apply)

    def check(self, cfg, layout: bool = True):
        """That --data is given where needed and (``layout``) that the data's
        layout is usable: cheap checks, run before any worker starts."""
        if self.data_help is not None and cfg.data is None:
            raise DataError(f"{self.name} needs --data DIR ({self.data_help})")
        if layout and self.check_layout is not None:
            self.check_layout(cfg)


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    return register(DATASETS, spec.name, spec, "dataset")
