"""The benchmark scripts that CI does not run otherwise, on CPU at toy size:
they run, and write what their readers (README, report, later sessions) need."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_data import write_folder

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args, timeout=300):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / script), *map(str, args)], capture_output=True,
                            text=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_loader_bench_times_each_loader_at_each_size_and_sets_step_rates_beside(tmp_path):
    write_folder(tmp_path / "data" / "train", per_class=8)
    step = tmp_path / "step.json"  # a train_step.py result at 32 px
    step.write_text(json.dumps({"meta": {"image_size": 32, "batch_size": 8}, "records": [
        {"method": "natural bf16 graph", "images_per_s": 100.0},
        {"method": "free-4 bf16 graph", "images_per_s": 80.0},
        {"method": "free-4 bf16", "images_per_s": 60.0}]}))
    out = tmp_path / "loader.json"
    text = run("loader.py", "--data", tmp_path / "data", "--device", "cpu", "--batch-size", 4, "--image-size", "32,48",
               "--loader", "nvjpeg", "--loader", "torch", "--workers", 1, "--train-step", step, "--json", out)
    records = json.loads(out.read_text())["records"]
    assert sorted((r["loader"], r["image_size"]) for r in records) == [
        ("nvjpeg", 32), ("nvjpeg", 48), ("torch", 32), ("torch", 48)]
    for r in records:
        assert r["images"] == 24 and r["images_per_s"] > 0
        if r["image_size"] == 32:  # the best variant of each method, and the images a replay needs
            assert r["step_free-4"]["method"] == "free-4 bf16 graph"
            assert abs(r["gpus_fed_natural"] - r["images_per_s"] / 100) < 1e-9
            assert abs(r["gpus_fed_free-4"] - r["images_per_s"] / 20) < 1e-9
        else:
            assert "gpus_fed_natural" not in r
    assert "GPUs of natural bf16 graph" in text


def test_stem_grad_bench_runs_and_records_each_part(tmp_path):
    out = tmp_path / "stem.json"
    run("stem_grad.py", "--device", "cpu", "--quick", "--json", out)
    doc = json.loads(out.read_text())
    assert {r["layout"] for r in doc["conv1"]} == {"channels_last", "nchw"} and len(doc["conv1"]) == 10
    assert doc["whole_step"][-1]["sign_agreement_autograd_vs_padded8"] > 0.99
    assert doc["whole_step"][-1]["sign_agreement_autograd_vs_subpixel"] > 0.99
    assert doc["profile"]["largest_differences"]


def test_train_step_projects_a_phased_preset_from_results_at_each_size(tmp_path):
    files = []
    for size, batch, rate in ((128, 256, 3600.0), (224, 256, 1200.0), (288, 128, 720.0)):
        f = tmp_path / f"{size}.json"
        f.write_text(json.dumps({"meta": {"model": "resnet50", "image_size": size, "batch_size": batch}, "records": [
            {"method": "free-4 bf16 graph", "images_per_s": rate}, {"method": "free-4 bf16", "images_per_s": 1.0},
            {"method": "natural bf16 graph", "images_per_s": 10 * rate}]}))
        files.append(f)
    out = tmp_path / "projection.json"
    text = run("train_step.py", "--device", "cpu", "--project", "imagenet-fast-free4-eps4", "--results", *files,
               "--json", out)
    doc = json.loads(out.read_text())["projection"]
    hours = [r["hours"] for r in doc["phases"]]  # 6, 6 and 3 epochs of 1,281,167 image-replays at each rate
    expected = [6 * 1281167 / 3600 / 3600, 6 * 1281167 / 1200 / 3600, 3 * 1281167 / 720 / 3600]
    assert hours == [pytest.approx(h) for h in expected] and doc["hours_one_device"] == pytest.approx(sum(expected))
    assert "total" in text and "2 days on 4 P100s" in text
    missing = subprocess.run([sys.executable, str(ROOT / "bench" / "train_step.py"), "--device", "cpu", "--project",
                              "imagenet-fast-free4-eps4", "--results", files[0]], capture_output=True, text=True,
                             timeout=120, cwd=ROOT)
    assert missing.returncode != 0 and "no free-4 rate at 224 px" in missing.stderr
