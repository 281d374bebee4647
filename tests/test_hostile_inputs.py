"""Bad input ends in one line and status 2 (or is handled), never a
traceback: generated configurations (Hypothesis), a corpus of hand-made
hostile cases through the commands, and the recovery paths they exercise."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from freeadv_fast.config import ConfigError, RunConfig, build_config
from freeadv_fast.run import check_same_run, read_metrics

ANY_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12) | st.sampled_from(["8/255", "1e400", "1e-400", "0.1", "-1", "nan", "inf", "a/b", "1/0"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=2),
    max_leaves=4)
CONFIGS = st.dictionaries(st.sampled_from(RunConfig.keys()) | st.text(max_size=8), ANY_VALUE, max_size=5)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=CONFIGS)
def test_any_yaml_config_is_accepted_or_refused_by_name(tmp_path, values):
    """The invariant for settings from a file: a RunConfig or a ConfigError, nothing else."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(values))
    try:
        cfg = build_config(file=path)
    except ConfigError as exc:
        assert "\n" not in str(exc)
    else:
        assert isinstance(cfg, RunConfig) and 0 <= cfg.epsilon <= 1 and cfg.lr > 0


@pytest.mark.parametrize("text,expected", [
    ('lr: "0.1"', "lr must be a finite number, got '0.1'"),
    ("momentum: -1", "momentum must be in [0, 1)"),
    ("weight_decay: -1", "weight-decay must be >= 0"),
    ("milestones: [a]", "milestones must be positive integers"),
    ("nesterov: true\nmomentum: 0", "nesterov needs a momentum above 0"),
    ("1: 2", "keys must be setting names, got 1"),
    ("data: 123", "data must be a string"),
    ("out: [a, b]", "out must be a string"),
    ("workers: many", "workers must be an integer"),
    ("image_size: -5", "image-size must be a positive integer"),
    ("image_size: 0", "image-size must be a positive integer"),
    ("epsilon: 1e400", "too large for a float"),
    ("epsilon: '1e-400'", "rounds to 0"),
    ("synthetic_classes: 0", "synthetic-classes must be a positive integer"),
    ("synthetic_batches: 0", "synthetic-batches must be a positive integer"),
    ('out: ""', "out must not be empty"),
    ("seed: 18446744073709551616", "seed must be at most 4294967295"),  # stream seeds must fit torch's 64 bits
    ("dataset: digits\nimage_size: 64", "image-size and source-size apply to datasets whose loader resizes"),
    ("dataset: cifar10\nsource_size: 40", "cifar10 is held at one size"),
    ("dataset: imagenet\nepochs: 1\nphases: ['1:16:0']", "batch_size must be an integer >= 1, got 0"),
    # PyYAML keeps the last of two equal keys: a pasted-in line silently won
    ("lr: 0.1\nepochs: 2\nlr: 0.5", "key 'lr' is given twice (lines 1 and 3); keep one"),
    ("batch-size: 3\nbatch_size: 4", "batch-size and batch_size are the same setting"),
    # digits and synthetic read no folder: the run trained on them instead of the folder's dataset
    ("data: /tmp", "data /tmp: digits reads no data folder"),
    ("dataset: synthetic\ndata: /tmp", "synthetic reads no data folder"),
])
def test_the_reported_config_mistakes_are_named(tmp_path, text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        build_config(file=path)


def test_yaml_merge_keys_may_be_overridden_and_nested_duplicates_are_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: digits\n<<: {lr: 0.2, epochs: 1}\nlr: 0.3\n")  # overriding a merged key is merging
    cfg = build_config(file=path)
    assert (cfg.lr, cfg.epochs) == (0.3, 1)
    path.write_text("dataset: imagenet\nepochs: 1\nphases:\n  - {until: 1, image_size: 16, image_size: 32}\n")
    with pytest.raises(ConfigError, match="key 'image_size' is given twice"):
        build_config(file=path)


def test_a_binary_file_or_a_directory_as_config_is_named(tmp_path):
    (tmp_path / "bin.yaml").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="is not text"):
        build_config(file=tmp_path / "bin.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        build_config(file=tmp_path)


def test_a_partial_last_metrics_line_is_dropped_and_a_damaged_middle_one_is_named(tmp_path, capfd):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert read_metrics(path) == [{"step": 1}, {"step": 2}]
    assert "dropped its last line" in capfd.readouterr().err
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(Exception, match="line 2 is not a JSON record"):
        read_metrics(path)


def test_resuming_another_run_is_refused_naming_what_changed(tmp_path):
    saved = {**RunConfig(dataset="cifar10", data=str(tmp_path), batch_size=128).__dict__}
    check_same_run(saved, RunConfig(dataset="cifar10", data=str(tmp_path / "."), batch_size=128), "c.pt")
    with pytest.raises(ConfigError, match=r"batch-size 128 \(now 256\)"):
        check_same_run(saved, RunConfig(dataset="cifar10", data=str(tmp_path), batch_size=256), "c.pt")
    with pytest.raises(ConfigError, match="data"):
        check_same_run(saved, RunConfig(dataset="cifar10", data=str(tmp_path / "other"), batch_size=128), "c.pt")


def test_a_batch_larger_than_the_training_split_is_a_data_error():
    import torch

    from freeadv_fast.data.errors import DataError
    from freeadv_fast.data.tensors import TensorBatches
    with pytest.raises(DataError, match="has 5 images, fewer than one batch of 20: lower --batch-size"):
        TensorBatches(torch.zeros(5, 3, 4, 4), torch.zeros(5), 20, drop_last=True)


def run_cli(*args, module="freeadv_fast.train", timeout=120):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_refusal(result, expected):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]


def assert_refused_here(main, argv, capfd, expected):
    """A command's main run in this process: status 2 and one error line (an
    uncaught exception would fail the test, as a traceback would)."""
    capfd.readouterr()
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exc:
        status = exc.code
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert status == 2 and len(errors) == 1 and expected in errors[0], (status, err[-2000:])
    return err


@pytest.mark.parametrize("args,expected", [
    (["--out", "{file}"], "is a file, not a directory"),
    (["--out", "{file}/run"], "cannot be made"),
    (["--out", "{dangling}"], "is a symbolic link to nothing"),
    (["--out", "{loop}/run"], "loop is a symbolic link to nothing"),
    (["--out", "{checkpoints}"], "holds another run"),  # a checkpoint and nothing else is a run too
    (["--nproc", "2", "--sync-batchnorm"], "--sync-batchnorm needs GPUs"),
    (["--resume", "{tmp}"], "is a directory; give a checkpoint file in it"),
    (["--resume", "{file}"], "not a file torch.save wrote"),
    (["--out", ""], "out must not be empty"),
    (["--epsilon", "1e400"], "too large for a float"),
    (["--epsilon", "1e-400"], "rounds to 0"),
    # a step of 0: free training that is natural training, a robust accuracy that is the clean one
    (["--step-size", "0", "--out", "{tmp}/r"], "step size 0 with epsilon 0.15: the perturbation would never move"),
    (["--eval-step-size", "0", "--out", "{tmp}/r"], "eval step size 0 with epsilon 0.15"),
    (["--batch-size", "5000", "--out", "{tmp}/r"], "has 1348 images, fewer than one batch of 5000"),
    (["--data", "{tmp}"], "digits reads no data folder"),
    # the default --out is a new directory each time: it silently started a new run
    (["--resume", "auto"], "--resume auto continues the run in --out; give --out DIR"),
])
def test_train_refuses_in_one_line(tmp_path, capfd, args, expected):
    file = tmp_path / "a-file"
    file.write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nothing")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "checkpoint-last.pt").write_bytes(b"saved weights")
    args = [a.format(file=file, tmp=tmp_path, dangling=tmp_path / "dangling", loop=tmp_path / "loop",
                     checkpoints=tmp_path / "checkpoints") for a in args]
    from freeadv_fast.train import main  # in this process: a refusal costs no interpreter start
    assert_refused_here(main, ["--cpu", "digits", "--eval-every", "0", *args], capfd, expected)
    assert (tmp_path / "checkpoints" / "checkpoint-last.pt").read_bytes() == b"saved weights"


@pytest.mark.parametrize("env,expected", [
    # a RANK left in a shell made a silent rank 1 of 1 that wrote into another run's directory
    (dict(RANK="1"), "RANK is set in the environment but WORLD_SIZE is not"),
    (dict(RANK="0", WORLD_SIZE="0"), "the world size must be 1 or more"),
    (dict(RANK="2", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1"), "the rank in [0, world size)"),
    (dict(RANK="abc", WORLD_SIZE="1"), "RANK='abc' in the environment is not an integer"),
    (dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="x"), "LOCAL_RANK='x' in the environment is not an integer"),
    (dict(RANK="0", WORLD_SIZE="2"), "MASTER_ADDR or MASTER_PORT is not set"),
])
def test_a_broken_launch_environment_is_refused_in_one_line(tmp_path, capfd, monkeypatch, env, expected):
    from freeadv_fast.train import main
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "checkpoint-last.pt").write_bytes(b"another run's weights")
    assert_refused_here(main, ["--cpu", "digits", "--eval-every", "0", "--out", tmp_path / "r"], capfd, expected)
    assert (tmp_path / "r" / "checkpoint-last.pt").read_bytes() == b"another run's weights"


def test_a_phase_batch_the_processes_do_not_divide_is_refused_before_the_workers(tmp_path, capfd):
    from freeadv_fast.train import main
    assert_refused_here(main, ["--cpu", "--nproc", "2", "synthetic", "--arch", "small_cnn", "--epochs", "8",
                               "--schedule", "onecycle",
                               "--synthetic-batches", "2", "--eval-every", "0", "--batch-size", "8", "--phases",
                               "4:8:5,8:16", "--out", tmp_path / "r"], capfd, "batch size 5 is not divisible by the 2")


def test_resuming_with_another_attack_is_refused_and_other_changes_are_said(checkpoint, tmp_path, capfd):
    from freeadv_fast.train import main
    run = tmp_path / "run"
    shutil.copytree(checkpoint.parent, run)
    common = ["--cpu", "--preset", "digits-demo", "--method", "natural", "--epochs", "1", "--eval-every", "0",
              "--out", run, "--resume", "auto"]
    assert_refused_here(main, common + ["--epsilon", "0.2"], capfd, "was written by a different run: epsilon 0.15")
    saved = build_config(preset="digits-demo").to_dict()
    check_same_run(saved, build_config(preset="digits-demo", flags={"lr": 0.01}), run / "checkpoint-last.pt")
    assert "settings that differ from its run's: lr 0.05 -> 0.01" in capfd.readouterr().err


def test_images_too_small_for_the_architecture_are_refused_before_training(tmp_path, capfd):
    from freeadv_fast.train import main
    assert_refused_here(main, ["--cpu", "synthetic", "--arch", "small_cnn_bn", "--image-size", "4",
                               "--synthetic-batches", "1", "--eval-every", "0", "--out", tmp_path / "r"], capfd,
                        "4 px images are too small for small_cnn_bn")
    assert not (tmp_path / "r" / "checkpoint-last.pt").exists()


def test_a_failed_host_allocation_is_named_as_out_of_memory():
    from freeadv_fast.run import host_out_of_memory
    exc = RuntimeError("[enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 60000000000 bytes. Error code 12 (Cannot allocate memory)")
    assert host_out_of_memory(exc) == ("out of host memory: a tensor of 55.9 GiB was asked for; lower --batch-size "
                                       "or the image size")
    assert host_out_of_memory(RuntimeError("CUDA error")) is None


def test_checkpoints_that_are_not_ours_are_named(tmp_path):
    from freeadv_fast.checkpoint import CheckpointError, atomic_save, read_checkpoint
    for name, payload in [("list", [1, 2]), ("no-model", {"config": {}, "ranks": []}),
                          ("config-text", {"model": {}, "config": "lr: 0.1"})]:
        atomic_save(payload, tmp_path / f"{name}.pt")  # the real wrapper and checksum around a foreign payload
        with pytest.raises(CheckpointError, match="is not a freeadv_fast checkpoint"):
            read_checkpoint(tmp_path / f"{name}.pt")
    torch.save({"x": torch.nn.Linear(1, 1)}, tmp_path / "module.pt")  # a pickled object, not plain tensors
    with pytest.raises(CheckpointError, match="holds objects other than tensors") as info:
        read_checkpoint(tmp_path / "module.pt")
    assert "weights_only=False" not in str(info.value)  # torch's advice would run the file's code


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    r = run_cli("--cpu", "--preset", "digits-demo", "--method", "natural", "--epochs", "1", "--eval-every", "0",
                "--out", out, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return out / "checkpoint-last.pt"


@pytest.mark.parametrize("args,expected", [
    (["--epsilon=-0.1"], "--epsilon must be between 0 and 1"),
    (["--step-size=-1"], "--step-size must be between 0 and 1"),
    (["--epsilon", "1e400"], "too large for a float"),
    (["--json", "{dir}"], "is a directory, not a file"),
    (["--json", "{file}/x.json"], "is a file, not a directory"),
    (["--json", "{checkpoint}"], "is the checkpoint being evaluated; not overwriting it"),
    (["--json", "{file}"], "exists and is not a JSON results file"),
    (["--json", "{jsonl}"], "exists and is not a JSON results file"),  # a run's metrics.jsonl starts with {
    (["--step-size", "0"], "--step-size 0 with epsilon 0.15: the evaluation's attack would never move"),
    (["--nproc", "3"], "batch size 64 is not divisible by the 3 processes"),  # said once, not by each worker
    (["--seed", "99999999999999999999"], "seed must be at most"),
])
def test_eval_refuses_before_it_evaluates(checkpoint, tmp_path, capfd, args, expected):
    file = tmp_path / "a-file"
    file.write_text("x")
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text('{"step": 1}\n{"step": 2}\n')
    before = checkpoint.read_bytes()
    args = [a.format(dir=tmp_path, file=file, checkpoint=checkpoint, jsonl=jsonl) for a in args]
    from freeadv_fast.eval import main
    assert_refused_here(main, [checkpoint, "--cpu", *args], capfd, expected)
    assert checkpoint.read_bytes() == before and file.read_text() == "x"


def test_resuming_into_another_runs_directory_is_refused(checkpoint, tmp_path, capfd):
    from freeadv_fast.train import main
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.yaml").write_text("lr: 0.01\n")
    assert_refused_here(main, ["--cpu", "--preset", "digits-demo", "--method", "natural", "--epochs", "1",
                               "--eval-every", "0", "--resume", checkpoint, "--out", other], capfd,
                        "holds another run, which resuming")
    assert (other / "config.yaml").read_text() == "lr: 0.01\n"


def test_resuming_with_another_process_count_is_said_once(checkpoint, capfd):
    from freeadv_fast.train import main
    assert_refused_here(main, ["--cpu", "--nproc", "2", "--preset", "digits-demo", "--method", "natural", "--epochs",
                               "1", "--eval-every", "0", "--out", checkpoint.parent, "--resume", "auto"], capfd,
                        "was written by 1 process(es) but this run has 2")


def test_eval_refuses_a_checkpoint_with_non_finite_weights(checkpoint, tmp_path, capfd):
    from freeadv_fast.checkpoint import atomic_save, read_checkpoint
    from freeadv_fast.eval import main
    state = read_checkpoint(checkpoint)
    next(v for v in state["model"].values() if v.is_floating_point()).view(-1)[0] = float("nan")
    atomic_save(state, tmp_path / "nan.pt")
    assert_refused_here(main, [tmp_path / "nan.pt", "--cpu", "--limit", "8", "--steps", "1"], capfd,
                        "holds non-finite weights")


def test_eval_on_another_dataset_says_so_and_names_what_does_not_fit(checkpoint, capfd):
    from freeadv_fast.eval import main
    err = assert_refused_here(main, [checkpoint, "synthetic", "--cpu", "--limit", "8", "--steps", "1"], capfd,
                              "size mismatch for")  # torch's reason, not its headline ending in a colon
    assert "the checkpoint was trained on digits; evaluating it on synthetic" in err


def test_eval_writes_json_into_a_folder_it_makes(checkpoint, tmp_path):
    target = tmp_path / "new" / "folder" / "e.json"
    r = run_cli(checkpoint, "--cpu", "--limit", "8", "--steps", "1", "--json", target, module="freeadv_fast.eval")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(target.read_text())


# -- data files that pass the first checks -----------------------------------------------------------------------
def write_pickles(root, batch=None, meta=True, labels_key=b"labels"):
    import pickle

    import numpy as np
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    good = {b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), labels_key: [i % 10 for i in range(20)]}
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(d / f, "wb") as fh:
            pickle.dump(good if batch is None or f != "data_batch_1" else batch, fh, protocol=2)
    if meta is True:
        meta = {b"label_names": [f"c{i}".encode() for i in range(10)]}
    if meta is not None:
        with open(d / "batches.meta", "wb") as fh:
            pickle.dump(meta, fh, protocol=2)
    return root


def _cifar_cases():
    import numpy as np
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
    labels = [i % 10 for i in range(20)]
    return [
        ("labels-50-no-meta", {b"data": pixels, b"labels": [50] * 20}, None, "labels 50..50, outside 0..9"),
        ("a-list", [1, 2, 3], True, "holds a list, not the dict"),
        ("meta-without-names", None, {b"other": 1}, "no list of class names"),
        ("meta-with-a-str", None, {b"label_names": "abc"}, "no list of class names"),
        ("labels-2d", {b"data": pixels, b"labels": np.zeros((20, 2), dtype=np.int64)}, True, "labels of shape (20, 2)"),
        ("float-data", {b"data": pixels.astype(np.float32) / 255, b"labels": labels}, True, "images are float32"),
        ("int64-1000", {b"data": np.full((20, 3072), 1000, dtype=np.int64), b"labels": labels}, True,
         "pixel values 1000..1000"),
        # torchvision's in-memory layout, which reshaping would scramble: refused, not read as N x 3 x 32 x 32
        ("nhwc", {b"data": pixels.reshape(20, 32, 32, 3), b"labels": labels}, True, "transpose it to N x 3 x 32 x 32"),
        ("4d-odd", {b"data": pixels.reshape(20, 1, 3072, 1), b"labels": labels}, True, "images of shape (20, 1, 3072, 1)"),
    ]


@pytest.mark.parametrize("case", _cifar_cases(), ids=lambda c: c[0])
def test_malformed_cifar_pickles_are_refused_by_name(tmp_path, case):
    from freeadv_fast.data import cifar
    from freeadv_fast.data.errors import DataError
    _, batch, meta, expected = case
    write_pickles(tmp_path, batch=batch, meta=meta)
    with pytest.raises(DataError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        cifar.load_cifar(tmp_path, "cifar10", train=True)


def test_int16_pixels_within_range_are_converted_with_a_note(tmp_path, capfd):
    import numpy as np

    from freeadv_fast.data import cifar
    data = np.arange(20 * 3072).reshape(20, 3072) % 256
    write_pickles(tmp_path, batch={b"data": data.astype(np.int16), b"labels": [i % 10 for i in range(20)]})
    x, _, _ = cifar.load_cifar(tmp_path, "cifar10", train=True)
    assert x[:20].flatten().tolist()[:300] == data.flatten().tolist()[:300]
    assert "int16 pixels (all within 0..255) converted to uint8" in capfd.readouterr().err


def png_bytes(width, height, bit_depth=8, raw=b"\0"):
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def test_a_16_bit_png_is_scaled_to_8_bits_never_cut_to_its_low_byte(tmp_path):
    import numpy as np

    from freeadv_fast.data.folder import decode_image_folder
    values = np.full((32, 32, 3), 17038, dtype=">u2")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(png_bytes(32, 32, 16, b"".join(b"\0" + r.tobytes() for r in values)))
    x, _, _ = decode_image_folder(tmp_path, size=32)
    assert x.unique().tolist() == [round(17038 * 255 / 65535)]  # 66, not 17038 % 256 = 142


def test_a_decompression_bomb_is_named_by_the_loaders_and_the_checker(tmp_path):
    from freeadv_fast.data.folder import quick_check, scan_image_folder
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        (tmp_path / c / "ok.png").write_bytes(png_bytes(4, 4))
    bomb = tmp_path / "a" / "bomb.png"
    bomb.write_bytes(png_bytes(65000, 65000))
    assert "claims 65000x65000 pixels" in quick_check(str(bomb))
    _, samples, bad = scan_image_folder(tmp_path)
    assert [p for p, _ in bad] == [str(bomb)] and str(bomb) not in [p for p, _ in samples]
    r = subprocess.run([sys.executable, "-m", "freeadv_fast.data", "check", str(tmp_path)], capture_output=True,
                       text=True, timeout=120)
    assert "Traceback" not in r.stderr and "65000x65000" in r.stdout + r.stderr, (r.stdout, r.stderr)


def test_a_corrupt_gzip_and_an_empty_idx_file_are_named(tmp_path):
    import gzip

    import numpy as np

    from freeadv_fast.data import fashion_mnist
    from freeadv_fast.data.errors import DataError
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\0\0\x08\x03" + bytes(100))[:20] + b"garbage" * 10)
    with pytest.raises(DataError, match="unreadable"):
        fashion_mnist.read_idx(tmp_path / "bad.gz")
    names = fashion_mnist.FILES[True]
    images = np.zeros((0, 28, 28), dtype=np.uint8)
    for name, array in zip(names, (images, np.zeros(0, dtype=np.uint8))):
        header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
        (tmp_path / name).write_bytes(header + array.tobytes())
    with pytest.raises(DataError, match="holds no images"):
        fashion_mnist.load_fashion_mnist(tmp_path, train=True)


def test_tiny_imagenet_annotations_that_are_not_text_are_named(tmp_path):
    from freeadv_fast.data import tiny_imagenet
    from freeadv_fast.data.errors import DataError
    (tmp_path / "val" / "images").mkdir(parents=True)
    (tmp_path / "val" / "val_annotations.txt").write_bytes(bytes(range(128, 256)))
    with pytest.raises(DataError, match="not a text file"):
        tiny_imagenet.scan_val(tmp_path / "val", ["n01"])


def test_a_full_disk_mid_run_stops_in_one_line_keeping_the_last_checkpoint(tmp_path, monkeypatch, capfd):
    """Every fsync after the first checkpoint fails with ENOSPC, as on a disk that filled up mid-run."""
    import errno
    import os

    from freeadv_fast import train
    from freeadv_fast.checkpoint import read_checkpoint
    real_fsync, calls = os.fsync, []

    def filling_up(fd):
        calls.append(fd)
        if len(calls) > 2:  # the first checkpoint's file and folder went through
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", filling_up)
    out = tmp_path / "run"
    try:
        code = train.main(["--cpu", "--preset", "digits-demo", "--epochs", "8", "--eval-every", "0", "--out", str(out)])
    except SystemExit as stop:
        code = stop.code
    monkeypatch.undo()
    err = capfd.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "cannot write the run's files" in err and "No space left on device" in err
    assert f"the last good checkpoint, {out / 'checkpoint-last.pt'}, is kept" in err
    assert read_checkpoint(out / "checkpoint-last.pt")["epoch"] == 1


@pytest.mark.parametrize("during", ["final", "periodic"])
def test_sigterm_during_an_evaluation_stops_within_a_batch(tmp_path, during):
    import signal
    import time
    out = tmp_path / "run"
    (tmp_path / "c.yaml").write_text({"final": "final_eval_steps: [500]\neval_every: 0\n",
                                      "periodic": "eval_steps: 500\neval_samples: 449\neval_every: 1\n"}[during])
    epochs = {"final": 1, "periodic": 2}[during]
    proc = subprocess.Popen([sys.executable, "-m", "freeadv_fast.train", "--cpu", "--preset", "digits-demo",
                             "--method", "natural", "--epochs", str(epochs), "--config", str(tmp_path / "c.yaml"),
                             "--out", str(out)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines = []
    try:
        for line in proc.stderr:  # the pass summary comes right before the evaluation
            lines.append(line)
            if f"pass 1/{epochs}: loss" in line:
                break
        time.sleep(1.0)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        code = proc.wait(timeout=120)
    finally:
        proc.kill()
    assert code == 128 + signal.SIGTERM, "".join(lines) + rest
    assert time.monotonic() - sent < 60  # PGD-500 on 449 images would take minutes
    assert "Traceback" not in rest and not (out / "final.json").exists() and (out / "checkpoint-last.pt").exists()
    if during == "final":
        assert "during the final evaluation" in rest and "python -m freeadv_fast.eval" in rest
        assert f"plus --resume auto, and --out {out}, for the run's own final evaluation and final.json" in rest
    else:
        assert "the evaluation after pass 1 was stopped" in rest and "--resume auto" in rest


def test_an_evaluation_asked_to_stop_raises_between_batches():
    import torch

    from freeadv_fast.evaluate import EvaluationStopped, evaluate
    from helpers import small_cnn
    batches = [(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))] * 3
    with pytest.raises(EvaluationStopped):
        evaluate(small_cnn(), batches, mean=0.5, std=0.5, epsilon=0.1, step_size=0.05, should_stop=lambda: True)


# -- generated damage to every file format ------------------------------------------------------------------------
def _mutate(data: bytes, edits) -> bytes:
    """Overwrites, cuts or extends ``data`` as Hypothesis says."""
    out = bytearray(data)
    for kind, where, value in edits:
        i = where % (len(out) + 1)
        if kind == "set" and out:
            out[i % len(out)] = value
        elif kind == "cut":
            del out[i:]
        else:
            out[i:i] = bytes([value]) * 7
    return bytes(out)


EDITS = st.lists(st.tuples(st.sampled_from(["set", "cut", "grow"]), st.integers(0, 1 << 20), st.integers(0, 255)),
                 min_size=1, max_size=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=EDITS, which=st.sampled_from(["data_batch_1", "batches.meta"]))
def test_damaged_cifar_pickles_load_or_are_refused_by_name(tmp_path_factory, edits, which):
    from freeadv_fast.data import cifar
    from freeadv_fast.data.errors import DataError
    root = write_pickles(tmp_path_factory.mktemp("c"))
    path = root / "cifar-10-batches-py" / which
    path.write_bytes(_mutate(path.read_bytes(), edits))
    try:
        x, y, _ = cifar.load_cifar(root, "cifar10", train=True)
    except DataError as exc:
        assert "\n" not in str(exc)
    else:
        assert x.dtype.is_floating_point is False and int(y.max()) < 10 and len(x) == len(y)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=EDITS, gz=st.booleans())
def test_damaged_idx_files_load_or_are_refused_by_name(tmp_path_factory, edits, gz):
    import gzip

    import numpy as np

    from freeadv_fast.data import fashion_mnist
    from freeadv_fast.data.errors import DataError
    root = tmp_path_factory.mktemp("f")
    arrays = (np.zeros((3, 28, 28), dtype=np.uint8), np.array([1, 2, 3], dtype=np.uint8))
    for i, (name, array) in enumerate(zip(fashion_mnist.FILES[True], arrays)):
        raw = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape) + array.tobytes()
        if gz:
            raw = gzip.compress(raw)
        (root / (name + (".gz" if gz else ""))).write_bytes(_mutate(raw, edits) if i == 0 else raw)
    try:
        x, y = fashion_mnist.load_fashion_mnist(root, train=True)
    except DataError as exc:
        assert "\n" not in str(exc)
    else:
        assert x.shape[1:] == (1, 28, 28) and len(x) == len(y)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=EDITS, png=st.booleans())
def test_damaged_images_decode_or_are_refused_by_name(tmp_path_factory, edits, png):
    import io

    from PIL import Image

    from freeadv_fast.data.errors import DataError
    from freeadv_fast.data.folder import decode_image_folder, full_check
    root = tmp_path_factory.mktemp("i")
    (root / "a").mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(buf, format="PNG" if png else "JPEG")
    path = root / "a" / ("x.png" if png else "x.jpg")
    path.write_bytes(_mutate(buf.getvalue(), edits))
    why = full_check(str(path))
    assert why is None or "\n" not in why
    try:
        x, _, _ = decode_image_folder(root, size=32)
    except DataError as exc:
        assert "\n" not in str(exc)
    else:
        assert x.shape == (1, 3, 32, 32)


ODD_PATHS = st.text(st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
    ["", ".", "..", "/", "/dev/null", "/proc/self", "a\0b", "x" * 300, "~", "-", "a\nb", "/etc/passwd/x"])


@settings(max_examples=200, deadline=None)
@given(path=ODD_PATHS)
def test_odd_paths_are_used_or_refused_by_name(path):
    """Output folders, files and data folders from any string: usable, or one named refusal."""
    from freeadv_fast.cli import check_writable_dir, check_writable_file
    from freeadv_fast.data import cifar
    from freeadv_fast.data.errors import DataError
    for check in (lambda: check_writable_dir(path, "--out"), lambda: check_writable_file(path, "--json")):
        try:
            check()
        except ConfigError as exc:
            assert "\n" not in str(exc).replace(repr(path), "")
    with pytest.raises(DataError):
        cifar.find_root(path or ".", "cifar10")


def test_ctrl_c_during_start_up_is_a_quiet_exit(tmp_path):
    """SIGINT once the command has printed its configuration, while data and model are being built."""
    import signal
    proc = subprocess.Popen([sys.executable, "-m", "freeadv_fast.train", "--cpu", "digits", "--out",
                             str(tmp_path / "run")], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if line.startswith("configuration"):
                break
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        code = proc.wait(timeout=120)
    finally:
        proc.kill()
    assert "Traceback" not in rest, rest[-2000:]
    # interrupted before training (130), or training had begun and stopped at a batch with a checkpoint
    assert code == 130 and ("interrupted" in rest or "stopped by SIGINT" in rest), (code, rest[-2000:])


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only bind mount (needs root, as in CI); skipped where mounting is not allowed."""
    src, mnt = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    mnt.mkdir()
    if subprocess.run(["mount", "--bind", str(src), str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here (not root?)")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(mnt)], capture_output=True).returncode:
            pytest.skip("cannot remount read-only here")
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_out_on_a_read_only_filesystem_is_refused_before_the_work(read_only_dir):
    assert_one_line_refusal(run_cli("--cpu", "digits", "--out", read_only_dir / "run"), "is not writable")


def test_resume_auto_with_another_batch_size_is_refused_before_any_work(checkpoint):
    r = run_cli("--cpu", "--preset", "digits-demo", "--method", "natural", "--epochs", "1", "--eval-every", "0",
                "--batch-size", "32", "--out", checkpoint.parent, "--resume", "auto")
    assert_one_line_refusal(r, "batch-size 64 (now 32)")


def test_eval_refuses_an_image_folder_whose_classes_are_not_the_checkpoints(tmp_path, capfd):
    """Labels follow sorted class names: the same images under other folder names would be scored against
    other labels, and eval reported the accuracy."""
    from test_data import write_folder

    from freeadv_fast.eval import main as evaluate_main
    from freeadv_fast.train import main as train_main
    for split in ("train", "val"):
        write_folder(tmp_path / "abc" / split, classes=("a", "b", "c"), per_class=2)
        write_folder(tmp_path / "abd" / split, classes=("a", "b", "d"), per_class=2)
    assert train_main(["--cpu", "imagenet", "--data", str(tmp_path / "abc"), "--arch", "small_cnn", "--image-size",
                       "16", "--method", "natural", "--epochs", "1", "--batch-size", "3", "--loader", "torch",
                       "--workers", "0", "--eval-every", "0", "--final-eval-steps", "1",
                       "--out", str(tmp_path / "r")]) == 0
    assert_refused_here(evaluate_main, [tmp_path / "r" / "checkpoint-last.pt", "--cpu", "--data", tmp_path / "abd",
                                        "--steps", "1"], capfd, "label 2 was 'c', here it is 'd'")
    for split in ("train", "val"):  # the same data folder, a class renamed: resuming would relabel it
        (tmp_path / "abc" / split / "c").rename(tmp_path / "abc" / split / "d")
    assert_refused_here(train_main, ["--cpu", "imagenet", "--data", tmp_path / "abc", "--arch", "small_cnn",
                                     "--image-size", "16", "--method", "natural", "--epochs", "1", "--batch-size",
                                     "3", "--loader", "torch", "--workers", "0", "--eval-every", "0",
                                     "--final-eval-steps", "1", "--out", tmp_path / "r", "--resume", "auto"], capfd,
                        "was trained on other class folders")


@pytest.mark.parametrize("args,expected", [
    # the embedded default (no DATASET) trained digits, twice, whatever these said
    (["--data", "{tmp}/data"], "data {tmp}/data: digits reads no data folder"),
    (["--method", "pgd"], "the embedded default compares natural and free training, so --method pgd would be "
                          "ignored"),
    (["--resume", "auto"], "--resume auto continues the run in --out"),
])
def test_the_embedded_default_refuses_settings_it_would_ignore(tmp_path, capfd, args, expected):
    from freeadv_fast.train import main
    args = [a.format(tmp=tmp_path) for a in args]
    assert_refused_here(main, ["--cpu", *args], capfd, expected.format(tmp=tmp_path))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("out", ["data/train/run", "data/val", "data/val/x/y"])
def test_an_out_inside_the_datas_split_folders_is_refused(tmp_path, capfd, out):
    """A run directory in train/ became a class folder without images: the
    next run and every eval of the first one stopped on the dataset."""
    from freeadv_fast.train import main
    for split in ("train", "val"):
        (tmp_path / "data" / split / "a").mkdir(parents=True)
    assert_refused_here(main, ["--cpu", "imagenet", "--data", tmp_path / "data", "--out", tmp_path / out], capfd,
                        "is inside the data's")
    assert sorted(p.name for p in (tmp_path / "data" / "train").iterdir()) == ["a"]


def test_an_out_beside_the_data_splits_is_not_refused():
    from freeadv_fast.train import check_out_outside_data
    check_out_outside_data(Path("/data/imagenet/runs/x"), "/data/imagenet")
    check_out_outside_data(Path("/data/imagenet"), "/data/imagenet")
    check_out_outside_data(Path("/data/imagenet/training"), "/data/imagenet")


def test_a_second_start_into_a_run_in_progress_is_refused(tmp_path, capfd):
    """Two processes training into one --out (the command started twice, a
    --resume auto in another terminal) interleaved checkpoints and metrics."""
    from freeadv_fast.train import main
    out = tmp_path / "r"
    out.mkdir()
    # the first run's rank 0 holds this lock while it trains
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(out / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
                               "os.write(fd, b'4242\\n'); fcntl.lockf(fd, fcntl.LOCK_EX)\n"
                               "print('held', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert_refused_here(main, ["--cpu", "digits", "--method", "natural", "--epochs", "1", "--eval-every", "0",
                                   "--out", out], capfd, f"{out} is in use by another training process (pid 4242)")
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_resuming_a_run_stopped_in_its_final_evaluation_says_so_and_finishes(checkpoint, tmp_path, capfd):
    from freeadv_fast.train import main
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(checkpoint, run)  # a finished training whose final evaluation was stopped
    status = main(["--cpu", "--preset", "digits-demo", "--method", "natural", "--epochs", "1", "--eval-every", "0",
                   "--final-eval-samples", "8", "--final-eval-steps", "1", "--out", str(run), "--resume", "auto"])
    err = capfd.readouterr().err
    assert status == 0, err[-2000:]
    assert "its training is complete (1 passes, step 22); running the final evaluation" in err  # was "pass 2/1"
    assert (run / "final.json").exists() and (run / "checkpoint-best.pt").exists()


def test_eval_on_another_dataset_does_not_read_the_training_runs_folder(checkpoint, tmp_path, capfd):
    from freeadv_fast.checkpoint import atomic_save, read_checkpoint
    from freeadv_fast.eval import main
    state = read_checkpoint(checkpoint)
    state["config"].update(dataset="cifar10", data=str(tmp_path / "cifar"))
    atomic_save(state, tmp_path / "cifar.pt")
    assert_refused_here(main, [tmp_path / "cifar.pt", "imagenet", "--cpu"], capfd, "imagenet needs --data DIR")


def test_eval_runs_each_step_count_once(checkpoint, capfd):
    from freeadv_fast.eval import parser, settings
    job = settings(parser().parse_args([str(checkpoint), "--steps", "5,5,1,5"]))
    assert job["steps"] == [5, 1]  # pgd-5 ran twice, the second result replacing the first
    assert "--steps 5,5,1,5 names a step count twice; running 5,1" in capfd.readouterr().err
    assert build_config(flags={"final_eval_steps": [20, 20]}).final_eval_steps == [20]


@pytest.mark.skipif(torch.cuda.is_available(), reason="hides the GPUs only where torch has not seen them")
def test_gpus_hidden_by_cuda_visible_devices_are_named(monkeypatch, capfd):
    from freeadv_fast.train import main
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert_refused_here(main, ["--gpus", "1", "digits"], capfd,
                        "this machine has 0 GPU(s) visible to this process (CUDA_VISIBLE_DEVICES='')")


def test_resuming_an_older_checkpoint_into_its_own_run_is_refused(checkpoint, tmp_path, capfd):
    """Its first checkpoint replaced the run's newer checkpoint-last.pt, the second the .prev that kept it."""
    from freeadv_fast.checkpoint import atomic_save, read_checkpoint
    from freeadv_fast.train import main
    run = tmp_path / "run"
    shutil.copytree(checkpoint.parent, run)
    older = read_checkpoint(checkpoint)
    older.update(step=10, batch_in_epoch=10, epoch=0)  # a best checkpoint from mid-run
    atomic_save(older, run / "checkpoint-best.pt", keep_previous=False)
    before = (run / "checkpoint-last.pt").read_bytes()
    assert_refused_here(main, ["--cpu", "--preset", "digits-demo", "--method", "natural", "--epochs", "1",
                               "--eval-every", "0", "--out", run, "--resume", run / "checkpoint-best.pt"], capfd,
                        "(step 10) is older than")
    assert (run / "checkpoint-last.pt").read_bytes() == before


def test_resume_auto_into_a_finished_run_without_its_last_checkpoint_is_refused(checkpoint, tmp_path, capfd):
    """A run whose checkpoint-last.pt was deleted to save space: starting
    afresh there replaced its final.json and appended to its metrics."""
    from freeadv_fast.train import main
    run = tmp_path / "run"
    run.mkdir()
    for name in ("final.json", "metrics.jsonl"):
        shutil.copyfile(checkpoint.parent / name, run / name)
    before = (run / "final.json").read_bytes()
    assert_refused_here(main, ["--cpu", "--preset", "digits-demo", "--method", "natural", "--epochs", "1",
                               "--eval-every", "0", "--out", run, "--resume", "auto"], capfd,
                        "holds a run's results (final.json) but no checkpoint-last.pt")
    assert (run / "final.json").read_bytes() == before


def test_a_finished_checkpoint_resumed_into_a_new_out_is_evaluated_and_kept_there(checkpoint, tmp_path):
    out = tmp_path / "again"  # no pass is left to train: it failed copying a checkpoint-last.pt never written
    r = run_cli("--cpu", "--preset", "digits-demo", "--method", "natural", "--epochs", "1", "--eval-every", "0",
                "--final-eval-samples", "16", "--resume", checkpoint, "--out", out, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "final.json").is_file() and (out / "checkpoint-last.pt").is_file()
    assert (out / "checkpoint-best.pt").is_file()


def test_under_torchrun_a_process_count_flag_is_refused(tmp_path, capfd, monkeypatch):
    from freeadv_fast.train import main
    monkeypatch.setenv("RANK", "0")  # a leftover environment: --nproc 2 trained one process, without a word
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert_refused_here(main, ["--cpu", "--nproc", "2", "digits", "--out", tmp_path / "r"], capfd,
                        "--nproc 2: RANK and WORLD_SIZE are set")


def test_paths_are_expanded_and_a_data_folder_saved_whole(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = build_config(dataset="cifar10", flags={"data": "cifar", "out": "~/runs/x"})
    # '~' made a folder named '~' here; a relative data folder named another one when resumed from elsewhere
    assert cfg.out == str(Path.home() / "runs" / "x") and cfg.data == str(tmp_path / "cifar")
    with pytest.raises(ConfigError, match="final-eval-steps must name at least one step count"):
        build_config(dataset="digits", flags={"final_eval_steps": []})


def test_resuming_a_pgd_run_with_other_attack_steps_is_refused(tmp_path):
    pgd = build_config(dataset="digits", flags={"method": "pgd", "pgd_steps": 3}).to_dict()
    with pytest.raises(ConfigError, match="pgd-steps 3"):
        check_same_run(pgd, build_config(dataset="digits", flags={"method": "pgd", "pgd_steps": 7}), "ck.pt")
    free = build_config(dataset="digits", flags={"pgd_steps": 3}).to_dict()  # free training never reads it
    check_same_run(free, build_config(dataset="digits", flags={"pgd_steps": 7}), "ck.pt")


def test_ctrl_c_during_a_data_check_is_a_quiet_exit(tmp_path):
    """A terminal's Ctrl-C reaches the checker and its decoding processes:
    each printed a traceback, and the queued files were still decoded."""
    import signal
    from test_data import write_folder
    write_folder(tmp_path / "data" / "train", classes=("a",), per_class=40)
    slow = ("import sys, time\nimport freeadv_fast.data.__main__ as m\nfrom freeadv_fast.data import folder\n"
            "def full_check(p):\n    time.sleep(0.5)\n    return folder.full_check(p)\n"
            "m.full_check = full_check\nsys.exit(m.main(sys.argv[1:]))\n")
    proc = subprocess.Popen([sys.executable, "-c", slow, "check", str(tmp_path / "data"), "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in proc.stdout:
            if "decoding all of them" in line:
                break
        time.sleep(1)
        os.killpg(proc.pid, signal.SIGINT)  # the whole group, as a terminal does
        err = proc.stderr.read()
        code = proc.wait(timeout=60)
    finally:
        proc.kill()
    assert code == 130 and "Traceback" not in err and "interrupted" in err, (code, err[-2000:])


def test_odd_spellings_of_the_environment_and_a_pipe_as_checkpoint_are_named(tmp_path, monkeypatch):
    import logging
    from freeadv_fast import messages
    from freeadv_fast.checkpoint import CheckpointError, read_checkpoint
    from freeadv_fast.run import fault_injection
    info = logging.LogRecord("freeadv_fast", logging.INFO, "", 0, "said", None, None)
    monkeypatch.setenv("RANK", "00")  # rank 0 all the same: it printed nothing of its run
    assert messages._rank0_or_warning(info)
    monkeypatch.setenv("RANK", "1")
    assert not messages._rank0_or_warning(info)
    monkeypatch.setenv("FREEADV_FAULT_INJECT", "x")
    with pytest.raises(ConfigError, match="FREEADV_FAULT_INJECT='x' is not RANK:STEP"):
        fault_injection(0)
    os.mkfifo(tmp_path / "fifo.pt")
    with pytest.raises(CheckpointError, match="is a device or a pipe, not a file"):  # it "did not exist"
        read_checkpoint(tmp_path / "fifo.pt")
