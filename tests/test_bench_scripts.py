"""The benchmark scripts that CI does not run otherwise, on CPU at toy size:
they run, and write what their readers (README, report, later sessions) need."""
import json
import subprocess
import sys
from pathlib import Path

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
    step.write_text(json.dumps({"meta": {"image_size": 32}, "records": [
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
    assert {r["layout"] for r in doc["conv1"]} == {"channels_last", "nchw"} and len(doc["conv1"]) == 8
    assert doc["whole_step"][-1]["sign_agreement_autograd_vs_padded8"] > 0.99
    assert doc["profile"]["largest_differences"]
