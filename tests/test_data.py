"""Data pipelines on tiny datasets written in the real on-disk formats."""
import io
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from freeadv_fast.config import RunConfig
from freeadv_fast.data import cifar
from freeadv_fast.data.datasets import build_data
from freeadv_fast.data.errors import DataError
from freeadv_fast.data.folder import ImageFolderLoader, dali_available, scan_image_folder
from freeadv_fast.data.synthetic import SyntheticBatches
from freeadv_fast.data.tensors import RandomCropFlip, TensorBatches

LOADERS = [pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")),
           "nvjpeg", "torch"]


def write_folder(root, classes=("n02", "n01", "n10"), per_class=5, seed=0):
    """JPEGs of several sizes and aspect ratios (40-300 px a side), in ImageFolder layout."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            h, w = int(rng.integers(40, 300)), int(rng.integers(40, 300))
            # smooth content (a coarse random pattern, upsampled), like photos rather than noise
            coarse = Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8))
            coarse.resize((w, h), Image.BICUBIC).save(root / c / f"img{i}.JPEG", quality=90)
    return root


def gradient_image(path, size=200):
    """Red grows left to right, green top to bottom: a crop's colours say where it came from."""
    ramp = np.linspace(0, 255, size)
    img = np.zeros((size, size, 3), np.uint8)
    img[..., 0] = ramp[None, :]
    img[..., 1] = ramp[:, None]
    Image.fromarray(img).save(path, quality=98)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("imagenet") / "train")


def test_labels_follow_torchvision_imagefolder(folder):
    from torchvision.datasets import ImageFolder
    classes, samples, bad = scan_image_folder(folder)
    tv = ImageFolder(str(folder))
    assert classes == tv.classes and not bad
    assert samples == [(p, label) for p, label in tv.samples]


@pytest.mark.parametrize("loader", LOADERS)
def test_train_batches_are_uint8_channels_last_and_cover_the_pass(folder, loader):
    data = ImageFolderLoader(folder, train=True, batch_size=4, image_size=32, loader=loader, workers=1, seed=1)
    batches = list(data)
    assert len(batches) == len(data) == 4  # 15 images: 4 + 4 + 4 + 3
    for x, y in batches:
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32)
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert y.dtype == torch.int64 and ((0 <= y) & (y < 3)).all()
    labels = torch.cat([y for _, y in batches]).sort().values
    assert labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5


@pytest.mark.parametrize("loader", LOADERS)
def test_val_transform_matches_torchvision(folder, loader):
    from torchvision import transforms as T
    data = ImageFolderLoader(folder, train=False, batch_size=5, loader=loader, workers=1)
    x = torch.cat([x for x, _ in data])
    tv = T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()])
    expected = torch.stack([tv(Image.open(p).convert("RGB")) for p, _ in data.samples])
    diff = (x.float() - expected.float()).abs()
    assert x.shape == expected.shape
    assert diff.mean() < 2 and diff.quantile(0.99) < 12  # decoder and resampling differences only (a 1-px shift gives ~1.5-2)


def test_ranks_get_disjoint_equal_shares_covering_the_pass(folder):
    shares = [ImageFolderLoader(folder, train=True, batch_size=2, loader="torch", rank=r, world_size=2, seed=5)
              for r in (0, 1)]
    for epoch in (0, 1):
        idx = []
        for s in shares:
            s.set_epoch(epoch)
            idx.append(s.rank_indices())
        assert len(idx[0]) == len(idx[1]) == 7 and not set(idx[0]) & set(idx[1])
        assert len(shares[0]) == len(shares[1]) == 4
    val = [ImageFolderLoader(folder, train=False, batch_size=4, loader="torch", rank=r, world_size=2) for r in (0, 1)]
    assert sorted(val[0].rank_indices() + val[1].rank_indices()) == list(range(15))  # evaluation sees every image


@pytest.mark.parametrize("loader", LOADERS)
def test_crop_scales_and_flips_are_in_their_ranges(tmp_path, loader):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(32):
            gradient_image(tmp_path / c / f"{i}.jpg")
    data = ImageFolderLoader(tmp_path, train=True, batch_size=64, image_size=32, loader=loader, workers=1)
    (x, _), = list(data)
    x = x.float() / 255
    red_left, red_right = x[:, 0, :, 0].mean(1), x[:, 0, :, -1].mean(1)
    green_top, green_bottom = x[:, 1, 0, :].mean(1), x[:, 1, -1, :].mean(1)
    flipped = red_left > red_right
    assert 0.2 < flipped.float().mean() < 0.8
    width = (red_right - red_left).abs() * 32 / 31
    height = (green_bottom - green_top) * 32 / 31
    area, ratio = width * height, width / height
    assert area.min() > 0.08 * 0.8 and area.max() < 1.05  # RandomResizedCrop's scale (0.08, 1)
    assert ratio.min() > 0.75 * 0.85 and ratio.max() < 4 / 3 * 1.15  # and ratio (3/4, 4/3)
    assert area.std() > 0.1  # crops do vary


def test_bad_layouts_are_named(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        scan_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        scan_image_folder(tmp_path / "empty")
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.JPEG")
    with pytest.raises(DataError, match="images directly inside"):
        scan_image_folder(flat)
    write_folder(tmp_path / "hole", classes=("a",), per_class=2)
    (tmp_path / "hole" / "b").mkdir()
    (tmp_path / "hole" / "b" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"hole/b: class folder with no images"):
        scan_image_folder(tmp_path / "hole")


@pytest.fixture()
def broken_folder(tmp_path):
    root = write_folder(tmp_path / "train", classes=("a", "b"), per_class=4)
    good = (root / "a" / "img0.JPEG").read_bytes()
    (root / "a" / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    (root / "b" / "text.JPEG").write_text("this is not an image")
    (root / "b" / "garbage.JPEG").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(600) + b"\xff\xd9")  # passes the scan
    return root


@pytest.mark.parametrize("loader", LOADERS)
def test_bad_files_are_left_out_or_skipped_never_fatal(broken_folder, loader, capsys):
    classes, samples, bad = scan_image_folder(broken_folder)
    assert sorted(os.path.basename(p) for p, _ in bad) == ["text.JPEG", "truncated.JPEG"]
    assert "left out 2 bad file(s)" in capsys.readouterr().err
    data = ImageFolderLoader(broken_folder, train=True, batch_size=3, image_size=16, loader=loader, workers=1)
    for epoch in range(2):
        data.set_epoch(epoch)
        n = sum(len(y) for _, y in data)
        assert n in (8, 9)  # the undecodable file is skipped (torch) or replaced (DALI)
    err = capsys.readouterr().err
    assert "garbage.JPEG" in err or "skipped 1 image(s)" in err


def test_nvjpeg_decoding_processes_give_the_in_process_batches(broken_folder, capsys):
    """--decode-processes: batches decoded in spawned processes are the ones
    the training process decodes itself (same seeds, same order), resuming
    mid-pass included, and a file the decoder refuses is named and skipped."""
    classes, samples, _ = scan_image_folder(broken_folder, check=False)  # the loader meets the bad files
    kw = dict(train=True, batch_size=3, image_size=16, loader="nvjpeg", workers=0, seed=3, samples=samples,
              classes=classes)
    here = ImageFolderLoader(broken_folder, **kw)
    spawned = ImageFolderLoader(broken_folder, decode_processes=2, **kw)
    for epoch in (1, 2):
        for data in (here, spawned):
            data.set_epoch(epoch)
        expected, got = list(here), list(spawned)
        assert [len(y) for _, y in got] == [len(y) for _, y in expected] and sum(len(y) for _, y in got) == 8
        for (x0, y0), (x1, y1) in zip(expected, got):
            assert torch.equal(x0, x1) and torch.equal(y0, y1)
            assert x1.is_contiguous(memory_format=torch.channels_last)
        if epoch == 1:
            processes = spawned._decoding
    assert spawned._decoding is processes  # started once, kept for every pass
    assert spawned.bad_files == here.bad_files and len(here.bad_files) == 3
    assert "cannot be decoded" in capsys.readouterr().err
    (x0, _), (x1, _) = next(iter(here.skip(2))), next(iter(spawned.skip(2)))
    assert torch.equal(x0, x1)
    spawned.close()
    assert spawned._decoding is None
    with pytest.raises(DataError, match="decode processes must be 0 or more"):
        ImageFolderLoader(broken_folder, decode_processes=-1, **kw)


@pytest.mark.parametrize("loader,signame", [(["nvjpeg", "--decode-processes", "2"], "SIGINT"),
                                            (["torch", "--workers", "2"], "SIGTERM")])
def test_a_stop_signal_to_the_process_group_stops_the_run_cleanly(tmp_path, loader, signame):
    """Ctrl-C (or SLURM's scancel, SIGTERM) reaches the whole process group,
    the loaders' worker processes too: they ignore it, and the run stops as
    without them (batch finished, checkpoint written, status 128 + signal),
    not on a dead worker's traceback."""
    import signal
    sig = getattr(signal, signame)
    write_folder(tmp_path / "data" / "train", per_class=6)
    write_folder(tmp_path / "data" / "val", per_class=2, seed=1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "freeadv_fast.train", "imagenet", "--cpu", "--data", str(tmp_path / "data"),
         "--loader", *loader, "--arch", "small_cnn_bn", "--image-size", "32", "--batch-size", "6", "--epochs", "400",
         "--replays", "2", "--eval-samples", "6", "--out", str(tmp_path / "run")],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        for line in proc.stderr:  # a pass done and evaluated: both loaders' workers are running
            if "eval on 6 held-out images" in line:
                break
        os.killpg(proc.pid, sig)
        rest = proc.stderr.read()
        code = proc.wait(timeout=120)
    finally:
        proc.kill()
    assert code == 128 + sig and f"stopped by {signame}" in rest and "Traceback" not in rest, (code, rest[-2000:])
    assert (tmp_path / "run" / "checkpoint-last.pt").exists()


def test_data_check_lists_every_unreadable_file(broken_folder):
    def check(root):
        return subprocess.run([sys.executable, "-m", "freeadv_fast.data", "check", str(root)], capture_output=True,
                              text=True, timeout=120)
    write_folder(broken_folder.parent / "val", classes=("a", "b"), per_class=2)
    result = check(broken_folder.parent)
    assert result.returncode == 1, result.stderr
    bad_lines = [line for line in result.stdout.splitlines() if "BAD" in line]
    assert len(bad_lines) == 3 and "3 bad file(s)" in result.stdout
    assert any("truncated.JPEG" in line and "truncated JPEG" in line for line in bad_lines)
    # PIL decodes these two, the other loaders refuse them: the check said they were fine
    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png, "PNG")
    damaged = bytearray(png.getvalue())
    at = damaged.find(b"IDAT")
    damaged[at + 4 + int.from_bytes(damaged[at - 4:at], "big")] ^= 0xFF  # the chunk's CRC
    (broken_folder.parent / "val" / "a" / "crc.png").write_bytes(bytes(damaged))
    frames = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)) for v in (0, 255)]
    frames[0].save(broken_folder.parent / "val" / "b" / "moving.webp", save_all=True, append_images=frames[1:])
    result = check(broken_folder.parent)
    assert "BAD" in result.stdout and "crc.png: damaged PNG" in result.stdout, result.stdout
    assert "moving.webp: torchvision cannot decode it" in result.stdout, result.stdout
    assert "5 bad file(s)" not in result.stdout and "2 bad file(s)" in result.stdout
    missing = subprocess.run([sys.executable, "-m", "freeadv_fast.data", "check", str(broken_folder / "nope")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "no such directory" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
def test_dali_skips_an_undecodable_file_in_the_first_batch_of_a_pass(tmp_path, capsys):
    """DALI decodes the first batches as its iterator is made: a bad file
    there is replaced as one met later in the pass is."""
    root = write_folder(tmp_path / "train", classes=("a", "b"), per_class=4)
    garbage = root / "a" / "0garbage.JPEG"  # sorted first: the first file of the evaluation pass
    garbage.write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(2000) + b"\xff\xd9")  # passes the scan
    data = ImageFolderLoader(root, train=False, batch_size=3, image_size=16, val_resize=16, loader="dali", workers=1)
    assert data.samples[0][0] == str(garbage)
    assert sum(len(y) for _, y in data) == 9  # replaced by another image of its window
    assert list(data.bad_files) == [str(garbage)] and "0garbage.JPEG" in capsys.readouterr().err


@pytest.mark.parametrize("loader", LOADERS)
def test_a_16_bit_greyscale_png_is_scaled_to_8_bits_by_every_loader(tmp_path, loader):
    """PIL's convert("RGB") clips mode I;16 at 255, and torchvision decodes it
    to uint16, which the nvjpeg loader could not stack with 8-bit images."""
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.fromarray(np.full((16, 16), 17038, np.uint16)).save(tmp_path / c / "grey16.png")
        Image.fromarray(np.full((16, 16, 3), 66, np.uint8)).save(tmp_path / c / "rgb8.png")
    assert Image.open(tmp_path / "a" / "grey16.png").mode == "I;16"
    data = ImageFolderLoader(tmp_path, train=False, batch_size=4, image_size=16, val_resize=16, loader=loader,
                             workers=0)
    (x, _), = list(data)
    assert x.shape == (4, 3, 16, 16) and x.unique().tolist() == [round(17038 * 255 / 65535)]  # 66


def jpeg_with_exif(tmp_path, exif_bytes: int, claimed=None):
    """A real 8x8 JPEG with an APP1 (Exif) segment of ``exif_bytes`` right after
    SOI, as camera JPEGs have; ``claimed``: (width, height) patched into its
    frame header."""
    import io
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buf, format="JPEG")
    data = buf.getvalue()
    app1 = b"\xff\xe1" + (exif_bytes + 2).to_bytes(2, "big") + b"Exif\0\0" + bytes(exif_bytes - 6)
    data = bytearray(data[:2] + app1 + data[2:])
    if claimed:
        sof = data.index(b"\xff\xc0")
        data[sof + 5:sof + 9] = claimed[1].to_bytes(2, "big") + claimed[0].to_bytes(2, "big")
    path = tmp_path / f"exif{exif_bytes}-{claimed}.JPEG"
    path.write_bytes(bytes(data))
    return path


def test_a_large_exif_block_hides_no_oversized_frame_header(tmp_path):
    """The frame header comes after 6 KB of Exif: found by walking the
    segments, not by looking in a fixed prefix."""
    from freeadv_fast.data.folder import full_check, quick_check, read_checked
    bomb = jpeg_with_exif(tmp_path, 6000, claimed=(30000, 30000))
    assert bomb.read_bytes().index(b"\xff\xc0") > 6000
    assert "claims 30000x30000 pixels" in quick_check(str(bomb))
    assert "claims 30000x30000 pixels" in read_checked(bomb)[1]
    sound = jpeg_with_exif(tmp_path, 6000)
    assert quick_check(str(sound)) is None and full_check(str(sound)) is None and read_checked(sound)[1] is None


def test_formats_torchvision_cannot_decode_are_refused_by_the_checker_and_the_scan(tmp_path):
    """The nvjpeg loader and CIFAR folders decode with torchvision, which reads
    JPEG, PNG and WebP only: every loader and the checker refuse the others
    alike, by name."""
    write_folder(tmp_path / "train", classes=("a", "b"), per_class=2)
    odd = []
    for fmt, ext in [("BMP", "bmp"), ("TIFF", "tiff"), ("PPM", "ppm"), ("PPM", "pgm")]:
        odd.append(tmp_path / "train" / "a" / f"x.{ext}")
        Image.new("L" if ext == "pgm" else "RGB", (8, 8)).save(odd[-1], format=fmt)
    _, samples, bad = scan_image_folder(tmp_path / "train")
    assert sorted(p for p, _ in bad) == sorted(map(str, odd)) and len(samples) == 4
    assert all("unsupported format" in why for _, why in bad)
    result = subprocess.run([sys.executable, "-m", "freeadv_fast.data", "check", str(tmp_path), "--workers", "1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and all(f"BAD {p}: unsupported format" in result.stdout for p in odd), \
        result.stdout


def test_data_check_refuses_a_worker_count_below_1_and_a_file_for_a_folder(tmp_path, capsys):
    from freeadv_fast.data.__main__ import main
    for workers in ("0", "-3"):
        with pytest.raises(SystemExit) as stop:
            main(["check", str(tmp_path), "--workers", workers])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and f"--workers: must be >= 1, got {workers}" in err and err.count("\n") == 1
    (tmp_path / "x.JPEG").write_bytes(b"x")
    assert main(["check", str(tmp_path / "x.JPEG")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'x.JPEG'}: a file, not a directory\n"


@pytest.mark.parametrize("loader", LOADERS)
def test_a_file_name_that_is_not_utf8_is_read_or_left_out_by_name_never_a_crash(tmp_path, loader, capsys):
    """DALI's file reader takes names as UTF-8 strings and crashed on a latin-1
    'caf\\xe9.JPEG'; it leaves such a file out, named once. The torch and
    nvjpeg loaders read it."""
    write_folder(tmp_path, classes=("a", "b"), per_class=2)
    odd = tmp_path / "a" / os.fsdecode(b"caf\xe9.JPEG")
    odd.write_bytes((tmp_path / "a" / "img0.JPEG").read_bytes())
    data = ImageFolderLoader(tmp_path, train=False, batch_size=2, image_size=16, val_resize=16, loader=loader,
                             workers=1)
    for _ in range(2):
        assert sorted(torch.cat([y for _, y in data]).tolist()) == ([0, 0, 1, 1] if loader == "dali" else
                                                                   [0, 0, 0, 1, 1])
    err = capsys.readouterr().err
    if loader == "dali":
        assert list(data.bad_files) == [str(odd)] and "not valid UTF-8" in data.bad_files[str(odd)]
        assert err.count("caf\\xe9.JPEG") == 1 and "--loader torch" in err
    assert "Traceback" not in err


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
def test_dali_refuses_a_class_folder_whose_name_is_not_utf8(tmp_path):
    """Every file of such a class is unopenable by DALI: leaving them out
    would train without the class, so the loader names it and stops."""
    write_folder(tmp_path, classes=("a", "b"), per_class=2)
    (tmp_path / "b").rename(tmp_path / os.fsdecode(b"caf\xe9"))
    with pytest.raises(DataError, match=r"any image of 1 class\(es\).*caf\\xe9.*--loader torch"):
        ImageFolderLoader(tmp_path, train=True, batch_size=2, image_size=16, loader="dali", workers=1)


def check_in_process(monkeypatch, capsys, *argv):
    """(status, stdout, stderr) of ``python -m freeadv_fast.data check`` run
    here, its process pool replaced by one that records its size and checks
    in this process."""
    import freeadv_fast.data.__main__ as data_main
    pools = []

    class Pool:
        def __init__(self, workers, **_):
            pools.append(workers)

        def shutdown(self, **_):
            pass

        def map(self, fn, items, chunksize=1):
            return map(fn, items)
    monkeypatch.setattr(data_main, "ProcessPoolExecutor", Pool)
    code = data_main.main(["check", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err, pools


def test_data_check_starts_no_more_processes_than_files(tmp_path, monkeypatch, capsys):
    write_folder(tmp_path / "train", classes=("a", "b"), per_class=2)
    code, out, err, pools = check_in_process(monkeypatch, capsys, tmp_path, "--workers", "300")
    assert code == 0 and pools == [4] and "4 images" in out, (out, err)


def test_data_check_refuses_held_out_class_folders_that_training_refuses_naming_them(tmp_path, monkeypatch, capsys):
    """Training stops on a val split whose class folders are not train's; the
    check did not. Both name the classes that differ: a few, then a count."""
    from freeadv_fast.config import build_config
    write_folder(tmp_path / "train", classes=("a", "b", "c", "d", "e", "f"), per_class=1)
    write_folder(tmp_path / "val", classes=("a", "x"), per_class=1)
    code, out, err, _ = check_in_process(monkeypatch, capsys, tmp_path)
    expected = (f"{tmp_path / 'val'}: its class folders differ from {tmp_path / 'train'}'s: it lacks b, c, d and "
                f"2 more; it has x, which {tmp_path / 'train'} lacks")
    assert code == 2 and err == f"error: {expected}\n" and "decoding" not in out, (out, err)
    cfg = build_config(dataset="imagenet", flags=dict(data=str(tmp_path), batch_size=2, loader="torch", workers=0))
    with pytest.raises(DataError) as refused:
        build_data(cfg)
    assert str(refused.value) == expected


def test_data_check_names_a_bad_file_whose_name_is_not_utf8_on_a_strict_stdout(tmp_path, monkeypatch, capsys):
    """PYTHONIOENCODING=utf-8 makes stdout strict: printing a latin-1 name raised UnicodeEncodeError."""
    import io
    write_folder(tmp_path / "train", classes=("a", "b"), per_class=1)
    (tmp_path / "train" / "a" / os.fsdecode(b"caf\xe9.JPEG")).write_bytes(b"not an image")
    strict = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    monkeypatch.setattr(sys, "stdout", strict)
    code, _, err, _ = check_in_process(monkeypatch, capsys, tmp_path, "--workers", "1")
    out = strict.buffer.getvalue().decode()
    assert code == 1 and not err, err
    assert "BAD " + str(tmp_path / "train" / "a" / "caf\\xe9.JPEG") + ": not an image" in out, out


def test_data_check_of_cifar_pickles_missing_the_first_batch_says_what_training_says(tmp_path, monkeypatch, capsys):
    write_cifar(tmp_path, n_train=4, n_test=4)
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").unlink()
    with pytest.raises(DataError) as training:
        cifar.load_cifar(tmp_path, "cifar10", train=True)
    assert "no cifar10 here" in str(training.value)
    code, out, err, _ = check_in_process(monkeypatch, capsys, tmp_path)
    assert code == 2 and err == f"error: {training.value}\n" and "class folder" not in err


def write_cifar(root, name="cifar10", n_train=50, n_test=20, protocol=2):
    folder, train_files, test_files, label_key, meta, names_key = cifar.LAYOUTS[name]
    d = root / folder
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    classes = 10 if name == "cifar10" else 100
    for files, n in ((train_files, n_train), (test_files, n_test)):
        for f in files:
            batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                     label_key: [int(v) for v in rng.integers(0, classes, n)]}
            with open(d / f, "wb") as fh:
                pickle.dump(batch, fh, protocol=protocol)
    with open(d / meta, "wb") as fh:
        pickle.dump({names_key: [f"c{i}".encode() for i in range(classes)]}, fh, protocol=protocol)
    return root


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickles_load_onto_the_device(tmp_path, name):
    write_cifar(tmp_path, name, protocol=2 if name == "cifar10" else 4)
    x, y, names = cifar.load_cifar(tmp_path, name, train=True)
    assert x.shape == (250 if name == "cifar10" else 50, 3, 32, 32) and x.dtype == torch.uint8
    assert len(names) == (10 if name == "cifar10" else 100)
    data = build_data(RunConfig(dataset=name, data=str(tmp_path), batch_size=16))
    xb, yb = next(iter(data.train))
    assert xb.shape == (16, 3, 32, 32) and xb.dtype == torch.uint8 and yb.shape == (16,)
    assert data.num_classes == (10 if name == "cifar10" else 100)
    assert sum(len(y) for _, y in data.val) == 20  # every test image, in order, unaugmented


def test_cifar_errors_and_hostile_pickles(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        cifar.load_cifar(tmp_path / "nope", "cifar10", train=True)
    with pytest.raises(DataError, match="no cifar10 here"):
        cifar.load_cifar(tmp_path, "cifar10", train=True)
    write_cifar(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    with open(batch, "wb") as fh:
        pickle.dump({b"data": Payload()}, fh)
    with pytest.raises(DataError, match="refusing to load posix.system|refusing to load os.system"):
        cifar.load_cifar(tmp_path, "cifar10", train=True)
    batch.write_bytes(b"\x80\x02truncated")
    with pytest.raises(DataError, match="data_batch_3: not a readable CIFAR pickle"):
        cifar.load_cifar(tmp_path, "cifar10", train=True)


@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar_pickles_with_str_keys_load_and_one_with_no_images_is_named(tmp_path, protocol):
    write_cifar(tmp_path, n_train=4, n_test=4)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    pixels = np.arange(4 * 3072).reshape(4, 3072).astype(np.uint8)
    with open(batch, "wb") as fh:  # re-saved from Python 3: str keys
        pickle.dump({"data": pixels, "labels": [1, 2, 3, 4]}, fh, protocol=protocol)
    x, y, _ = cifar.load_cifar(tmp_path, "cifar10", train=True)
    assert np.array_equal(x[4:8].reshape(4, -1).numpy(), pixels) and y[4:8].tolist() == [1, 2, 3, 4]
    with open(batch, "wb") as fh:  # protocol 2 pickles an empty array's bytes as a call of bytes()
        pickle.dump({b"data": np.zeros((0, 3072), np.uint8), b"labels": []}, fh, protocol=protocol)
    with pytest.raises(DataError, match="data_batch_2: holds no images"):
        cifar.load_cifar(tmp_path, "cifar10", train=True)
    with open(batch, "wb") as fh:
        pickle.dump({b"data": pixels, b"labels": []}, fh, protocol=protocol)
    with pytest.raises(DataError, match="data_batch_2: 4 images but 0 labels"):
        cifar.load_cifar(tmp_path, "cifar10", train=True)


def test_the_cifar_unpickler_calls_bytes_with_no_argument_only(tmp_path):
    write_cifar(tmp_path, n_train=4, n_test=4)
    # {b"data": bytes(10 ** 12)}: the bytes call of an empty array, with an argument that asks for a terabyte
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(
        b"\x80\x02}C\x04data" + b"c__builtin__\nbytes\n" + b"\x8a\x06\x00\x10\xa5\xd4\xe8\x00\x85R" + b"s.")
    with pytest.raises(DataError, match="refusing to call bytes with arguments"):
        cifar.load_cifar(tmp_path, "cifar10", train=True)


def test_device_crop_and_flip_match_their_definition():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (400, 3, 32, 32), dtype=torch.uint8)
    out = RandomCropFlip(padding=4)(x, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    flips = 0
    for i in range(len(x)):
        found = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (False, True)
                 if torch.equal(out[i], (lambda c: c.flip(2) if f else c)(padded[i, :, dy:dy + 32, dx:dx + 32]))]
        assert found, f"image {i} is not a padded crop (or its flip)"
        flips += found[0][2]
    assert 150 < flips < 250


def test_tensor_batches_resume_mid_pass_with_the_same_augmentation():
    x = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(40)
    data = TensorBatches(x, y, 8, seed=3, augment=RandomCropFlip())
    data.set_epoch(2)
    full = list(data)
    resumed = list(data.skip(2))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[2:], resumed))
    data.set_epoch(3)
    assert not torch.equal(list(data)[0][1], full[0][1])  # each pass is shuffled anew


def test_tensor_batches_give_every_rank_an_image_of_every_training_batch():
    """65 images in batches of 64 over 2 ranks: the last batch's one image
    left rank 1 an empty batch, which it could not train on while rank 0
    waited for its gradients (a traceback, then a 10-minute hang)."""
    x, y = torch.zeros(65, 1, 4, 4, dtype=torch.uint8), torch.arange(65)
    shards = [TensorBatches(x, y, 64, rank=r, world_size=2) for r in (0, 1)]
    assert [len(s) for s in shards] == [1, 1] and [len(b[1]) for s in shards for b in s] == [32, 32]
    held_out = [TensorBatches(x, y, 64, shuffle=False, rank=r, world_size=2, every_rank_steps=False) for r in (0, 1)]
    assert [[len(b[1]) for b in s] for s in held_out] == [[32, 1], [32, 0]]  # evaluation keeps every image
    assert [len(b[1]) for b in TensorBatches(x, y, 64)] == [64, 1]  # one process: nothing left out
    for rank, world in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match="rank must be in"):
            TensorBatches(x, y, 64, rank=rank, world_size=world)


def test_synthetic_batches():
    data = SyntheticBatches(6, image_size=20, classes=7, batches_per_epoch=3)
    batches = list(data)
    assert len(batches) == 3
    x, y = batches[0]
    assert x.shape == (6, 3, 20, 20) and x.dtype == torch.uint8 and x.is_contiguous(memory_format=torch.channels_last)
    assert int(y.max()) < 7
    assert torch.equal(list(data.skip(1))[0][0], batches[1][0])
    # a pass's images over every process, as the other loaders count them (the progress bar passed 100%)
    assert data.num_samples == 18 and SyntheticBatches(6, batches_per_epoch=3, world_size=2).num_samples == 36
