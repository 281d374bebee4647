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
    run = compare("--data", data, "--device", device, "--train-subset", 40, "--batch-size", 20,
                  "--arch", "small_cnn_bn", "--eval-samples", 20, "--eval-steps", "2,3", "--restart-steps", 2,
                  "--restarts", 2, "--json", out, *extra)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text()), out


def test_every_method_is_trained_timed_and_attacked_alike(tmp_path):
    result, out = run_tiny(tmp_path, "cpu", "--recipe", "equal-steps", "--epochs", 2, "--free-lr", "0.05")
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
        assert r["group"] == "equal-steps" and r["config"]["method"] == r["method"]
        assert r["config"]["final_eval_samples"] == 20 and r["config"]["final_eval_steps"] == [2, 3]
        for key in ("clean_top1", "pgd-2", "pgd-3", "cw-2", "cw-3", "pgd-2x2"):
            lo, hi = e[key + "_ci95"]
            assert 0 <= lo <= e[key] <= hi <= 1
    assert set(result["summary"]) == {"free_time_over_pgd_time", "free_minus_pgd_robust",
                                      "free_time_over_natural_time", "free_minus_natural_robust",
                                      "fast_time_over_free_time", "fast_minus_free_robust"}
    table = out.with_suffix(".md").read_text()
    assert "| PGD-7 |" in table and "PGD-2" in table and "CW-3" in table
    assert out.with_suffix(".png").stat().st_size > 1000


def test_the_fast_at_recipe_the_m_sweep_and_the_frontier_rows(tmp_path):
    """Each method at its own recipe (scaled down), free-m at several m on one
    budget, each method at three budgets; every row says what it trained."""
    result, out = run_tiny(tmp_path, "cpu", "--methods", "natural,free,fast", "--sweep-replays", "2,4", "--frontier",
                           "--budget-scale", "0.1", "--eval-steps", "1", "--eval-samples", 10)
    rows = result["compare"]
    recipe = {r["method"]: r for r in rows if r["group"] == "fast-at"}
    assert not {"lr", "free_lr", "epochs_equivalent"} & set(result["meta"])  # each row's own, not the run's
    # the recipes' peak LRs are for batch 128: at batch 20, 20/128 of them
    assert recipe["free"]["passes"] == 1 and recipe["free"]["replays"] == 8
    assert recipe["free"]["lr"] == pytest.approx(0.04 * 20 / 128)
    assert recipe["free"]["pixel_mode"] == recipe["fast"]["pixel_mode"] == "project"  # each row its own mode
    assert recipe["natural"]["pixel_mode"] is None
    assert recipe["natural"]["epochs_equivalent"] == 1.5 and recipe["natural"]["passes"] == 2
    assert abs(recipe["fast"]["step_size"] - 10 / 255) < 1e-9 and recipe["fast"]["lr"] == pytest.approx(0.2 * 20 / 128)
    sweep = [r for r in rows if r["group"] == "sweep"]  # 80 x 0.1 epochs-equivalent for every m
    assert [(r["replays"], r["passes"], r["label"]) for r in sweep] == [(2, 4, "free-2"), (4, 2, "free-4")]
    frontier = [(r["method"], r["epochs_equivalent"]) for r in rows if r["group"] == "frontier"]
    assert frontier == [("natural", 1.0), ("natural", 1.5), ("fast", 1.0), ("fast", 1.5), ("fast", 3.0),
                        ("pgd", 1.0), ("pgd", 1.0), ("pgd", 1.5), ("free", 8), ("free", 8), ("free", 16)]
    # a row whose whole configuration another row already trained is that row again, said so, not retrained
    same = [(r["group"], r["method"], r["same_run_as"]) for r in rows if "same_run_as" in r]
    assert same == [("frontier", "natural", "fast-at"), ("frontier", "fast", "fast-at"), ("frontier", "pgd", "frontier"),
                    ("frontier", "free", "fast-at"), ("frontier", "free", "fast-at")]
    assert "frontier (= fast-at)" in out.with_suffix(".md").read_text()
    assert result["meta"]["recipe"] == "fast-at" and result["meta"]["budget_scale"] == 0.1
    assert out.with_name(out.stem + "-sweep.png").stat().st_size > 1000


def test_mistakes_end_with_one_line(tmp_path):
    run = compare("--data", tmp_path / "nowhere", "--json", tmp_path / "x.json")
    assert run.returncode == 2 and "no such directory" in run.stderr and "Traceback" not in run.stderr
    run = compare("--data", tmp_path, "--methods", "natural,magic")
    assert run.returncode == 2 and "--methods: unknown 'magic'" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.gpu
def test_bf16_channels_last_comparison_on_the_gpu(tmp_path):
    result, _ = run_tiny(tmp_path, "cuda", "--methods", "natural,free")
    assert result["meta"]["precision"] == "bf16" and result["meta"]["device_type"] == "cuda"
    assert torch.cuda.is_available()


def fake_result(path, device="NVIDIA H200", arch="preact_resnet18", rows=("natural",)):
    def row(method, group="fast-at", seconds=60.0):
        ev = {"samples": 100, "clean_top1": 0.8, "clean_top1_ci95": [0.7, 0.9], "pgd-20": 0.4,
              "pgd-20_ci95": [0.3, 0.5], "cw-20": 0.4, "cw-20_ci95": [0.3, 0.5], "pgd-50x10": 0.38,
              "pgd-50x10_ci95": [0.28, 0.48]}
        return {"group": group, "method": method, "label": method, "replays": 1, "passes": 15,
                "epochs_equivalent": 15, "optimizer_steps": 100, "train_seconds": seconds, "lr": 0.2,
                "step_size": 0.01, "pixel_mode": "clamp_input", "images_per_s": 1.0, "eval": ev, "config": {}}
    meta = {"data": "CIFAR-10 (JPEG q75 copy)", "dataset": "cifar10", "arch": arch, "precision": "bf16",
            "device": device, "epsilon": 8 / 255, "eval_step_size": 2 / 255, "eval_steps": [20], "restart_steps": 50,
            "restarts": 10, "eval_samples": 100, "batch_size": 128, "train_images": 50000, "epochs_equivalent": 15,
            "lr": 0.2, "date": "2026-11-26T00:00:00+00:00", "git_commit": "abc", "command": "compare.py"}
    path.write_text(json.dumps({"meta": meta, "compare": [row(m) for m in rows], "summary": {}}))
    return path


def test_runs_split_over_sessions_merge_into_one_table_and_mismatched_ones_are_refused(tmp_path):
    a = fake_result(tmp_path / "a.json", rows=("natural", "fast"))
    b = fake_result(tmp_path / "b.json", rows=("free", "pgd"))
    out = tmp_path / "merged" / "compare.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), "--merge", a, b, "--out", out],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    merged = json.loads(out.read_text())
    assert [r["method"] for r in merged["compare"]] == ["natural", "fast", "free", "pgd"]
    assert merged["meta"]["merged_from"] == ["a.json", "b.json"] and merged["meta"]["device"] == "NVIDIA H200"
    assert "PGD-50X10" in out.with_suffix(".md").read_text() and out.with_suffix(".png").exists()
    other = fake_result(tmp_path / "c.json", arch="wide_resnet32_10")
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), "--merge", a, other, "--out",
                          tmp_path / "x.json"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "differs from" in run.stderr and "arch ('wide_resnet32_10'" in run.stderr
    assert not (tmp_path / "x.json").exists()
