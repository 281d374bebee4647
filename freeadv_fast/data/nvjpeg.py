"""The ``nvjpeg`` loader: CPU workers only read file bytes; torchvision's
``decode_jpeg`` decodes each batch on the training device (nvJPEG on a GPU),
and the crop, resize and flip run there too. It delivers what the DALI and
torch loaders do: uint8 batches in NHWC storage seen as NCHW.

torchvision serves a process with one GPU decoder behind one lock, and
nvJPEG's batched decode does its Huffman stage on the calling CPU thread, so
one process decodes at most what one core can feed it. With
``decode_processes`` > 0, that many processes (forked from a fork server
that imported torch once) each read, decode and
augment whole batches on the device, each with its own decoder (and CUDA
context); the training process receives the finished batches (CUDA tensors
through CUDA IPC, copied at once into its own memory so that none outlives
the process that made it). Batch b is drawn from the same seed either way, so
both ways give the same batches.

Bad files behave as in the other loaders: a file whose signature, end
marker or claimed size is wrong (``folder.read_checked``) is skipped and
named once, a file the decoder refuses is found by decoding the batch's
images one by one and skipped the same way, and a non-JPEG image (a PNG named
.JPEG, which PIL reads) is decoded on the CPU, as the torch loader's PIL does.
"""
from __future__ import annotations

import contextlib
import math
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from ..common import stream_seed
from ..messages import say_once
from .folder import STOP_SIGNALS, ignore_stop_signals, quiet_codecs, read_checked, to_8_bits

JPEG_MAGIC = b"\xff\xd8\xff"


def nvjpeg_available(device: torch.device) -> bool:
    """torchvision with batched GPU JPEG decoding, and a GPU to run it on."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
        return True
    except ImportError:
        return False


class FileBytes(torch.utils.data.Dataset):
    """(bytes as a uint8 tensor or None, label, path, why not) per sample: read
    in the workers, checked as the other loaders check, decoded elsewhere."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        data, why = read_checked(path)
        return (None if why else torch.frombuffer(bytearray(data), dtype=torch.uint8)), label, path, why


def collate_lists(items):
    return items


def crop_box(height: int, width: int, gen: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop box (top, left, h, w), drawn from ``gen``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(2, generator=gen).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            return top, left, h, w
    in_ratio = width / height  # fallback: the whole image, cut to the ratio range
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class NvjpegDecoder:
    """Decodes lists of encoded images on ``device`` and applies ``transform``
    (random-resized-crop, resize, center-crop) image by image there."""

    def __init__(self, device, *, transform: str, image_size: int, val_resize: int, source_size=None):
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg
        from torchvision.transforms.v2 import functional as TF
        self.device, self.transform = torch.device(device), transform
        self.image_size, self.val_resize, self.source_size = image_size, val_resize, source_size
        self._decode_jpeg, self._decode_image, self._rgb, self._tf = decode_jpeg, decode_image, ImageReadMode.RGB, TF

    def decode(self, encoded: list[torch.Tensor], paths: list[str]):
        """Images (uint8 C x H x W on the device, None where undecodable) and
        {path: why} for the undecodable ones."""
        images: list[torch.Tensor | None] = [None] * len(encoded)
        bad = {}
        jpeg = [i for i, e in enumerate(encoded) if bytes(e[:3].tolist()) == JPEG_MAGIC]
        with quiet_codecs():
            try:  # torchvision refuses an empty list: a batch of PNGs only
                decoded = self._decode_jpeg([encoded[i] for i in jpeg], mode=self._rgb, device=self.device) \
                    if jpeg else []
            except RuntimeError:  # one bad image fails the batch: find it
                decoded = []
                for i in jpeg:
                    try:
                        decoded.append(self._decode_jpeg(encoded[i], mode=self._rgb, device=self.device))
                    except RuntimeError as exc:
                        decoded.append(None)
                        bad[paths[i]] = f"cannot decode ({str(exc).strip().splitlines()[0]})"
            for i, image in zip(jpeg, decoded):
                images[i] = image
            for i in set(range(len(encoded))) - set(jpeg):  # not JPEG: the CPU decoder, as PIL would
                try:
                    images[i] = to_8_bits(self._decode_image(encoded[i], mode=self._rgb)).to(self.device,
                                                                                            non_blocking=True)
                except RuntimeError as exc:
                    bad[paths[i]] = f"cannot decode ({str(exc).strip().splitlines()[0]})"
        return images, bad

    def augment(self, image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        TF, s = self._tf, self.image_size
        if self.transform == "random-resized-crop":
            if self.source_size:
                image = TF.resize(image, self.source_size, antialias=True)
            top, left, h, w = crop_box(image.shape[1], image.shape[2], gen)
            out = TF.resized_crop(image, top, left, h, w, [s, s], antialias=True)
            return TF.horizontal_flip(out) if bool(torch.rand(1, generator=gen) < 0.5) else out
        if self.transform == "resize":
            return TF.resize(image, [s, s], antialias=True)
        return TF.center_crop(TF.resize(image, self.val_resize, antialias=True), [s, s])

    def batch(self, items, gen: torch.Generator):
        """(x uint8 B x 3 x S x S channels_last, y) of the decodable items, and {path: why} of the others."""
        bad = {path: why for data, _, path, why in items if data is None}
        good = [it for it in items if it[0] is not None]
        images, undecodable = self.decode([it[0] for it in good], [it[2] for it in good])
        bad.update(undecodable)
        kept = [(self.augment(im, gen), it[1]) for im, it in zip(images, good) if im is not None]
        if not kept:
            return None, None, bad
        x = torch.stack([im for im, _ in kept]).contiguous(memory_format=torch.channels_last)
        y = torch.tensor([label for _, label in kept], dtype=torch.long).to(self.device, non_blocking=True)
        return x, y, bad


def batch_seed(loader, batch: int) -> int:
    """The seed of the augmentation of batch ``batch`` of the loader's pass."""
    return stream_seed(loader.seed, loader.epoch, loader.rank, batch=batch)


def decoder_args(loader, device) -> dict:
    """What an NvjpegDecoder for ``loader`` is made of."""
    return dict(device=device, transform=loader.transform, image_size=loader.image_size,
                val_resize=loader.val_resize, source_size=loader.source_size)


class DecodedBatches(torch.utils.data.Dataset):
    """Item (seed, sample indices): that batch, read, decoded and augmented
    whole in the worker process that takes it, as ``NvjpegDecoder.batch``
    gives it."""

    def __init__(self, samples, decoder_args: dict):
        self.samples, self.decoder_args = samples, decoder_args
        self._decoder = self._pool = None

    def __getitem__(self, job):
        if self._decoder is None:  # made in the worker: its own decoder, CUDA context and reading threads
            self._decoder = NvjpegDecoder(**self.decoder_args)
            self._pool = ThreadPoolExecutor(8)
        seed, indices = job
        items = list(self._pool.map(FileBytes([self.samples[i] for i in indices]).__getitem__, range(len(indices))))
        return self._decoder.batch(items, torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def children_ignore_stop_signals():
    """Processes started inside begin with Ctrl-C and SIGTERM ignored (the
    fork server, started with the first of them, inherits that through exec,
    and Python then installs no handler of its own; its children inherit it
    through fork), so a signal sent to the process group while they start
    cannot kill them; ``ignore_stop_signals`` keeps it so once
    the DataLoader has set its own handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = [signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS]
    try:
        yield
    finally:
        for sig, handler in zip(STOP_SIGNALS, previous):
            signal.signal(sig, handler)


def _start_worker(device: torch.device, worker_id: int):
    ignore_stop_signals()
    if device.type == "cuda":
        torch.cuda.set_device(device)


def decoding_context():
    """Where decoding processes come from: a fork server that imports torch,
    torchvision and this module once, and forks each process from that state.
    Spawned processes would each import them again (and the training script
    as ``__mp_main__``): on a 16-core H100 machine, 4 or 8 of them were still
    importing after 50 s. The server never touches CUDA, so its children may."""
    import multiprocessing
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torchvision.io", __name__])  # not __main__: the training script
    return context


class DecodingProcesses:
    """``loader.decode_processes`` processes from the fork server (a child
    forked from this process could not use CUDA once it has) that decode whole batches. They stay for
    every pass of the loader, as the torch loader's workers do: each one's
    start (importing torch, a CUDA context) costs seconds."""

    def __init__(self, loader):
        import functools

        from torch.utils.data import DataLoader

        from .folder import ListSampler
        device = loader.device
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.jobs = ListSampler()
        self.reader = DataLoader(DecodedBatches(loader.samples, decoder_args(loader, device)), batch_size=None,
                                 sampler=self.jobs, num_workers=loader.decode_processes, collate_fn=collate_lists,
                                 multiprocessing_context=decoding_context(), prefetch_factor=2, persistent_workers=True,
                                 worker_init_fn=functools.partial(_start_worker, device))

    def batches(self, loader, indices, start):
        """(x, y, bad) of each batch of ``indices``, the first being batch ``start`` of the pass."""
        size = loader.batch_size
        self.jobs.indices = [(batch_seed(loader, start + b), indices[i:i + size])
                             for b, i in enumerate(range(0, len(indices), size))]
        with children_ignore_stop_signals():  # the first pass's iterator starts the processes
            batches = iter(self.reader)
        for x, y, bad in batches:
            if x is not None and x.is_cuda:  # our own copy: the worker's memory goes back to it now
                x, y = x.clone(memory_format=torch.channels_last), y.clone()
            yield x, y, bad


def nvjpeg_batches(loader, indices, start):
    """The batches of ``indices`` for an ImageFolderLoader with loader="nvjpeg"."""
    if loader.decode_processes > 0:
        if loader._decoding is None:
            loader._decoding = DecodingProcesses(loader)
        batches = loader._decoding.batches(loader, indices, start)
    else:
        batches = decoded_here(loader, indices, start)
    for x, y, bad in batches:
        if bad:
            loader.bad_files.update(bad)
            path, why = next(iter(bad.items()))
            say_once(f"{loader.split_dir}: skipping {len(bad)} file(s) that cannot be decoded, e.g. {path}: {why}")
        if x is not None:
            yield x, y


def decoded_here(loader, indices, start):
    """(x, y, bad) of each batch: bytes read by DataLoader workers, decoded in this process."""
    from torch.utils.data import DataLoader
    decoder = NvjpegDecoder(**decoder_args(loader, loader.device))
    reader = DataLoader(FileBytes([loader.samples[i] for i in indices]), batch_size=loader.batch_size,
                        num_workers=loader.workers, collate_fn=collate_lists,
                        prefetch_factor=4 if loader.workers > 0 else None, worker_init_fn=ignore_stop_signals)
    for b, items in enumerate(reader):
        yield decoder.batch(items, torch.Generator().manual_seed(batch_seed(loader, start + b)))
