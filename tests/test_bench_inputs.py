"""Bad input to the benchmark scripts ends in one line and status 2, before
any measuring, and leaves results files as they were: flags out of range,
results files of the wrong kind, output paths that cannot be written, data
that cannot be read. The scripts run in this process (bench/ on the path)."""
import json
import math
import sys
import tarfile
from pathlib import Path

import pytest
from test_compare import fake_result
from test_data import write_folder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import compare  # noqa: E402
import loader  # noqa: E402
import make_imagenet_like  # noqa: E402
import report  # noqa: E402
import train_step  # noqa: E402

KEEP = '{"precious": true}\n'


def status(script, argv, capsys):
    """(exit status, stderr) of ``script.main(argv)``: argparse's refusals raise SystemExit, ours return 2."""
    try:
        rc = script.main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    return rc, capsys.readouterr().err


def refused(script, argv, capsys, message):
    rc, err = status(script, argv, capsys)
    assert rc == 2 and message in err.strip().splitlines()[-1], err  # the last line (after argparse's usage)


@pytest.fixture
def files(tmp_path):
    """Results files of every wrong kind, a folder, and a results file that must survive."""
    f = {"dir": tmp_path / "adir", "keep": tmp_path / "keep.json", "missing": tmp_path / "missing.json",
         "empty": tmp_path / "empty.json", "text": tmp_path / "text.json", "number": tmp_path / "number.json",
         "compare": fake_result(tmp_path / "compare.json", rows=("natural", "free")),
         "no_meta": tmp_path / "no_meta.json", "plain_file": tmp_path / "plain"}
    f["dir"].mkdir()
    f["keep"].write_text(KEEP)
    f["empty"].write_text("")
    f["text"].write_text("not json {")
    f["number"].write_text("42")
    f["no_meta"].write_text('{"compare": []}')
    f["plain_file"].write_text("x")
    return f


def test_compare_refuses_bad_flags_before_training(tmp_path, files, capsys):
    common = ["--data", tmp_path, "--quick", "--json", files["keep"]]
    for argv, message in [
            (["--methods", "", "--frontier", "--frontier-methods", ""], "nothing to run"),
            (["--budget-scale", "nan"], "argument --budget-scale: must be positive, got nan"),
            (["--sweep-replays", "2", "--sweep-epochs", "inf"], "argument --sweep-epochs: must be positive"),
            (["--eval-samples", "-1"], "argument --eval-samples: must be >= 0, got -1"),
            (["--eval-steps", "3,-3"], "--eval-steps: each must be >= 1"),
            (["--restarts", "0"], "argument --restarts: must be positive, got 0"),  # not silently the default
            (["--restart-steps", "-3"], "argument --restart-steps: must be positive"),
            (["--recipe", "equal-steps", "--free-lr", "-1"], "argument --free-lr: must be positive")]:
        refused(compare, common + argv, capsys, message)
    refused(compare, ["--data", tmp_path, "--quick", "--json", files["dir"]], capsys, "is a directory")
    refused(compare, ["--data", tmp_path, "--quick", "--json", files["plain_file"] / "c.json"], capsys,
            "is not a directory")
    assert files["keep"].read_text() == KEEP


def test_compare_checks_every_row_before_the_first_trains(tmp_path, files, capsys, monkeypatch):
    def no_data(*a, **k):
        raise AssertionError("data loaded before every row's settings were checked")
    monkeypatch.setattr(compare, "build_data", no_data)
    # a recipe whose PGD-7 row (trained after the natural one) has a step the settings refuse
    monkeypatch.setitem(compare.RECIPES["fast-at"], "pgd", dict(epochs=15, lr=0.2, step_size="300/255"))
    rc, err = status(compare, ["--data", tmp_path, "--quick", "--methods", "natural,pgd", "--json", files["keep"]],
                     capsys)
    assert rc == 2 and "step size must be between 0 and 1" in err, err
    assert files["keep"].read_text() == KEEP


def test_report_merge_names_each_unusable_file_and_writes_nothing(tmp_path, files, capsys):
    out = files["keep"]
    good = files["compare"]
    for bad, message in [("missing", "no such file"), ("empty", "not JSON"), ("text", "not JSON"),
                         ("number", "not a bench/compare.py result (no 'meta')"), ("no_meta", "not a bench/compare.py result (no 'meta')"),
                         ("dir", "is a directory")]:
        refused(report, ["--merge", good, files[bad], "--out", out], capsys, f"{files[bad]}: {message}")
    doc = json.loads(good.read_text())
    for name, rows in [("dict_rows", {"x": 1}), ("no_rows", []), ("bare_rows", [{"label": "x"}])]:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**doc, "compare": rows}))
        refused(report, ["--merge", path, "--out", out], capsys, "is not a list of bench/compare.py rows")
    other = json.loads(fake_result(tmp_path / "other.json", rows=("pgd",)).read_text())
    del other["compare"][0]["eval"]["cw-20"]  # a row attacked differently: no common table
    (tmp_path / "other.json").write_text(json.dumps(other))
    refused(report, ["--merge", good, tmp_path / "other.json", "--out", out], capsys, "'pgd' has no cw-20")
    refused(report, ["--merge", good, good, "--out", out], capsys, "is named twice")
    (tmp_path / "copy.json").write_text(good.read_text())
    refused(report, ["--merge", good, tmp_path / "copy.json", "--out", out], capsys, "is also in")
    assert out.read_text() == KEEP
    refused(report, ["--merge", good, "--out", files["dir"]], capsys, "--out")
    refused(report, ["--merge", good, "--out", files["plain_file"] / "m.json"], capsys, "is not a directory")
    refused(report, ["--out", out], capsys, "--merge and --out go together")
    refused(report, ["--check", "--readme", tmp_path / "nope.md"], capsys, "--readme")


def test_loader_bench_names_unreadable_data_and_step_files(tmp_path, files, capsys):
    write_folder(tmp_path / "data" / "train", per_class=2)
    data = ["--data", tmp_path / "data", "--device", "cpu", "--image-size", 32, "--batch-size", 2,
            "--loader", "torch"]
    refused(loader, ["--data", tmp_path / "nowhere"], capsys, "no such directory")
    for flag, value, message in [("--batch-size", 0, "must be positive"), ("--workers", -1, "must be >= 0"),
                                 ("--batches", -2, "must be >= 0")]:
        refused(loader, data + [flag, value], capsys, f"argument {flag}: {message}")
    for bad, message in [("missing", "no such file"), ("text", "not JSON"),
                         ("compare", "not a bench/train_step.py result")]:
        refused(loader, data + ["--train-step", files[bad]], capsys, f"{files[bad]}: {message}")
    (tmp_path / "data" / "train" / "n01" / "img0.JPEG").unlink()
    (tmp_path / "data" / "train" / "n01" / "img1.JPEG").unlink()
    refused(loader, data, capsys, "class folder with no images")
    bad = tmp_path / "bad" / "train" / "n01"
    bad.mkdir(parents=True)
    (bad / "x.jpg").write_text("not an image")
    refused(loader, ["--data", tmp_path / "bad", "--device", "cpu", "--loader", "torch"], capsys,
            "no readable image")


def test_train_step_refuses_what_it_cannot_measure_or_project(tmp_path, files, capsys):
    for argv, message in [(["--methods", "natural,free-2"], "--methods: unknown free-2"),
                          (["--steps", "-1"], "argument --steps: must be positive"),
                          (["--batch-size", "0"], "argument --batch-size: must be positive, got 0"),
                          (["--image-size", "-5"], "argument --image-size: must be positive"),
                          (["--json", files["dir"]], "is a directory"),
                          (["--project", "no-such-preset"], "no-such-preset"),
                          (["--project", "cifar10-free8"], "not an ImageNet preset"),
                          (["--project", "imagenet-fast-free4-eps4", "--results", files["text"]], "not JSON")]:
        refused(train_step, ["--device", "cpu", "--quick"] + argv, capsys, message)
    cifar = tmp_path / "cifar-step.json"
    cifar.write_text(json.dumps({"meta": {"model": "preact_resnet18", "image_size": 224, "batch_size": 128},
                                 "records": [{"method": "free-4 bf16", "images_per_s": 1000.0}]}))
    refused(train_step, ["--project", "imagenet-fast-free4-eps4", "--results", cifar], capsys,
            "trains resnet50, but")


def test_make_imagenet_like_refuses_bad_sources_and_outputs(tmp_path, capsys):
    for split in ("train", "val"):
        write_folder(tmp_path / "src" / split, classes=("n01", "n02"), per_class=2)
    (tmp_path / "notatar.tar.gz").write_text("hello")
    with tarfile.open(tmp_path / "good.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src", arcname="src")
    whole = (tmp_path / "good.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "afile").write_text("x")
    small = ["--size", "40x35"]
    for argv, message in [([tmp_path / "notatar.tar.gz", tmp_path / "o1"], "not a readable tar archive"),
                          ([tmp_path / "cut.tar.gz", tmp_path / "o2"], "not a readable tar archive"),
                          ([tmp_path / "src", tmp_path / "afile"], "is not a directory"),
                          ([tmp_path / "src", tmp_path / "afile" / "out"], "cannot be made in"),
                          ([tmp_path / "src", tmp_path / "o3", "--grain", "-3"], "argument --grain: must be >= 0"),
                          ([tmp_path / "src", tmp_path / "o4", "--grain", "nan"], "argument --grain"),
                          ([tmp_path / "src", tmp_path / "o5", "--limit", "-3"], "argument --limit: must be >= 0")]:
        refused(make_imagenet_like, argv + small, capsys, message)
        assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))
    # a file that passes the quick check and fails to decode is named and skipped, not a traceback
    victim = tmp_path / "src" / "train" / "n01" / "img0.JPEG"
    victim.write_bytes(victim.read_bytes()[:200] + b"\xff\xd9")
    rc, err = status(make_imagenet_like, [tmp_path / "src", tmp_path / "out"] + small, capsys)
    assert rc == 0 and "skipped 1 source image(s)" in err and str(victim) in err, err
    assert len(list((tmp_path / "out").rglob("*.JPEG"))) == 7


def test_a_json_write_that_fails_leaves_the_old_file(tmp_path, monkeypatch):
    import os

    import common
    path = tmp_path / "r.json"
    path.write_text(KEEP)

    def disk_full(fd):  # the new text is written, then the disk cannot hold it
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        common.write_json(path, __import__("torch").device("cpu"), records=[math.pi])
    monkeypatch.undo()
    assert path.read_text() == KEEP and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
