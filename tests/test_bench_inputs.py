"""Bad input to the benchmark scripts ends in one line and status 2, before
any measuring, and leaves results files as they were: flags out of range,
results files of the wrong kind, output paths that cannot be written, data
that cannot be read. The scripts run in this process (bench/ on the path)."""
import errno
import json
import math
import os
import sys
import tarfile
from pathlib import Path

import pytest
from test_compare import fake_result
from test_data import write_folder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import clamp_probe  # noqa: E402
import common  # noqa: E402
import compare  # noqa: E402
import kernels  # noqa: E402
import loader  # noqa: E402
import make_imagenet_like  # noqa: E402
import report  # noqa: E402
import stem_grad  # noqa: E402
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
            (["--recipe", "equal-steps", "--free-lr", "-1"], "argument --free-lr: must be positive"),
            # attacks that leave the images as they are: every robust accuracy would be the clean one
            (["--eval-step-size", "0"], "--eval-step-size 0: must be above 0"),
            (["--eval-step-size", "0/255"], "--eval-step-size 0/255: must be above 0"),
            (["--eval-step-size", "1e-400"], "--eval-step-size: '1e-400' is too small"),
            (["--epsilon", "0.0"], "--epsilon 0.0: must be above 0")]:
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
    # and one whose attack step is 0 (natural training under another name), named by its row
    monkeypatch.setitem(compare.RECIPES["fast-at"], "pgd", dict(epochs=15, lr=0.2, step_size="0/255"))
    refused(compare, ["--data", tmp_path, "--quick", "--methods", "natural,pgd", "--json", files["keep"]], capsys,
            "step size 0 with epsilon 0.03137: the perturbation would never move, and pgd training would be natural")
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
    with pytest.raises(common.InputError, match=r"r.json: cannot be written \(No space left on device\); not written"):
        common.write_json(path, __import__("torch").device("cpu"), records=[math.pi])
    monkeypatch.undo()
    assert path.read_text() == KEEP and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


@pytest.fixture
def someones_data(tmp_path):
    """{file: its bytes} of files a results file must never replace: notes, a checkpoint, a run's metrics."""
    import torch
    notes, ckpt, metrics = tmp_path / "notes.txt", tmp_path / "run.pt", tmp_path / "metrics.jsonl"
    notes.write_text("free-8 at lr 0.2 diverged in pass 3\n")
    torch.save({"weight": torch.ones(3)}, ckpt)
    metrics.write_text('{"step": 1, "loss": 2.3}\n{"step": 2, "loss": 2.1}\n')
    return {p: p.read_bytes() for p in (notes, ckpt, metrics)}


def test_no_bench_script_replaces_a_file_that_is_not_a_results_file(tmp_path, files, someones_data, capsys,
                                                                      monkeypatch):
    def measured(*a, **k):
        raise AssertionError("measured before --json was checked")
    for script, name in [(clamp_probe, "probe"), (kernels, "make_batch"), (stem_grad, "conv1_timings"),
                         (train_step, "create_model"), (compare, "build_data"), (loader, "scan_image_folder")]:
        monkeypatch.setattr(script, name, measured)
    cpu = ["--device", "cpu", "--quick"]
    scripts = [(clamp_probe, []), (kernels, cpu), (stem_grad, cpu), (train_step, cpu), (compare, ["--data", tmp_path, "--quick"]),
               (loader, ["--data", tmp_path, "--device", "cpu"])]
    for path in someones_data:
        for script, argv in scripts:
            refused(script, argv + ["--json", path], capsys,
                    f"--json {path}: exists and is not a JSON results file (one JSON document): not replaced")
        refused(report, ["--merge", files["compare"], "--out", path], capsys,
                f"--out {path}: exists and is not a JSON results file")
        with pytest.raises(common.InputError, match="not a JSON results file"):  # one that appeared while measuring
            common.write_json(path, __import__("torch").device("cpu"), records=[])
    assert all(path.read_bytes() == data for path, data in someones_data.items())
    assert not any(tmp_path.glob("*.md")) and not any(tmp_path.glob("*.png"))
    common.write_json(files["keep"], __import__("torch").device("cpu"), records=[1])  # a results file is replaced
    assert json.loads(files["keep"].read_text())["records"] == [1]


def test_compare_and_merge_refuse_a_results_file_their_table_or_plot_would_replace(tmp_path, files, capsys):
    (tmp_path / "link.md").symlink_to(tmp_path / "link.json")  # the table would be written through to the JSON
    for name, what in [("out.md", "table"), ("out.png", "plot"), ("OUT.MD", "table"), ("link.json", "table")]:
        message = f"the {what} is written beside the results file as "
        refused(compare, ["--data", tmp_path, "--quick", "--json", tmp_path / name], capsys, message)
        refused(report, ["--merge", files["compare"], "--out", tmp_path / name], capsys, message)
    (tmp_path / "busy.md").mkdir()  # a sibling that cannot be written: said before training, not after
    refused(compare, ["--data", tmp_path, "--quick", "--json", tmp_path / "busy.json"], capsys,
            f"its table {tmp_path / 'busy.md'} is a directory")
    refused(report, ["--merge", files["compare"], "--out", tmp_path / "busy.json"], capsys, "is a directory")
    assert not any((tmp_path / n).exists() for n in ("out.md", "out.png", "OUT.MD", "link.json", "busy.json"))


def test_every_bench_script_says_bad_input_in_one_line():
    for script in (clamp_probe, compare, kernels, loader, stem_grad, train_step):
        assert getattr(script.main, "__wrapped__", None) is not None, f"{script.__name__}.main is not guarded"


def failed_write(script, argv, capsys):
    """(stdout, the one line on stderr) of a run whose results file could not be written (status 2)."""
    rc = script.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 2 and "Traceback" not in err, err
    return out, err.strip().splitlines()[-1]


def test_a_results_file_that_cannot_be_written_ends_in_one_line_with_the_figures_printed(tmp_path, files, capsys,
                                                                                          monkeypatch):
    if os.access("/dev/full", os.W_OK):  # a device is written through: the full disk comes at the write
        out, line = failed_write(clamp_probe, ["--json", "/dev/full"], capsys)
        assert "clamp's mask at the bounds" in out
        assert "/dev/full: cannot be written (No space left on device); not written: the figures" in line, line

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", disk_full)
    keep = files["keep"]
    full = f"{keep}: cannot be written ({os.strerror(errno.ENOSPC)}); not written: the figures measured are in"
    out, line = failed_write(clamp_probe, ["--json", keep], capsys)
    assert "clamp's mask at the bounds" in out and full in line, line
    monkeypatch.setattr(kernels, "shapes", lambda quick, device: {"tiny": (2, 3, 8, 8)})
    out, line = failed_write(kernels, ["--device", "cpu", "--quick", "--no-compile", "--json", keep], capsys)
    assert "update_and_make_input_" in out and full in line, line
    for name in ("conv1_timings", "step_timings"):
        monkeypatch.setattr(stem_grad, name, lambda *a: [{"ms": 1.0}])
    monkeypatch.setattr(stem_grad, "profile_steps", lambda *a: {"kernel_ms_per_step": {}})
    out, line = failed_write(stem_grad, ["--device", "cpu", "--quick", "--json", keep], capsys)
    assert full in line, line
    # train_step writes after each measurement: the first that cannot be written ends the run, its figure printed
    out, line = failed_write(train_step, ["--device", "cpu", "--quick", "--methods", "natural,free-4", "--batch-size",
                                          2, "--image-size", 8, "--steps", 1, "--json", keep], capsys)
    assert "natural fp32" in out and "free-4" not in out and "FAILED" not in out and full in line, line
    out, line = failed_write(report, ["--merge", files["compare"], "--out", keep], capsys)
    assert "| natural |" in out and "| free |" in out and full in line, line  # the table the file would have held
    assert keep.read_text() == KEEP and not keep.with_suffix(".md").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file left


def test_a_plot_that_cannot_be_written_is_named_in_one_line(tmp_path, files, capsys, monkeypatch):
    import matplotlib.figure

    def read_only(self, path, **kw):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", read_only)
    out = tmp_path / "merged.json"
    _, line = failed_write(report, ["--merge", files["compare"], "--out", out], capsys)
    assert f"{out.with_suffix('.png')}: cannot be written ({os.strerror(errno.EROFS)})" in line, line
