"""Image-folder datasets (ImageNet's ``ROOT/train/<wnid>/*.JPEG``): scanning
with bad-file checks, and the two loaders that read them.

* DALI (``nvidia-dali``): the file reader feeds ``mixed`` (nvJPEG) decoding
  fused with the random-resized crop on the GPU; with ``device_id=None`` the
  same pipeline runs on DALI's CPU operators.
* nvjpeg (data/nvjpeg.py): DataLoader workers read the files' bytes, and
  torchvision's ``decode_jpeg`` decodes each batch on the training device,
  where the crop, resize and flip run too (in the training process, or with
  ``decode_processes`` in that many processes of its own); the fallback when DALI
  is not installed and a GPU is present (on CPU it decodes with libjpeg).
* torch: torchvision transforms in DataLoader workers, the fallback on CPU
  when DALI is not installed.

All give uint8 batches in NHWC storage seen as NCHW (channels_last) on the
training device; normalization is left to the fused kernel. Training
augmentation is ImageNet's random-resized crop and flip, or, for small
native-resolution images (Tiny-ImageNet), ``pad-crop``: a zero-padded random
crop and flip applied to the decoded batch on the device (``RandomCropFlip``,
the same code as CIFAR's), whichever loader decoded it. Each pass is a
permutation of the files fixed by (seed, pass); rank r of W reads its own
contiguous block of N // W files of it, so every rank has the same number of
batches, ranks are disjoint, and a resumed run sees the same batches.
"""
from __future__ import annotations

import contextlib
import io
import os
import signal
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..common import stream_seed
from ..messages import say_once
from .errors import DataError
from .tensors import RandomCropFlip

# The files looked at. Only JPEG, PNG and WebP are read (torchvision's decode_image, which the nvjpeg loader
# and CIFAR folders use, reads no others); the rest are named as unsupported by ``_signature_check``, so that
# the checker and every loader refuse the same files.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".ppm", ".pgm", ".bmp", ".tif", ".tiff")
UNSUPPORTED_SIGNATURES = {b"BM": "BMP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"P5": "PGM", b"P6": "PPM"}
LOADERS = ("auto", "dali", "nvjpeg", "torch")
AUGMENTATIONS = ("random-resized-crop", "pad-crop")


# No decoder is asked for more pixels than this (PIL's own refusal threshold):
# a header claiming 65,000 x 65,000 would otherwise take 12 GB, or kill DALI.
MAX_IMAGE_PIXELS = 178_956_970
_HEAD = 16  # bytes read from the start for the signature
_MAX_JPEG_STEPS = 1024  # a bound on the reads whatever the file; camera JPEGs have about ten segments


def quick_check(path: str) -> str | None:
    """Why ``path`` cannot be a whole image (None if it looks fine): checks the
    format's signature, for JPEG and PNG the end marker, which a truncated file
    lacks, and the pixel count the header claims. Reads a few KB only."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(_HEAD)
            dims = header_size(f)
            f.seek(max(0, size - 1024))
            tail = f.read()
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    return _signature_check(head, tail, size, dims)


def header_size(f) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR or a JPEG's frame header, read from
    the binary file ``f``; None when not found. A JPEG's segments are stepped
    over by their lengths: an Exif block of any size may come before the
    frame header, and a fixed-size prefix would let such a file past the
    pixel limit."""
    f.seek(0)
    head = f.read(24)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if head[:2] != b"\xff\xd8":
        return None
    pos = 2
    for _ in range(_MAX_JPEG_STEPS):
        f.seek(pos)
        segment = f.read(9)
        if len(segment) < 4 or segment[0] != 0xFF:
            return None
        marker = segment[1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
            return (int.from_bytes(segment[7:9], "big"), int.from_bytes(segment[5:7], "big")) \
                if len(segment) == 9 else None
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header comes
            return None
        if marker == 0xFF:  # a fill byte before the marker
            pos += 1
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            pos += 2
        else:
            pos += 2 + int.from_bytes(segment[2:4], "big")
    return None


def png_problem(data: bytes) -> str | None:
    """Why a whole PNG file in memory is damaged (None if sound): chunk
    lengths and CRCs, IHDR first and IEND last, the image data inflating to
    the size its header implies. torchvision 0.29's PNG decoder crashes the
    process (SIGSEGV) on some damaged files (an IDAT CRC error, found by the
    fuzzing tests), so nothing unchecked is handed to it."""
    pos, chunks, idat = 8, [], []
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if len(body) != length or pos + 12 + length > len(data):
            return "truncated PNG chunk"
        if zlib.crc32(kind + body) & 0xFFFFFFFF != int.from_bytes(data[pos + 8 + length:pos + 12 + length], "big"):
            return f"damaged PNG ({kind.decode('latin-1')!r} chunk fails its CRC)"
        chunks.append(kind)
        if kind == b"IDAT":
            idat.append(body)
        pos += 12 + length
        if kind == b"IEND":
            break
    if not chunks or chunks[0] != b"IHDR" or chunks[-1] != b"IEND" or not idat:
        return "damaged PNG (chunks missing or out of order)"
    ihdr = data[16:29]
    width, height, depth, color, interlace = (int.from_bytes(ihdr[0:4], "big"), int.from_bytes(ihdr[4:8], "big"),
                                              ihdr[8], ihdr[9], ihdr[12])
    try:
        pixels = zlib.decompress(b"".join(idat))
    except zlib.error as exc:
        return f"damaged PNG (image data does not inflate: {exc})"
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(color)
    if channels is None or depth not in (1, 2, 4, 8, 16):
        return f"unsupported PNG (colour type {color}, bit depth {depth})"
    if interlace == 0 and len(pixels) != height * (1 + (width * channels * depth + 7) // 8):
        return f"damaged PNG ({len(pixels)} bytes of image data for {width}x{height})"
    return None


def _signature_check(head: bytes, tail: bytes, size: int, dims: tuple[int, int] | None) -> str | None:
    if size == 0:
        return "empty file"
    if dims and dims[0] * dims[1] > MAX_IMAGE_PIXELS:
        return (f"its header claims {dims[0]}x{dims[1]} pixels, more than the {MAX_IMAGE_PIXELS:,} any loader here "
                "decodes")
    if head[:3] == b"\xff\xd8\xff":
        return None if b"\xff\xd9" in tail else "truncated JPEG (no end-of-image marker)"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return None if b"IEND" in tail else "truncated PNG (no IEND chunk)"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return None
    kind = UNSUPPORTED_SIGNATURES.get(head[:2]) or UNSUPPORTED_SIGNATURES.get(head[:4])
    if kind:
        return f"unsupported format ({kind}; convert it to PNG or JPEG)"
    return "not an image (unknown file signature)"


def read_checked(path) -> tuple[bytes | None, str | None]:
    """(the file's bytes, None), or (None, why it cannot be a whole image):
    unreadable, a bad signature, end marker or claimed size, a damaged PNG.
    What the loaders that decode bytes themselves check before decoding."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return None, f"unreadable ({exc.strerror or exc})"
    why = _signature_check(data[:_HEAD], data[-1024:], len(data), header_size(io.BytesIO(data)))
    if why is None and data[:8] == b"\x89PNG\r\n\x1a\n":
        why = png_problem(data)
    return (None, why) if why else (data, None)


def to_8_bits(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels as they are; 16-bit ones (a 16-bit PNG) scaled to 8 bits,
    as DALI's decoder scales them: never cut to their low byte, nor clipped
    at 255 as PIL's convert does."""
    if pixels.dtype == torch.uint8:
        return pixels
    return (pixels.to(torch.float32) * (255 / 65535)).round().to(torch.uint8)


def pil_8_bits(im):
    """A PIL image whose ``convert("RGB")`` gives its pixels: 16-bit
    greyscale (mode I;16) scaled to 8 bits first, which convert would clip."""
    if not im.mode.startswith("I"):
        return im
    import numpy as np
    from PIL import Image
    return Image.fromarray(to_8_bits(torch.from_numpy(np.asarray(im, dtype=np.int32))).numpy())


def full_check(path: str) -> str | None:
    """Why ``path`` cannot be decoded (None if it can): what the loaders check
    of its bytes (read_checked: a damaged PNG too), then a whole decode by
    PIL (the torch loader's) and by torchvision's decoder (a CIFAR image
    folder's and the nvjpeg loader's; it refuses an animated WebP, say)."""
    data, why = read_checked(path)
    if why:
        return why
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as exc:  # any decoder complaint makes the file unusable
        return f"cannot decode ({type(exc).__name__}: {exc})"
    try:
        with quiet_codecs():
            _bytes_decoder(3)(data)
    except (RuntimeError, OSError, ValueError) as exc:
        return f"torchvision cannot decode it ({str(exc).strip().splitlines()[0]}): the nvjpeg loader and CIFAR " \
               "image folders would not read it"
    return None


def printable(path) -> str:
    """``path`` safe to print on any stream: bytes of a file name that are not
    valid UTF-8 (a latin-1 'caf\\xe9.JPEG') shown as \\xNN escapes."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def few(names, shown: int = 3) -> str:
    """'a, b, c and 4 more': the first ``shown`` names of a list, then a count."""
    names = [printable(n) for n in names]
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def check_same_classes(split_dir, found, classes, train_dir=None):
    """DataError unless the class folders ``found`` in ``split_dir`` are the
    training split's ``classes``: naming those that differ, a few, then a count."""
    if list(found) == list(classes):
        return
    train = f"{train_dir}'s" if train_dir else "the training split's"
    missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
    what = [f"it lacks {few(missing)}"] if missing else []
    what += [f"it has {few(extra)}, which {train_dir or 'the training split'} lacks"] if extra else []
    raise DataError(f"{split_dir}: its class folders differ from {train}: {'; '.join(what)}")


def not_a_directory(path) -> DataError:
    """The error for a data folder that is not one: a file given for it is said to be one."""
    return DataError(f"{path}: {'a file, not a directory' if Path(path).exists() else 'no such directory'}")


def cannot_list(exc: OSError) -> DataError:
    return DataError(f"{printable(exc.filename)}: cannot be listed ({exc.strerror or exc})")


def image_files(folder: Path):
    """The paths with an image extension under ``folder``, its sub-folders too
    (symbolic links to folders inside it are not followed, as rglob); a folder
    that cannot be listed is named (rglob passed over it in silence)."""
    def fail(exc):
        raise cannot_list(exc)
    for root, _, files in os.walk(folder, onerror=fail):
        yield from (os.path.join(root, f) for f in files if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)


def check_no_class_lost(verdicts, folder_of):
    """DataError when every image of a class is bad: leaving them out would
    train (or evaluate) without the class, after one note. ``verdicts``:
    [((path, label), why or None)]; ``folder_of(label)`` names the class."""
    good, first_bad, count = set(), {}, {}
    for (path, label), why in verdicts:
        if why:
            first_bad.setdefault(label, (path, why))
            count[label] = count.get(label, 0) + 1
        else:
            good.add(label)
    lost = [label for label in first_bad if label not in good]
    if lost:
        path, why = first_bad[lost[0]]
        more = f" (and {len(lost) - 1} more such class(es))" if len(lost) > 1 else ""
        raise DataError(f"{folder_of(lost[0])}: every image of this class is bad ({count[lost[0]]} file(s), e.g. "
                        f"{Path(path).name}: {why}){more}; the run would leave the class out: fix or remove them "
                        "(python -m freeadv_fast.data check lists them all)")


def scan_image_folder(split_dir, *, check: bool = True, threads: int = 16):
    """(class names, [(path, label)], [(path, why)]) for ``split_dir/<class>/<image>``.

    Labels follow sorted class names, as torchvision's ImageFolder. Files with
    an image extension that fail ``quick_check`` are returned as bad (and left
    out of the samples); anything wrong with the layout raises DataError.
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise not_a_directory(split_dir)
    try:
        entries = list(os.scandir(split_dir))
    except OSError as exc:
        raise cannot_list(exc) from None
    classes = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if not classes:
        loose = [e.name for e in entries if e.name.lower().endswith(IMAGE_EXTENSIONS)]
        why = f"images directly inside it ({loose[0]}, ...)" if loose else "nothing usable inside"
        raise DataError(f"{split_dir}: no class folders (expected {split_dir}/<class>/<image>), found {why}")
    samples = []
    for label, name in enumerate(classes):
        files = sorted(path for path in image_files(split_dir / name) if os.path.isfile(path))
        if not files:
            raise DataError(f"{split_dir / name}: class folder with no images")
        samples += [(f, label) for f in files]
    bad = []
    if check:
        with ThreadPoolExecutor(threads) as pool:
            verdicts = list(pool.map(quick_check, (p for p, _ in samples), chunksize=256))
        bad = [(p, why) for (p, _), why in zip(samples, verdicts) if why]
        if bad:
            check_no_class_lost(list(zip(samples, verdicts)), lambda label: split_dir / classes[label])
            samples = [s for s, why in zip(samples, verdicts) if not why]
            say_once(f"{split_dir}: left out {len(bad)} bad file(s), e.g. {bad[0][0]}: {bad[0][1]} "
                     f"(python -m freeadv_fast.data check lists them all)")
    return classes, samples, bad


def decode_image_folder(split_dir, *, size: int, channels: int = 3, classes=None, subset=None):
    """A whole small-image folder decoded into memory: (x uint8 N x C x size x
    size, y int64, class names). For datasets that fit in (GPU) memory, such
    as CIFAR stored as image files: decoded once, then batched on the device.
    ``classes``: the class names the labels must follow (the train split's);
    ``subset``: a function from the number of files to the indices of those to
    decode (the others are not read)."""
    found, samples, _ = scan_image_folder(split_dir, check=False)  # each file is checked as it is decoded
    if classes is not None:
        check_same_classes(split_dir, found, classes)
    if subset is not None:
        samples = [samples[i] for i in subset(len(samples)).tolist()]
    to_tensor = _bytes_decoder(channels)
    x = torch.empty(len(samples), channels, size, size, dtype=torch.uint8)

    def decode(i):
        path = samples[i][0]
        data, why = read_checked(path)
        if why:
            return f"{path}: {why}"
        try:
            image = to_tensor(data)
        except (RuntimeError, OSError, ValueError) as exc:
            return f"{path}: cannot decode ({str(exc).strip().splitlines()[0]})"
        if image.shape[1:] != (size, size):
            return f"{path}: {image.shape[2]}x{image.shape[1]} pixels, expected {size}x{size}"
        if image.dtype != torch.uint8:
            say_once(f"{split_dir}: {image.dtype} images (16-bit PNG) scaled to 8 bits, e.g. {path}")
        x[i] = to_8_bits(image)
        return None

    # one thread: torchvision's decoder holds the GIL, so threads only slow these tiny images down
    with quiet_codecs():
        problems = [p for p in map(decode, range(len(samples))) if p]
    if problems:
        raise DataError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    return x, torch.tensor([label for _, label in samples], dtype=torch.int64), found


@contextlib.contextmanager
def quiet_codecs():
    """torchvision 0.29 deprecates its codecs (for torchcodec) on every call: not said once per image."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _bytes_decoder(channels: int):
    """bytes -> uint8 C x H x W: torchvision's decoder (5x faster than PIL on
    small images), or PIL where torchvision no longer has one."""
    try:
        from torchvision.io import ImageReadMode, decode_image
    except ImportError:
        decode_image = None
    if decode_image is not None:
        mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
        return lambda data: decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)

    def with_pil(data):
        import numpy as np
        from PIL import Image
        with Image.open(io.BytesIO(data)) as im:
            a = np.asarray(pil_8_bits(im).convert("RGB" if channels == 3 else "L"))
        return torch.from_numpy(a.copy()).reshape(a.shape[0], a.shape[1], -1).permute(2, 0, 1)
    return with_pil


def find_split(root, split: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise not_a_directory(root)
    if not (root / split).is_dir():
        raise DataError(f"{root}: no {split}/ folder (expected {root}/{split}/<class>/<image>)")
    return root / split


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except ImportError:
        return False


def resolve_loader(loader: str, device=torch.device("cpu")) -> str:
    """``auto``: DALI where installed, else nvjpeg where a GPU is (torchvision
    decoding on it), else torch's DataLoader workers; said once."""
    from .nvjpeg import nvjpeg_available
    if loader not in LOADERS:
        raise DataError(f"unknown loader {loader!r}: choose one of {', '.join(LOADERS)}")
    device = torch.device(device)
    if loader == "auto":
        if dali_available():
            return "dali"
        if nvjpeg_available(device):
            say_once("DALI is not installed (pip install 'freeadv_fast[dali]'); decoding JPEGs on the GPU with "
                     "torchvision (nvjpeg loader) instead")
            return "nvjpeg"
        say_once("DALI is not installed (pip install 'freeadv_fast[dali]'); loading images with torchvision "
                 "in DataLoader workers instead")
        return "torch"
    if loader == "dali" and not dali_available():
        raise DataError("--loader dali: nvidia-dali is not installed (pip install 'freeadv_fast[dali]')")
    if loader == "nvjpeg":
        try:
            from torchvision.io import decode_jpeg  # noqa: F401
        except ImportError:
            raise DataError("--loader nvjpeg: needs torchvision with torchvision.io.decode_jpeg") from None
    return loader


class ImageFolderLoader:
    """Batches of an image-folder split for one rank: ``batch_size`` is per rank."""

    def __init__(self, split_dir, *, train: bool, batch_size: int, device="cpu", image_size: int = 224,
                 val_resize: int = 256, rank: int = 0, world_size: int = 1, seed: int = 0, loader: str = "auto",
                 workers: int | None = None, samples=None, classes=None, augment: str = "random-resized-crop",
                 padding: int = 4, source_size: int | None = None, decode_processes: int = 0):
        if batch_size < 1:
            raise DataError(f"batch size must be positive, got {batch_size}")
        if augment not in AUGMENTATIONS:
            raise DataError(f"unknown augmentation {augment!r}: choose one of {', '.join(AUGMENTATIONS)}")
        # what the decoder does; pad-crop's crop and flip come after, on the device
        self.transform = "center-crop" if not train else "resize" if augment == "pad-crop" else augment
        self.pad_crop = RandomCropFlip(padding) if train and augment == "pad-crop" else None
        self.split_dir, self.train, self.batch_size = Path(split_dir), train, batch_size
        self.device, self.image_size, self.val_resize = torch.device(device), image_size, val_resize
        # random-resized crops from the image resized (shorter side) to this first, as progressive resizing's
        # small phases take them; None: from the full image
        self.source_size = source_size if self.transform == "random-resized-crop" else None
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.loader = resolve_loader(loader, device)
        self.workers = workers if workers is not None else min(8, os.cpu_count() or 1)
        if decode_processes < 0:
            raise DataError(f"decode processes must be 0 or more, got {decode_processes}")
        if decode_processes and self.loader != "nvjpeg":
            say_once(f"--decode-processes applies to the nvjpeg loader only; the {self.loader} loader ignores it")
        self.decode_processes = decode_processes
        if samples is None:
            classes, samples, _ = scan_image_folder(split_dir)
        self.bad_files: dict[str, str] = {}  # found while decoding (or, for DALI, by name): path -> why
        if self.loader == "dali":
            samples = self._dali_openable(samples)
        self.classes, self.samples = classes, samples
        if not samples:
            raise DataError(f"{split_dir}: no readable image: every image file in it is bad (see above, or run "
                            "python -m freeadv_fast.data check)")
        if len(samples) < world_size:
            raise DataError(f"{split_dir}: {len(samples)} image(s) cannot be shared by {world_size} processes")
        self.epoch = 0
        self._torch_loader = self._decoding = None  # worker processes kept from pass to pass

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def rank_indices(self) -> list[int]:
        """This rank's samples for the current pass, in order."""
        n = len(self.samples)
        if self.train:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(stream_seed(self.seed, self.epoch)))
            per_rank = n // self.world_size
            return order[self.rank * per_rank:(self.rank + 1) * per_rank].tolist()
        return torch.tensor_split(torch.arange(n), self.world_size)[self.rank].tolist()  # every image, once

    def __len__(self):
        n = len(self.samples) // self.world_size if self.train else len(self.rank_indices())
        return -(-n // self.batch_size)

    def skip(self, start: int):
        indices = self.rank_indices()[start * self.batch_size:]
        if not indices:
            return iter(())
        if self.loader == "dali":
            batches = self._dali_batches(indices, start)
        elif self.loader == "nvjpeg":
            from .nvjpeg import nvjpeg_batches
            batches = nvjpeg_batches(self, indices, start)
        else:
            batches = self._torch_batches(indices)
        return self._crop_and_flip(batches, start) if self.pad_crop else batches

    def _crop_and_flip(self, batches, start):
        gen = self.pad_crop.generator(self.device, seed=self.seed, epoch=self.epoch, rank=self.rank, skipped=start,
                                      batch_size=self.batch_size)
        for x, y in batches:
            yield self.pad_crop(x, gen).contiguous(memory_format=torch.channels_last), y

    def __iter__(self):
        return self.skip(0)

    def close(self):
        """Lets the worker processes go (a phase that is over)."""
        self._torch_loader = self._decoding = None

    # -- DALI ---------------------------------------------------------------
    def _dali_openable(self, samples):
        """``samples`` less the files DALI cannot open: its file reader takes
        names as UTF-8 strings and refuses a name that is not valid UTF-8 (a
        latin-1 'caf\\xe9.JPEG'); those are left out and named once."""
        def utf8(path):
            try:
                str(path).encode("utf-8")
                return True
            except UnicodeEncodeError:
                return False
        unnamable = [p for p, _ in samples if not utf8(p)]
        if not unnamable:
            return samples
        why = "its name is not valid UTF-8, which DALI cannot open (rename it, or use --loader torch)"
        self.bad_files.update((p, why) for p in unnamable)
        kept = [s for s in samples if s[0] not in self.bad_files]
        lost = sorted({label for _, label in samples} - {label for _, label in kept})
        if lost:  # a class-folder name (not one file's) is the bad one: training on the rest would drop the class
            first = next(p for p, label in samples if label == lost[0])
            raise DataError(f"{self.split_dir}: DALI cannot open any image of {len(lost)} class(es): their paths "
                            f"are not valid UTF-8, e.g. {printable(first)} (rename the folders, or use --loader torch)")
        say_once(f"{self.split_dir}: left out {len(unnamable)} file(s) whose names are not valid UTF-8, which "
                 f"DALI cannot open, e.g. {printable(unnamable[0])} (rename them, or use --loader torch)")
        return kept

    def _dali_batches(self, indices, start):
        """DALI stops at a file it cannot decode. Then the files of the batches
        in flight are decoded with PIL, the bad ones replaced by good files of
        the same window (so every rank keeps its batch count) and remembered,
        and the pass goes on from where it stopped."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
        on_gpu = self.device.type == "cuda"
        files = [self.samples[i][0] for i in indices]
        labels = [self.samples[i][1] for i in indices]
        self._substitute(files, labels, range(len(files)), self.bad_files)
        pos = 0
        while pos < len(files):
            pipe = dali_pipeline(files[pos:], labels[pos:], transform=self.transform, batch_size=self.batch_size,
                                 image_size=self.image_size, val_resize=self.val_resize, source_size=self.source_size,
                                 device_id=self.device.index if on_gpu else None,
                                 num_threads=max(1, self.workers),  # 0 workers: DALI still needs a thread
                                 seed=stream_seed(self.seed, self.epoch, self.rank, batch=start + pos))
            try:
                # inside the try: the iterator decodes the first batches as it is made
                it = DALIGenericIterator([pipe], ["x", "y"], reader_name="Reader",
                                         last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False)
                for batch in it:
                    x, y = batch[0]["x"], batch[0]["y"]
                    pos += len(y)
                    yield x.permute(0, 3, 1, 2), y.reshape(-1).long().to(self.device, non_blocking=True)
                return
            except RuntimeError as exc:
                window = range(pos, min(len(files), pos + 3 * self.batch_size))  # the batches in flight
                bad = {files[i]: why for i in window if (why := full_check(files[i]))}
                if not bad:
                    raise DataError(f"DALI failed on one of {files[window[0]]} .. {files[window[-1]]}, which PIL "
                                    f"decodes: {str(exc).strip().splitlines()[-1]}") from exc
                self.bad_files.update(bad)
                self._substitute(files, labels, window, bad)
                path, why = next(iter(bad.items()))
                say_once(f"skipping {len(bad)} file(s) DALI could not decode, e.g. {path}: {why}")

    @staticmethod
    def _substitute(files, labels, window, bad):
        """Replaces the bad files in ``window`` by good ones from it, in place."""
        if not bad:
            return
        good = [i for i in window if files[i] not in bad]
        if not good:
            raise DataError(f"no decodable image among {files[window[0]]} .. {files[window[-1]]}")
        for k, i in enumerate(i for i in window if files[i] in bad):
            files[i], labels[i] = files[good[k % len(good)]], labels[good[k % len(good)]]

    # -- torchvision ----------------------------------------------------------
    def _torch_batches(self, indices):
        from torch.utils.data import DataLoader
        if self._torch_loader is None:
            self._sampler = ListSampler()
            self._torch_loader = DataLoader(
                _FolderDataset(self.samples, self.transform, self.image_size, self.val_resize, self.source_size),
                batch_size=self.batch_size,
                sampler=self._sampler, num_workers=self.workers, collate_fn=_collate_skipping_bad,
                pin_memory=self.device.type == "cuda", persistent_workers=self.workers > 0,
                prefetch_factor=4 if self.workers > 0 else None, worker_init_fn=ignore_stop_signals)
        self._sampler.indices = indices
        skipped = 0
        for x, y, bad in self._torch_loader:
            skipped += bad
            if len(y) == 0:
                continue
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)
        if skipped:
            say_once(f"{self.split_dir}: skipped {skipped} image(s) that failed to decode"
                     + (f" in pass {self.epoch + 1}" if self.train else ""))


def dali_pipeline(files, labels, *, transform, batch_size, image_size, val_resize, device_id, num_threads, seed,
                  source_size=None):
    """random-resized-crop: decode fused with a random-resized crop (scale
    0.08-1, ratio 3/4-4/3), resize to image_size, random flip (with
    ``source_size``: decode, resize the shorter side to it, then the crop). resize: decode,
    resize to image_size x image_size. center-crop: resize the shorter side to
    val_resize, center crop image_size. uint8 HWC out, on the GPU when
    ``device_id`` is given (``mixed`` decoding), else on the CPU."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=2, exec_dynamic=True)
    def pipe():
        encoded, label = fn.readers.file(files=files, labels=labels, random_shuffle=False, name="Reader")
        decoder = "mixed" if device_id is not None else "cpu"
        if transform == "random-resized-crop" and source_size:
            images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
            images = fn.resize(images, resize_shorter=source_size, antialias=True)
            images = fn.random_resized_crop(images, size=(image_size, image_size), random_area=[0.08, 1.0],
                                            random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10, antialias=True)
            images = fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5))
        elif transform == "random-resized-crop":
            images = fn.decoders.image_random_crop(encoded, device=decoder, output_type=types.RGB,
                                                   random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3],
                                                   num_attempts=10)
            images = fn.resize(images, resize_x=image_size, resize_y=image_size, antialias=True)
            images = fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5))
        elif transform == "resize":
            images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
            images = fn.resize(images, resize_x=image_size, resize_y=image_size, antialias=True)
        else:
            images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
            images = fn.resize(images, resize_shorter=val_resize, antialias=True)
            images = fn.crop(images, crop=(image_size, image_size))
        if device_id is not None:
            label = label.gpu()
        return images, label

    p = pipe()
    p.build()
    return p


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def ignore_stop_signals(worker_id: int | None = None):
    """A DataLoader worker's init: Ctrl-C and SIGTERM sent to the whole process
    group (a terminal, SLURM's scancel) are the training process's to answer
    (it finishes its batch, writes a checkpoint and stops the workers);
    killed first, a worker would fail the run with a traceback instead."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class ListSampler(torch.utils.data.Sampler):
    """Yields whatever list it holds now: a DataLoader with persistent workers
    gets each pass's order (or jobs) from it without restarting them."""

    def __init__(self):
        self.indices: list = []

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class _FolderDataset(torch.utils.data.Dataset):
    def __init__(self, samples, transform, image_size, val_resize, source_size=None):
        from torchvision import transforms as T
        self.samples = samples
        source = [T.Resize(source_size)] if source_size else []
        steps = {"random-resized-crop": source + [T.RandomResizedCrop(image_size, scale=(0.08, 1.0),
                                                                      ratio=(3 / 4, 4 / 3)), T.RandomHorizontalFlip()],
                 "resize": [T.Resize((image_size, image_size))],
                 "center-crop": [T.Resize(val_resize), T.CenterCrop(image_size)]}[transform]
        self.transform = T.Compose(steps + [T.PILToTensor()])

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                return self.transform(pil_8_bits(im).convert("RGB")), label
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # PIL's errors for broken files
            return None


def _collate_skipping_bad(items):
    good = [it for it in items if it is not None]
    bad = len(items) - len(good)
    if not good:
        return torch.empty(0, 3, 1, 1, dtype=torch.uint8), torch.empty(0, dtype=torch.long), bad
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good]), bad
