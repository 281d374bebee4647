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

KEEP = '{"meta": {"precious": true}}\n'  # an earlier results file: replaceable


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
            # read by equal-steps alone: under the published recipes they were dropped without a word
            (["--free-lr", "0.05"], "--free-lr: for --recipe equal-steps only; --recipe fast-at trains each method"),
            (["--epochs", "64", "--lr", "0.1"], "--epochs, --lr: for --recipe equal-steps only"),
            # attacks that leave the images as they are: every robust accuracy would be the clean one
            (["--eval-step-size", "0"], "--eval-step-size 0: must be above 0"),
            (["--eval-step-size", "0/255"], "--eval-step-size 0/255: must be above 0"),
            (["--eval-step-size", "1e-400"], "--eval-step-size: '1e-400' is too small"),
            (["--epsilon", "0.0"], "--epsilon 0.0: must be above 0"),
            (["--seed", "99999999999999999999"], "--seed must be at most 4294967295"),  # torch.manual_seed overflowed
            # set without the rows that read them, they changed nothing
            (["--sweep-epochs", "5"], "--sweep-epochs is read by the rows of --sweep-replays, which is not given"),
            (["--frontier-methods", "free"], "--frontier-methods is read by the rows of --frontier")]:
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
            "every image of this class is bad")


def test_train_step_refuses_what_it_cannot_measure_or_project(tmp_path, files, capsys):
    for argv, message in [(["--methods", "natural,free-2"], "--methods: unknown 'free-2': choose from natural, free-4"),
                          (["--stem-input-grad", "autograd,fast"], "--stem-input-grad: unknown 'fast': choose from autograd"),
                          (["--steps", "-1"], "argument --steps: must be positive"),
                          (["--batch-size", "0"], "argument --batch-size: must be positive, got 0"),
                          (["--image-size", "-5"], "argument --image-size: must be positive"),
                          (["--json", files["dir"]], "is a directory"),
                          (["--project", "no-such-preset"], "no-such-preset"),
                          (["--project", "cifar10-free8"], "not an ImageNet preset"),
                          (["--project", "imagenet-fast-free4-eps4", "--results", files["text"]], "not JSON"),
                          (["--project", "imagenet-fast-free4-eps4"], "needs --results FILE"),
                          (["--results", files["text"]], "--results is read by --project PRESET")]:
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


def test_ctrl_c_in_a_benchmark_is_one_line_and_status_130(tmp_path, files, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(compare, "build_data", interrupt)
    rc, err = status(compare, ["--data", tmp_path, "--quick", "--json", tmp_path / "c.json"], capsys)
    assert rc == 130 and err.strip().splitlines()[-1].endswith(": interrupted") and "Traceback" not in err, err


def test_list_flags_name_the_flag_and_refuse_a_value_named_twice(tmp_path, files, capsys, monkeypatch):
    monkeypatch.setattr(compare, "build_data", lambda *a, **k: pytest.fail("data loaded for a refused run"))
    base = ["--data", tmp_path, "--quick", "--json", files["keep"]]
    for argv, message in [(["--sweep-replays", "a"], "--sweep-replays: not a comma-separated list of integers"),
                          (["--eval-steps", "2,,3"], "--eval-steps: an empty item in '2,,3'"),
                          (["--methods", "natural,natural"], "--methods: natural named twice"),
                          (["--sweep-replays", "2,4,2"], "--sweep-replays: 2 named twice"),
                          (["--eval-steps", "3,3"], "--eval-steps: 3 named twice"),
                          (["--frontier", "--frontier-methods", "pgd,pgd"], "--frontier-methods: pgd named twice"),
                          (["--methods", "natural, free,magic"], "--methods: unknown 'magic'"),  # spaces allowed
                          (["--sweep-replays", "0,2"], "--sweep-replays: each must be >= 1"),
                          (["--replays", "0"], "argument --replays: must be positive, got 0"),
                          (["--pgd-steps", "-7"], "argument --pgd-steps: must be positive")]:
        refused(compare, base + argv, capsys, message)
    write_folder(tmp_path / "img" / "train", per_class=2)
    data = ["--data", tmp_path / "img", "--device", "cpu", "--loader", "torch", "--image-size", "32"]
    refused(loader, data[:-1] + ["32,48,32"], capsys, "--image-size: 32 named twice")
    refused(loader, data + ["--loader", "torch"], capsys, "--loader: torch named twice")
    refused(loader, data + ["--decode-processes", "4,4"], capsys, "--decode-processes: 4 named twice")
    refused(loader, data + ["--decode-processes", "4"], capsys,  # the torch loader alone: it changed nothing
            "--decode-processes applies to the nvjpeg loader, which is not run here (torch)")
    refused(train_step, ["--device", "cpu", "--quick", "--variants", "eager,eager"], capsys,
            "--variants: eager named twice")
    refused(train_step, ["--device", "cpu", "--quick", "--variants", "eager,graph"], capsys,  # eager rows marked graph
            "--variants graph: CUDA graphs need a CUDA device, not cpu")
    assert files["keep"].read_text() == KEEP


def test_compare_keeps_a_table_or_plot_beside_its_json_that_it_did_not_write(tmp_path, files, capsys, monkeypatch):
    monkeypatch.setattr(compare, "build_data", lambda *a, **k: pytest.fail("trained before the siblings were checked"))
    notes, photo = tmp_path / "run.md", tmp_path / "run.png"
    notes.write_text("free-8 diverged at lr 0.2\n")
    photo.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)  # a PNG, not one of ours
    argv = ["--data", tmp_path, "--quick", "--json", tmp_path / "run.json"]
    refused(compare, argv, capsys, f"its table {notes} exists and is not a bench/compare.py table: not replaced")
    notes.unlink()
    refused(compare, argv, capsys, f"its plot {photo} exists and is not a bench/compare.py plot: not replaced")
    refused(report, ["--merge", files["compare"], "--out", tmp_path / "run.json"], capsys,
            "is not a bench/compare.py plot")
    assert photo.read_bytes().endswith(b"\0" * 64) and not (tmp_path / "run.json").exists()
    # a sweep plot of an earlier run, beside results without a sweep, would show rows that are not in them
    (tmp_path / "old-sweep.png").write_bytes(b"")
    refused(compare, ["--data", tmp_path, "--quick", "--json", tmp_path / "old.json"], capsys,
            "old-sweep.png is an earlier run's sweep plot, and this run has no sweep")


def compare_rows(path, groups):
    """The rows of a fake bench/compare.py result, in ``groups``."""
    rows = json.loads(fake_result(path, rows=("natural", "free")).read_text())["compare"]
    return [{**r, "group": g} for r, g in zip(rows, groups)]


def test_compare_outputs_say_what_they_replace_and_never_draw_an_empty_plot(tmp_path, capsys, monkeypatch):
    import re
    import warnings

    import torch
    out = tmp_path / "c.json"
    rows = compare_rows(tmp_path / "src.json", ("sweep", "sweep"))
    rows[1]["replays"] = 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels" over a blank frame
        compare.write_outputs(out, rows, {"eval_samples": 100}, torch.device("cpu"), "t", sweep=True)
    assert "replaced" not in capsys.readouterr().err
    assert compare.not_ours("plot", out.with_suffix(".png")) is None and out.with_name("c-sweep.png").exists()
    compare.write_outputs(out, rows, {}, torch.device("cpu"), "t", sweep=True)
    compare.write_outputs(out, rows, {}, torch.device("cpu"), "t", sweep=True)  # this run's own file: said once
    assert compare.written(out, True) == f"{out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}, " \
                                         f"{out.with_name('c-sweep.png')}"
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(common, "_WRITTEN", set())  # another process: what this one wrote is an earlier run's
    compare.write_outputs(out, rows, {}, torch.device("cpu"), "t", sweep=True)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and re.search(rf"replaced {re.escape(str(out))}: it held results of \d{{4}}-", err[0]), err
    assert err[1].endswith(f"replaced {out.with_suffix('.md')}: it was there before this run"), err


def test_compare_says_how_many_test_images_it_attacks_and_what_it_wrote(tmp_path, capsys):
    from test_datasets import write_cifar_folders
    write_cifar_folders(tmp_path / "cifar", per_class=(2, 1))
    out = tmp_path / "c.json"
    argv = ["--data", tmp_path / "cifar", "--device", "cpu", "--quick", "--arch", "small_cnn_bn", "--recipe",
            "equal-steps", "--methods", "natural", "--epochs", 1, "--batch-size", 10, "--eval-steps", 1,
            "--restarts", 1, "--eval-samples", 1000, "--json", out]
    rc, err = status(compare, argv, capsys)
    assert rc == 0 and "evaluating on all 10 held-out images (--eval-samples 1000: the test set has no more)" in err
    assert err.strip().splitlines()[-1] == f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}", err
    assert json.loads(out.read_text())["meta"]["eval_samples"] == 10


def test_report_merge_refuses_rows_of_other_data_budgets_or_test_images(tmp_path, capsys):
    a = fake_result(tmp_path / "a.json", rows=("natural",))
    b = fake_result(tmp_path / "b.json", rows=("free",))
    doc = json.loads(b.read_text())

    def variant(name, meta=None, samples=None):
        d = json.loads(json.dumps(doc))
        d["meta"].update(meta or {})
        if samples is not None:
            d["compare"][0]["eval"]["samples"] = samples
        (tmp_path / name).write_text(json.dumps(d))
        return tmp_path / name
    for path, message in [(variant("subset.json", {"train_images": 5000}), "train_images (5000, not 50000)"),
                          (variant("recipe.json", {"recipe": "fast-at", "budget_scale": 1.0}),
                           "recipe ('fast-at', not 'equal-steps')"),
                          (variant("lr.json", {"lr": 0.1}), "lr (0.1, not 0.2)"),
                          (variant("graph.json", {"cuda_graph": True}), "cuda_graph (True, not None)"),
                          (variant("none.json", samples=0), "its row 'free' was attacked on 0 test images"),
                          (variant("fewer.json", samples=50), "attacked on 50 test images, its meta says 100")]:
        refused(report, ["--merge", a, path, "--out", tmp_path / "m.json"], capsys, message)
    refused(report, ["--merge", a, b, "--out", a], capsys, f"--out {a} is one of the files merged")
    assert json.loads(a.read_text())["compare"][0]["method"] == "natural" and not (tmp_path / "m.json").exists()
    rc, _ = status(report, ["--merge", a, b, "--out", tmp_path / "m.json"], capsys)
    assert rc == 0


def test_report_names_a_stray_or_broken_file_in_the_results_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("".join(f"<!-- {n}:start -->\n<!-- {n}:end -->\n" for n in report.SECTIONS))
    assert report.main(["--readme", str(readme)]) == 0
    (tmp_path / "notes.json").write_text("to do: rerun free-8\n")
    refused(report, ["--check", "--readme", readme], capsys, f"{tmp_path / 'notes.json'}: not JSON")
    (tmp_path / "notes.json").unlink()
    step = json.loads((ROOT / "bench" / "results" / "train-step-cpu-2core-quick.json").read_text())
    del step["meta"]["batch_size"]
    (tmp_path / "step.json").write_text(json.dumps(step))
    refused(report, ["--readme", readme], capsys,
            "step.json: not a complete train-step result (KeyError: 'batch_size')")
    (tmp_path / "compare.json").write_text(json.dumps({"meta": {}, "compare": []}))
    (tmp_path / "step.json").unlink()
    refused(report, ["--readme", readme], capsys, "compare.json: not a complete bench/compare.py result")
    assert "<!-- compare-report:start -->\nNo comparison" in readme.read_text()  # left as the good run wrote it


def test_make_imagenet_like_refuses_a_missing_source_an_out_inside_it_and_writes_no_empty_folder(tmp_path, capsys):
    for split in ("train", "val"):
        write_folder(tmp_path / "src" / split, classes=("n01",), per_class=1)
    small = ["--size", "20x16"]
    refused(make_imagenet_like, [tmp_path / "nowhere", tmp_path / "o"] + small, capsys,
            f"{tmp_path / 'nowhere'}: no such file or directory")
    refused(make_imagenet_like, [tmp_path / "src", tmp_path / "src" / "train" / "n02"] + small, capsys,
            "is inside")
    assert sorted(p.name for p in (tmp_path / "src" / "train").iterdir()) == ["n01"]
    for image in (tmp_path / "src").rglob("*.JPEG"):  # passes the quick check, fails to decode
        image.write_bytes(image.read_bytes()[:200] + b"\xff\xd9")
    rc, err = status(make_imagenet_like, [tmp_path / "src", tmp_path / "out"] + small, capsys)
    assert rc == 2 and "no source image could be decoded: nothing written" in err and "0.0 KB" not in err
    assert not (tmp_path / "out").exists()  # a rerun is not refused as "not empty"


def test_report_names_a_readme_it_cannot_update(tmp_path, capsys):
    reversed_ = tmp_path / "rev.md"  # its end marker before its start: a traceback
    reversed_.write_text("<!-- compare-report:end -->\n<!-- compare-report:start -->\n"
                         "<!-- bench-report:start -->\n<!-- bench-report:end -->\n")
    rc, err = status(report, ["--readme", reversed_, "--check"], capsys)
    assert rc == 2 and "no <!-- compare-report:start --> ... <!-- compare-report:end --> section" in err
    binary = tmp_path / "bin.md"
    binary.write_bytes(b"\xff\xfe<!-- compare-report:start -->")
    refused(report, ["--readme", binary, "--check"], capsys, "not UTF-8 text (byte 0)")
    fifo = tmp_path / "readme.fifo"  # read_text waited for a writer forever
    os.mkfifo(fifo)
    refused(report, ["--readme", fifo, "--check"], capsys, "not a regular file")
