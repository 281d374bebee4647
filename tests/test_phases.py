"""Progressive resizing (freeadv_fast/phases.py): the phase list, the LR per
phase, a run through its phases, resume inside a phase, and the fast ImageNet
presets walked through at toy sizes on CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from freeadv_fast import train
from freeadv_fast.checkpoint import read_checkpoint
from freeadv_fast.config import ConfigError, build_config
from freeadv_fast.phases import Phase, PhaseError, parse, pass_ends, phase_of
from freeadv_fast.scheduler import build_schedule
from test_data import write_folder


def test_phases_from_strings_and_mappings():
    phases = parse(["6:128:512:160", {"until": 12, "image_size": 224}, "15:288:128"], epochs=15, batch_size=256)
    assert phases == [Phase(6.0, 128, 512, 160), Phase(12.0, 224, 256, None), Phase(15.0, 288, 128, None)]
    assert [p.text() for p in phases] == ["6:128:512:160", "12:224:256", "15:288:128"]
    assert pass_ends(phases, 4) == [2, 3, 4] and pass_ends(phases, 1) == [6, 12, 15]
    assert [phase_of([2, 3, 4], done) for done in range(5)] == [0, 0, 1, 2, 2]


@pytest.mark.parametrize("items,message", [
    (["6:128", "6:224"], "does not come after"),
    (["6:128", "12:224"], "ends at epoch 12, but the run has 15"),
    (["15:128:64:100"], "source_size 100 is smaller than its image_size 128"),
    (["15:x"], "numbers"),
    (["15"], "UNTIL:SIZE"),
    ([{"until": 15, "image_size": 64, "crop": 1}], "unknown key"),
    ([{"until": 15, "image_size": 0}], "image_size must be an integer >= 8"),
    (["0:64"], "until must be a positive number"),
    ("15:64", "must be a list"),
])
def test_bad_phase_lists_are_named(items, message):
    with pytest.raises(PhaseError, match=message):
        parse(items, epochs=15, batch_size=256)


def test_the_config_checks_phases_against_the_method_dataset_and_schedule():
    base = dict(dataset="synthetic", schedule="onecycle", epochs=6)
    assert build_config(flags={**base, "phases": ["2:16", "6:32:8"]}).phases == ["2:16:256", "6:32:8"]
    for flags, message in [
        ({**base, "dataset": "cifar10", "epochs": 205, "phases": ["205:32"]}, "cifar10 is held at one image size"),
        ({**base, "schedule": "step", "phases": ["6:32"]}, "step schedule"),
        ({**base, "image_size": 64, "phases": ["6:32"]}, "leave out image-size"),
        ({**base, "method": "free", "replays": 4, "phases": ["2:16", "3:24", "6:32"]}, "phase 2 .* gets no pass"),
    ]:
        with pytest.raises(ConfigError, match=message):
            build_config(flags=flags)


def test_the_lr_of_each_phase_is_scaled_by_its_batch():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = build_schedule("constant", opt, steps_per_pass=10, passes=1, phase_starts=(0, 4, 7),
                           phase_scales=(1.0, 2.0, 0.5))
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1] * 4 + [0.2] * 3 + [0.05] * 3)


PHASED = ["synthetic", "--cpu", "--arch", "small_cnn", "--method", "free", "--replays", "2", "--epochs", "6",
          "--phases", "2:16:8,4:24:8,6:32:4", "--batch-size", "8", "--lr", "0.05", "--schedule", "constant",
          "--synthetic-classes", "10", "--synthetic-batches", "3", "--log-every", "1", "--checkpoint-every", "1",
          "--eval-samples", "8", "--eval-steps", "1", "--final-eval-steps", "1", "--final-eval-samples", "8"]


def records(out: Path):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_phased_run_trains_each_phase_at_its_size_batch_and_lr(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(PHASED + ["--out", str(out)]) == 0, capsys.readouterr().err[-2000:]
    err = capsys.readouterr().err
    assert "phase 1/3: 16 px, batch 8, passes 1-1" in err and "phase 3/3: 32 px, batch 4, passes 3-3" in err
    logs = [r for r in records(out) if r["type"] == "train"]
    assert {(r["phase"], r["image_size"], r["batch_size"]) for r in logs} == {(1, 16, 8), (2, 24, 8), (3, 32, 4)}
    # a record's lr is its last step's; phase 3 (half the batch: half the LR) starts after 2 passes x 3 x 2 steps
    assert all(r["lr"] == pytest.approx(0.025 if r["step"] > 12 else 0.05) for r in logs)
    assert {r["step"] for r in logs} >= {10, 12, 14}
    assert all("image_size" in r and "batch_size" in r for r in records(out))
    delta = read_checkpoint(out / "checkpoint-last.pt")["ranks"][0]["delta"]
    assert delta.shape == (4, 3, 32, 32)  # restarted at the new size, not carried over


def test_resuming_inside_a_phase_gives_the_uninterrupted_run(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert train.main(PHASED + ["--out", str(full)]) == 0
    # the batch reaching step 9 of 18 (step 10: 2 replays a batch) is inside phase 2 (pass 2: steps 7-12)
    env = {**os.environ, "FREEADV_FAULT_INJECT": "0:9"}
    killed = subprocess.run([sys.executable, "-m", "freeadv_fast.train", *PHASED, "--out", str(cut)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0 and "kills itself at step 10" in killed.stderr
    assert train.main(PHASED + ["--out", str(cut), "--resume", "auto"]) == 0
    a, b = read_checkpoint(full / "checkpoint-last.pt"), read_checkpoint(cut / "checkpoint-last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["ranks"][0]["delta"], b["ranks"][0]["delta"])


@pytest.fixture(scope="module")
def small_imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    write_folder(root / "train", classes=("a", "b"), per_class=6)
    write_folder(root / "val", classes=("a", "b"), per_class=2, seed=1)
    return root


@pytest.mark.parametrize("preset", ["imagenet-fast-free4-eps2", "imagenet-fast-free4-eps4",
                                    "imagenet-fast-fgsm-eps2", "imagenet-fast-fgsm-eps4"])
def test_each_fast_imagenet_preset_walks_its_three_phases_at_toy_size(preset, small_imagenet, tmp_path, capsys):
    out = tmp_path / "run"
    # the preset's phases (128/160, 224, 288 px) scaled down; everything else is the preset's
    status = train.main(["imagenet", "--preset", preset, "--data", str(small_imagenet), "--cpu", "--arch",
                         "small_cnn", "--phases", "6:24:4:32,12:32:4,15:40:2", "--batch-size", "4", "--loader",
                         "torch", "--workers", "0", "--eval-every", "0", "--final-eval-steps", "1",
                         "--final-eval-samples", "4", "--log-every", "1", "--out", str(out)])
    assert status == 0, capsys.readouterr().err[-2000:]
    sizes = {(r["phase"], r["image_size"], r["batch_size"]) for r in records(out) if r["type"] == "train"}
    assert sizes == {(1, 24, 4), (2, 32, 4), (3, 40, 2)}
    assert (out / "final.json").exists()


def test_running_out_of_gpu_memory_is_one_line_naming_the_phase_and_batch(tmp_path, monkeypatch, capsys):
    """What a CUDA out-of-memory error becomes (the GPU test makes a real one)."""
    from freeadv_fast import FreeAdversarialTrainer
    real = FreeAdversarialTrainer.train_batch

    def runs_out_in_phase_2(self, x, y):
        if x.shape[-1] == 24 and self.step >= 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total "
                                         "capacity of 79.19 GiB of which 1.21 GiB is free.")
        return real(self, x, y)
    monkeypatch.setattr(FreeAdversarialTrainer, "train_batch", runs_out_in_phase_2)
    out = tmp_path / "run"
    assert train.main(PHASED + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "out of GPU memory" in line]
    assert len(lines) == 1 and "Traceback" not in err
    assert "phase 2/3: 24 px images, batch 8 per GPU): a step asked for 2.50 GiB" in lines[0]
    assert "Lower that phase's batch in --phases" in lines[0] and "checkpoint-last.pt, is kept" in lines[0]
    assert read_checkpoint(out / "checkpoint-last.pt")["step"] >= 6  # the last checkpoint survives


def test_a_decoding_process_out_of_gpu_memory_is_named_as_such(tmp_path):
    """The nvjpeg loader's decoding processes hold GPU memory too: their OOM,
    re-raised by the DataLoader, points at --decode-processes, not the step."""
    from freeadv_fast.config import build_config
    from freeadv_fast.run import out_of_memory
    cfg = build_config(dataset="imagenet", flags={"batch_size": 64, "image_size": 128, "out": str(tmp_path)})
    exc = torch.OutOfMemoryError("Caught OutOfMemoryError in DataLoader worker process 1.\nOriginal Traceback "
                                 "(most recent call last):\n  ...\ntorch.OutOfMemoryError: CUDA out of memory. "
                                 "Tried to allocate 96.00 MiB.")
    text = str(out_of_memory(exc, cfg, cfg, 0, 1, 1, torch.device("cpu")))
    assert "128 px images, batch 64 per GPU): a decoding process asked for 96.00 MiB" in text
    assert "Lower --decode-processes" in text and "\n" not in text
