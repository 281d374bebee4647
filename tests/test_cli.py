"""The training and evaluation commands end to end, on tiny datasets in the
real formats, and every expected mistake as one clear line with status 2."""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from freeadv_fast import train
from freeadv_fast.cli import comma_list
from freeadv_fast.checkpoint import read_checkpoint
from test_data import write_cifar, write_folder

FAST = {"eval_samples": 16, "final_eval_samples": 16, "eval_steps": 2, "final_eval_steps": [2], "log_every": 2,
        "workers": 1}


def cli(*args, module="freeadv_fast.train", timeout=600):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def config_file(tmp_path, **values):
    path = tmp_path / "fast.yaml"
    path.write_text(yaml.safe_dump({**FAST, **values}))
    return path


def assert_run_directory(out, passes):
    for name in ("config.yaml", "metrics.jsonl", "checkpoint-last.pt", "checkpoint-best.pt", "curves.png",
                 "final.json"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert train_records and all({"step", "epoch", "lr", "loss", "acc", "images_per_s"} <= r.keys()
                                  for r in train_records)
    assert [r["epoch"] for r in evals] == list(range(1, passes + 1))
    final = json.loads((out / "final.json").read_text())
    assert 0 <= final["clean_top1"] <= 1 and 0 <= final["pgd-2"] <= 1 and final["samples"] == 16
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["arch"] == "small_cnn"
    return records


def test_cifar_pickles_end_to_end(tmp_path):
    data = write_cifar(tmp_path / "data", n_train=40, n_test=20)
    out = tmp_path / "run"
    result = cli("--cpu", "cifar10", "--data", data, "--arch", "small_cnn", "--replays", "2", "--epochs", "4",
                 "--batch-size", "32", "--epsilon", "8/255", "--lr", "0.05", "--config", config_file(tmp_path),
                 "--out", out)
    assert result.returncode == 0, result.stderr
    assert "epsilon: 0.031372" in result.stderr  # the effective configuration is printed, fractions resolved
    assert "pass 2/2" in result.stderr and "final evaluation" in result.stderr
    assert_run_directory(out, passes=2)
    evaluation = cli(out / "checkpoint-last.pt", "--cpu", "--limit", "12", "--steps", "2,3", "--json",
                     tmp_path / "e.json", module="freeadv_fast.eval")
    assert evaluation.returncode == 0, evaluation.stderr
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["samples"] == 12 and {"pgd-2", "pgd-3", "clean_top5_ci95"} <= report.keys()
    assert report["epsilon"] == pytest.approx(8 / 255)  # the checkpoint's training epsilon


def test_image_folder_with_two_processes(tmp_path):
    root = tmp_path / "imagenet"
    write_folder(root / "train", classes=("n1", "n2"), per_class=8)
    write_folder(root / "val", classes=("n1", "n2"), per_class=8, seed=1)
    out = tmp_path / "run"
    result = cli("--cpu", "--nproc", "2", "imagenet", "--data", root, "--arch", "small_cnn", "--loader", "torch",
                 "--epochs", "4", "--batch-size", "8", "--config", config_file(tmp_path, image_size=32), "--out", out)
    assert result.returncode == 0, result.stderr
    assert "2 process(es)" in result.stderr
    assert_run_directory(out, passes=1)


def test_sigterm_writes_a_checkpoint_and_resume_auto_finishes(tmp_path):
    out = tmp_path / "run"
    args = ["--cpu", "digits", "--epochs", "80", "--replays", "4", "--config",
            config_file(tmp_path, eval_every=0, log_every=3), "--out", out]
    proc = subprocess.Popen([sys.executable, "-m", "freeadv_fast.train", *map(str, args)], stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 3:
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[1]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "--resume auto" in err and "Traceback" not in err
    stopped = read_checkpoint(out / "checkpoint-last.pt")
    assert stopped["step"] > 0 and stopped["epoch"] < 20
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == stopped["step"]  # the batches since the last log interval are recorded too
    again = cli(*args)
    assert again.returncode == 2 and "holds another run" in again.stderr
    resumed = cli(*args, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    assert read_checkpoint(out / "checkpoint-last.pt")["epoch"] == 20
    assert (out / "final.json").exists()


def test_embedded_default_shows_the_robustness_gain(tmp_path):
    out = tmp_path / "demo"
    result = cli("--cpu", "--epochs", "40", "--out", out)
    assert result.returncode == 0, result.stderr
    comparison = json.loads((out / "comparison.json").read_text())
    natural, free = comparison["natural"], comparison["free"]
    assert free["robust_acc"] - natural["robust_acc"] > 0.2
    assert natural["clean_acc"] - free["clean_acc"] < 0.1
    assert comparison["attack"]["epsilon"] == 0.15 and comparison["attack"]["steps"] == 20
    for method in ("natural", "free"):
        assert (out / method / "final.json").exists() and (out / method / "curves.png").exists()
    assert "robust accuracy for" in result.stdout


def one_line_error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        sys.exit(train.main(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def test_every_expected_mistake_is_one_line_and_status_2(tmp_path, capsys):
    cifar_dir = write_cifar(tmp_path / "cifar")
    (tmp_path / "empty").mkdir()
    folder = tmp_path / "folder"
    write_folder(folder / "train", classes=("a",), per_class=1)
    cases = {
        "no such directory": ["cifar10", "--data", tmp_path / "missing"],
        "no cifar10 here": ["cifar10", "--data", tmp_path / "empty"],
        "no val/ folder": ["imagenet", "--data", folder],
        "unknown dataset 'mnist'": ["mnist"],
        "unknown architecture 'resnet9000'": ["digits", "--arch", "resnet9000"],
        "unknown preset 'cifar10-free99'": ["--preset", "cifar10-free99"],
        "--replays: must be >= 1": ["digits", "--replays", "0"],
        "epsilon must be between 0 and 1": ["digits", "--epsilon=-1/255"],
        "step size must be between 0 and 1": ["digits", "--step-size", "300/255"],
        # argparse took '-1/255' and '-1e-3' for options ("expected one argument")
        "step size must be between 0 and 1 (the pixel range), got -0.00392157": ["digits", "--step-size", "-1/255"],
        "epsilon must be between 0 and 1 (the pixel range), got -0.001": ["digits", "--epsilon", "-1e-3"],
        "not a number or fraction": ["digits", "--epsilon", "eight"],
        "not divisible by the 2 worker processes": ["--cpu", "--nproc", "2", "digits", "--batch-size", "5"],
        "--gpus 2 asked for, but this machine has": ["--gpus", "2", "digits"],
        "unrecognized arguments: --bogus": ["digits", "--bogus", "1"],
        "unknown key(s) learning_rate": ["digits", "--config", config_file(tmp_path, learning_rate=0.1)],
        "unknown precision 'fp8'": ["digits", "--precision", "fp8"],
        "--milestones: an empty item in '30,,60'": ["digits", "--milestones", "30,,60"],
        "--final-eval-steps: not a comma-separated list of integers": ["digits", "--final-eval-steps", "10,x"],
    }
    if torch.cuda.is_available():
        cases.pop("--gpus 2 asked for, but this machine has")
    for expected, argv in cases.items():
        line = one_line_error(capsys, [str(a) for a in argv] + ["--out", str(tmp_path / "never")])
        assert expected in line, (argv, line)
    assert not (tmp_path / "never").exists()  # nothing was started or written
    assert cifar_dir.exists()


def test_comma_lists_convert_check_and_name_what_they_refuse():
    ints = comma_list(int, minimum=1, distinct=True)
    assert ints(" 2, 4,8 ") == [2, 4, 8]
    names = comma_list(choices=("natural", "free"), empty_ok=True)
    assert names("") == [] and names("free,natural,free") == ["free", "natural", "free"]
    for parse, text, message in [(ints, "2,,4", "an empty item in '2,,4'"), (ints, "2,", "an empty item"),
                                 (ints, "", "empty: name at least one"), (ints, "2,x", "list of integers"),
                                 (ints, "0,2", "each must be >= 1"), (ints, "4,2,4", "4 named twice"),
                                 (names, "natural,pgd", "unknown 'pgd': choose from natural, free")]:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
            parse(text)


def test_checkpoint_and_run_directory_mistakes(tmp_path, capsys):
    out = tmp_path / "run"
    ok = cli("--cpu", "digits", "--epochs", "4", "--config", config_file(tmp_path, eval_every=0), "--out", out)
    assert ok.returncode == 0, ok.stderr
    line = one_line_error(capsys, ["--cpu", "digits", "--epochs", "4", "--out", str(out)])
    assert "holds another run" in line
    line = one_line_error(capsys, ["--cpu", "digits", "--arch", "resnet18", "--resume",
                                   str(out / "checkpoint-last.pt"), "--out", str(tmp_path / "other")])
    assert "is from a arch 'small_cnn' run" in line
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes((out / "checkpoint-last.pt").read_bytes()[:1000])
    line = one_line_error(capsys, ["--cpu", "digits", "--resume", str(corrupt), "--out", str(tmp_path / "x")])
    assert "cannot read checkpoint" in line
    result = cli(corrupt, "--cpu", module="freeadv_fast.eval")
    assert result.returncode == 2 and "cannot read checkpoint" in result.stderr and "Traceback" not in result.stderr
    result = cli(out / "checkpoint-last.pt", "--cpu", "--attack", "nope", module="freeadv_fast.eval")
    assert result.returncode == 2 and "invalid choice: 'nope'" in result.stderr


def test_eval_runs_autoattack_and_says_when_it_cannot(tmp_path, capsys, monkeypatch):
    pytest.importorskip("torchattacks")
    out = tmp_path / "run"
    ok = cli("--cpu", "digits", "--epochs", "4", "--config", config_file(tmp_path, eval_every=0), "--out", out)
    assert ok.returncode == 0, ok.stderr
    result = cli(out / "checkpoint-last.pt", "--cpu", "--attack", "autoattack", "--limit", "8", "--json",
                 tmp_path / "aa.json", module="freeadv_fast.eval")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "aa.json").read_text())
    assert report["samples"] == 8 and report["autoattack"] <= report["clean_top1"]
    assert not {"step_size", "restarts", "pgd-10"} & set(report)  # no PGD ran, nor are its settings recorded
    said = next(line for line in result.stderr.splitlines() if "evaluating" in line)
    assert "AutoAttack" in said and "steps" not in said and "restarts" not in said  # it said the PGD it never ran
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # as if it were not installed
    from freeadv_fast import eval as eval_cli
    assert eval_cli.main([str(out / "checkpoint-last.pt"), "--cpu", "--attack", "autoattack"]) == 2
    assert "needs torchattacks: pip install torchattacks" in capsys.readouterr().err


def test_the_command_under_torchrun_with_two_nodes(tmp_path):
    from freeadv_fast.distributed import free_port
    out = tmp_path / "run"
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(n),
                               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port,
                               "-m", "freeadv_fast.train", "--cpu", "digits", "--epochs", "4", "--config",
                               str(config_file(tmp_path, eval_every=1)), "--out", str(out)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for n in (0, 1)]
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n\n".join(log[-3000:] for log in logs)
    assert "2 process(es)" in logs[0]
    assert_run_directory(out, passes=1)


def test_a_crashed_run_resumed_with_new_settings_records_what_ran(tmp_path):
    """After a crash, --resume auto kept the lost attempt's records (steps
    went backwards, samples counted twice); a new LR or momentum was said and
    recorded but the checkpoint's came back; the pass summary gave its last log
    interval; the periodic evaluation ignored --eval-restarts; resumed into a
    new folder, checkpoint-best.pt held the last weights with the old run's score."""
    from freeadv_fast.checkpoint import atomic_save
    out = tmp_path / "run"
    args = ["--cpu", "synthetic", "--arch", "small_cnn", "--method", "free", "--replays", "2", "--epochs", "6",
            "--synthetic-batches", "4", "--synthetic-classes", "5", "--batch-size", "8", "--image-size", "16",
            "--schedule", "onecycle", "--lr", "0.05", "--log-every", "1", "--eval-every", "1", "--eval-samples", "8",
            "--eval-steps", "1", "--eval-restarts", "2", "--final-eval-steps", "1", "--final-eval-samples", "8"]

    def records(folder):
        return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]

    crashed = subprocess.run([sys.executable, "-m", "freeadv_fast.train", *args, "--out", out], capture_output=True,
                             text=True, timeout=300, env={**os.environ, "FREEADV_FAULT_INJECT": "0:12"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    before = records(out)
    lost = {r["step"]: r["lr"] for r in before if r["type"] == "train" and r["step"] > 8}  # pass 1 ends at step 8
    assert lost and read_checkpoint(out / "checkpoint-last.pt")["step"] == 8
    pass1 = read_checkpoint(out / "checkpoint-last.pt")
    pass1["config"]["best_robust"] = 0.99  # a score no evaluation of the next run reaches
    atomic_save(pass1, tmp_path / "pass1.pt")

    resumed = cli(*args, "--out", out, "--resume", "auto", "--lr", "0.025", "--momentum", "0.5")
    assert resumed.returncode == 0, resumed.stderr
    assert f"dropped {len(lost)} record(s) after step 8" in resumed.stderr
    after = records(out)
    steps = [r["step"] for r in after if r["type"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 24  # each step recorded once, in order
    again = {r["step"]: r["lr"] for r in after if r["type"] == "train" and r["step"] in lost}
    assert again == pytest.approx({step: lr / 2 for step, lr in lost.items()})  # the new peak LR, same schedule
    state = read_checkpoint(out / "checkpoint-last.pt")
    assert {(g["momentum"], g["initial_lr"]) for g in state["optimizer"]["param_groups"]} == {(0.5, 0.025)}
    evals = [r for r in after if r["type"] == "eval"]
    assert len(evals) == 3 and all("pgd-1x2" in r for r in evals) and "PGD-1X2" in resumed.stderr
    summary = re.search(r"pass 3/3: loss ([\d.]+), train acc ([\d.]+)", resumed.stderr)
    pass3 = [r for r in after if r["type"] == "train" and r["step"] > 16]
    n = sum(r["samples"] for r in pass3)
    assert float(summary[1]) == pytest.approx(sum(r["loss"] * r["samples"] for r in pass3) / n, abs=1e-4)
    assert float(summary[2]) == pytest.approx(sum(r["acc"] * r["samples"] for r in pass3) / n, abs=1e-4)

    elsewhere = tmp_path / "elsewhere"
    moved = cli(*args, "--out", elsewhere, "--resume", tmp_path / "pass1.pt")
    assert moved.returncode == 0, moved.stderr
    scores = [r["pgd-1x2"] for r in records(elsewhere) if r["type"] == "eval"]
    assert read_checkpoint(elsewhere / "checkpoint-best.pt")["config"]["best_robust"] == max(scores) < 0.99
