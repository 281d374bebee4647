"""bench/compare.py end to end on a tiny CIFAR image folder: every method,
the JSON's fields, the table and plot beside it, and one-line errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_datasets import write_cifar_folders

ROOT = Path(__file__).resolve().parents[1]


def compare(*args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "bench" / "compare.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def run_tiny(tmp_path, device="cpu", *extra):
    data = tmp_path / "cifar"
    write_cifar_folders(data, per_class=(6, 2))
    out = tmp_path / "out" / "cmp.json"
    run = compare("--data", data, "--device", device, "--epochs", 2, "--train-subset", 40, "--batch-size", 20,
                  "--arch", "small_cnn_bn", "--eval-samples", 20, "--eval-steps", "2,3", "--json", out, *extra)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text()), out


def test_every_method_is_trained_timed_and_attacked_alike(tmp_path):
    result, out = run_tiny(tmp_path, "cpu", "--free-lr", "0.05")
    meta, rows = result["meta"], {r["method"]: r for r in result["compare"]}
    assert [r["lr"] for r in rows.values()] == [0.2, 0.05, 0.2, 0.2] and meta["free_lr"] == 0.05
    assert list(rows) == ["natural", "free", "pgd", "fast"]
    assert meta["train_images"] == 40 and meta["epochs_equivalent"] == 2 and meta["device_type"] == "cpu"
    assert meta["git_commit"] and meta["command"] and meta["data"] == "CIFAR-10"
    assert rows["natural"]["passes"] == rows["pgd"]["passes"] == rows["fast"]["passes"] == 2
    assert rows["free"]["passes"] == 1 and rows["free"]["replays"] == 8  # ceil(2 / 8) passes of 8 replays
    assert rows["free"]["optimizer_steps"] == 8 * 2 and rows["natural"]["optimizer_steps"] == 2 * 2
    assert [rows[m]["label"] for m in rows] == ["natural", "free-8", "PGD-7", "FGSM-RS"]
    for r in rows.values():
        e = r["eval"]
        assert r["train_seconds"] > 0 and r["images_per_s"] > 0 and e["samples"] == 20
        for key in ("clean_top1", "pgd-2", "pgd-3", "cw-2", "cw-3"):
            lo, hi = e[key + "_ci95"]
            assert 0 <= lo <= e[key] <= hi <= 1
    assert set(result["summary"]) == {"free_time_over_pgd_time", "free_minus_pgd_robust",
                                      "free_time_over_natural_time", "free_minus_natural_robust"}
    table = out.with_suffix(".md").read_text()
    assert "| PGD-7 |" in table and "PGD-2" in table and "CW-3" in table
    assert out.with_suffix(".png").stat().st_size > 1000


def test_mistakes_end_with_one_line(tmp_path):
    run = compare("--data", tmp_path / "nowhere", "--json", tmp_path / "x.json")
    assert run.returncode == 2 and "no such directory" in run.stderr and "Traceback" not in run.stderr
    run = compare("--data", tmp_path, "--methods", "natural,magic")
    assert run.returncode == 2 and "unknown method(s) magic" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.gpu
def test_bf16_channels_last_comparison_on_the_gpu(tmp_path):
    result, _ = run_tiny(tmp_path, "cuda", "--methods", "natural,free")
    assert result["meta"]["precision"] == "bf16" and result["meta"]["device_type"] == "cuda"
    assert torch.cuda.is_available()
