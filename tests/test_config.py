"""RunConfig is the one list of settings: every field is a flag, a YAML key
and a preset key, merged in the documented order and checked in one place."""
import dataclasses

import pytest
import yaml

from freeadv_fast import train
from freeadv_fast.cli import config_flags
from freeadv_fast.config import PRESETS, ConfigError, RunConfig, build_config


def parse(*argv):
    return config_flags(train.parser().parse_args(list(argv)))


def test_every_setting_is_a_flag_with_help():
    p = train.parser()
    flags = {a.dest: a for a in p._actions}
    for f in dataclasses.fields(RunConfig):
        if f.name == "dataset":
            continue  # the positional DATASET
        assert f.name in flags, f.name
        assert flags[f.name].help, f.name


@pytest.mark.parametrize("argv,expected", [
    (["--momentum", "0.8"], {"momentum": 0.8}),
    (["--milestones", "100,200"], {"milestones": [100, 200]}),
    (["--final-eval-steps", "20"], {"final_eval_steps": [20]}),
    (["--eval-step-size", "2/255"], {"eval_step_size": 2 / 255}),
    (["--no-channels-last", "--nesterov"], {"channels_last": False, "nesterov": True}),
    (["--workers", "0", "--image-size", "64"], {"workers": 0, "image_size": 64}),
])
def test_flags_parse_to_settings(argv, expected):
    assert parse(*argv) == expected


def test_defaults_then_preset_then_yaml_then_flags(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text(yaml.safe_dump({"lr": 0.3, "weight_decay": 0.001, "channels_last": True}))
    cfg = build_config(dataset="cifar10", file=file, flags=parse("--lr", "0.05", "--no-channels-last"))
    assert cfg.lr == 0.05  # flag over YAML
    assert cfg.weight_decay == 0.001  # YAML over preset
    assert cfg.channels_last is False  # a --no- flag over YAML
    assert cfg.milestones == PRESETS["cifar10-free8"]["milestones"]  # preset over default
    assert cfg.eval_restarts == RunConfig().eval_restarts  # the default where nothing else speaks


@pytest.mark.parametrize("flags,message", [
    ({"replays": 0}, "replays must be a positive integer, got 0"),
    ({"milestones": [0]}, "milestones must be positive integers"),
    ({"precision": "fp8"}, "unknown precision 'fp8': choose one of fp32, bf16, fp16"),
    ({"eval_step_size": 2.0}, "eval step size must be between 0 and 1"),
    ({"workers": -1}, "workers must be a non-negative integer"),
])
def test_one_check_for_flags_yaml_and_presets(tmp_path, flags, message):
    with pytest.raises(ConfigError, match=message):
        build_config(dataset="digits", flags=flags)
    file = tmp_path / "c.yaml"
    file.write_text(yaml.safe_dump(flags))
    with pytest.raises(ConfigError, match=message):
        build_config(dataset="digits", file=file)


def test_yaml_reads_exponent_floats_as_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads 1e-3 as a string, which was refused as "not a number"."""
    (tmp_path / "c.yaml").write_text("lr: 1e-3\nweight_decay: 5E-4\nmomentum: 0.9\n")
    cfg = build_config(dataset="digits", file=tmp_path / "c.yaml")
    assert (cfg.lr, cfg.weight_decay, cfg.momentum) == (0.001, 0.0005, 0.9)


def test_an_epsilon_of_half_the_pixel_range_or_more_is_noted(capfd):
    build_config(dataset="digits", flags={"epsilon": 0.75})  # 0.75 meaning 0.75/255?
    assert "epsilon 0.75 is half the pixel range or more" in capfd.readouterr().err
    build_config(dataset="digits", flags={"epsilon": 0.3})  # MNIST's budget: said nothing
    assert "half the pixel range" not in capfd.readouterr().err


def test_settings_a_run_ignores_are_noted(tmp_path, capfd):
    """Each was accepted without a word while the run did something else than asked."""
    (tmp_path / "empty.yaml").write_text("")
    cfg = build_config(file=tmp_path / "empty.yaml")
    assert cfg.dataset == "digits" and cfg.epochs == RunConfig.epochs  # the defaults, not digits-demo
    build_config(dataset="digits", preset="cifar10-fast")
    build_config(dataset="digits", flags={"loader": "nvjpeg", "workers": 4})
    build_config(dataset="synthetic", flags={"train_subset": 10})
    err = capfd.readouterr().err
    assert f"config file {tmp_path / 'empty.yaml'} holds no settings" in err
    assert "no dataset named (DATASET, --preset or dataset: in" in err and "not with its preset" in err
    assert "preset cifar10-fast was made for cifar10; training digits with its settings" in err
    assert "loader nvjpeg, workers 4: only image folders read during training have a loader" in err
    assert "train-subset 10 is ignored: synthetic data has no training split" in err
    build_config(dataset="imagenet", flags={"data": "/x", "loader": "torch", "workers": 2})  # a loader to set
    assert "note" not in capfd.readouterr().err


def test_milestones_the_run_never_reaches_or_its_schedule_ignores_are_noted(capfd):
    from freeadv_fast.data.datasets import build_data
    from freeadv_fast.run import build_trainer
    flags = dict(method="natural", epochs=1, train_subset=128, batch_size=64)  # 2 optimizer steps
    for extra in (dict(schedule="multistep", milestones=[1, 5]), dict(schedule="cosine", milestones=[1])):
        cfg = build_config(dataset="digits", flags={**flags, **extra})
        build_trainer(cfg, build_data(cfg), "cpu")
    err = capfd.readouterr().err
    assert "milestone(s) [5] come at or after the run's last optimizer step (2 steps in all)" in err
    assert "milestones [1] apply to the multistep schedule only; the cosine schedule ignores them" in err
    cfg = build_config(dataset="digits", flags={**flags, "schedule": "multistep", "milestones": [1]})
    build_trainer(cfg, build_data(cfg), "cpu")
    assert "milestone" not in capfd.readouterr().err


def test_the_pixel_mode_is_free_trainings_and_each_run_records_the_one_it_uses(capfd):
    """PGD-k and FGSM-RS always project, yet their runs recorded (and resumes
    compared) clamp_input, and --pixel-mode changed nothing there in silence."""
    assert build_config(dataset="digits").pixel_mode == "clamp_input"  # the paper's code as it ran
    assert build_config(dataset="digits", flags={"pixel_mode": "project"}).pixel_mode == "project"
    for method in ("pgd", "fast"):
        assert build_config(dataset="digits", flags={"method": method}).pixel_mode == "project"
        with pytest.raises(ConfigError, match=f"pixel-mode clamp_input: {method} training keeps its perturbation "
                                              "by project only"):
            build_config(dataset="digits", flags={"method": method, "pixel_mode": "clamp_input"})
    assert build_config(dataset="digits", flags={"method": "natural", "pixel_mode": "project"}).pixel_mode is None
    assert "pixel-mode project is ignored: natural training has no perturbation" in capfd.readouterr().err


def test_a_pixel_mode_recorded_before_it_was_free_trainings_alone_is_still_read(tmp_path, capfd, monkeypatch):
    """Every run once recorded pixel_mode (clamp_input, then the default): a
    PGD run's config.yaml fed back with --config, and eval of its checkpoint,
    were refused once the mode became free training's choice."""
    import freeadv_fast.eval as evaluation
    (tmp_path / "old.yaml").write_text("method: pgd\npixel_mode: clamp_input\n")
    assert build_config(dataset="digits", file=tmp_path / "old.yaml").pixel_mode == "project"
    assert "pixel_mode clamp_input in" in capfd.readouterr().err
    for method, used in (("pgd", "project"), ("natural", None)):
        monkeypatch.setattr(evaluation, "read_checkpoint", lambda path: {"config": dict(
            dataset="digits", arch="small_cnn", method=method, pixel_mode="clamp_input", epochs=1.0)})
        assert evaluation.settings(evaluation.parser().parse_args(["old.pt", "--cpu"]))["config"].pixel_mode == used
    assert "pixel-mode" not in capfd.readouterr().err  # nothing to say of what the checkpoint recorded
