"""A dataset and a training method are one registration each: the toy ones
below are defined in this file alone and run through the commands."""
import json

import pytest
import torch

from freeadv_fast import eval as eval_cli
from freeadv_fast import ops, train
from freeadv_fast.config import ConfigError, build_config
from freeadv_fast.data import DATASETS, DatasetSpec, register_dataset
from freeadv_fast.data.datasets import in_memory
from freeadv_fast.methods import METHODS, MethodSpec, NaturalTrainer, register_method


def build_stripes(cfg, rank, world_size, device):
    """Two classes of 8x8 grey images: horizontal or vertical stripes, with noise."""
    g = torch.Generator().manual_seed(0)

    def split(n):
        y = torch.randint(0, 2, (n,), generator=g)
        stripes = (torch.arange(8) % 2 * 200).view(1, 8, 1).expand(n, 8, 8).clone()
        stripes[y == 1] = stripes[y == 1].transpose(1, 2)
        x = (stripes + torch.randint(0, 56, (n, 8, 8), generator=g)).to(torch.uint8)
        return x.unsqueeze(1), y
    train_split, val_split = in_memory(cfg, split(256), split(64), rank=rank, world_size=world_size, device=device)
    return train_split, val_split, 2, 8


class UniformNoiseTrainer(NaturalTrainer):
    """Training on x plus uniform noise in the epsilon ball (a weak baseline)."""

    method = "uniform-noise"

    def __init__(self, model, optimizer, *, epsilon, **kw):
        super().__init__(model, optimizer, **kw)
        self.epsilon = epsilon

    def train_batch(self, x, y):
        x, y = self._prepare(x, y)
        delta = torch.zeros(x.shape, device=self.device)
        ops.random_init_(delta, x, epsilon=self._param("epsilon", self.epsilon, x.shape[1]),
                         pixel_range=(self.lo, self.hi), mode="project", generator=self.generator)
        inp = ops.make_input(x, delta, mode="project", **self._norm(x))
        loss, logits, _ = self._train_step(inp, y, input_grad=False)
        self._optimizer_step()
        self._record(loss, logits, y)
        return {"loss": loss.detach(), "samples": x.shape[0], "replays": 1}


@pytest.fixture
def toys():
    dataset = register_dataset(DatasetSpec("stripes", "Stripes", build_stripes, mean=(0.5,), std=(0.3,), image_size=8,
                                           default_arch="small_cnn", channels=1, epsilon="0.1"))
    method = register_method(MethodSpec("uniform-noise", UniformNoiseTrainer, label="uniform noise",
                                        default_step_size=lambda cfg: 0.0,
                                        trainer_args=lambda cfg: dict(epsilon=cfg.epsilon)))
    yield dataset, method
    DATASETS.pop("stripes")
    METHODS.pop("uniform-noise")


def test_a_registered_dataset_and_method_train_and_evaluate_through_the_commands(toys, tmp_path, capsys):
    out = tmp_path / "run"
    status = train.main(["stripes", "--cpu", "--method", "uniform-noise", "--epsilon", "0.1", "--epochs", "3",
                         "--batch-size", "32", "--lr", "0.05", "--schedule", "constant", "--eval-samples", "64",
                         "--final-eval-steps", "3", "--out", str(out)])
    assert status == 0, capsys.readouterr().err[-2000:]
    final = json.loads((out / "final.json").read_text())
    assert final["samples"] == 64 and final["clean_top1"] > 0.9  # the stripes are learnt
    config = (out / "config.yaml").read_text()
    assert "dataset: stripes" in config and "method: uniform-noise" in config and "arch: small_cnn" in config
    assert eval_cli.main([str(out / "checkpoint-last.pt"), "--cpu", "--steps", "2", "--json",
                          str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["dataset"] == "stripes"


def test_the_registries_refuse_a_second_spec_under_a_taken_name(toys):
    dataset, method = toys
    with pytest.raises(ValueError, match="registered already"):
        register_dataset(DatasetSpec("stripes", "Other", build_stripes, (0.5,), (0.3,), 8, "small_cnn"))
    with pytest.raises(ValueError, match="registered already"):
        register_method(MethodSpec("uniform-noise", NaturalTrainer, label="x", default_step_size=lambda cfg: 0.0))
    assert register_dataset(dataset) is dataset  # registering the same spec again is harmless


def test_a_name_nobody_registered_is_refused_naming_the_choices():
    with pytest.raises(ConfigError, match="unknown dataset 'stripes': choose one of imagenet, cifar10"):
        build_config(dataset="stripes")
    with pytest.raises(ConfigError, match="unknown method 'uniform-noise': choose one of natural, free, pgd, fast"):
        build_config(dataset="digits", flags={"method": "uniform-noise"})


def test_create_model_names_a_bad_name_or_count():
    from freeadv_fast.models import create_model
    for name in (["small_cnn"], None):  # a list was an unhashable-type TypeError
        with pytest.raises(ValueError, match="unknown architecture"):
            create_model(name, 10)
    # 0 classes built a model without outputs, -1 failed inside torch, 1.5 in nn.Linear
    for kw, message in [(dict(num_classes=0), "num_classes must be an integer >= 1, got 0"),
                        (dict(num_classes=-1), "num_classes must be an integer >= 1, got -1"),
                        (dict(num_classes=1.5), "num_classes must be an integer >= 1, got 1.5"),
                        (dict(num_classes=10, in_channels=0), "in_channels must be an integer >= 1, got 0")]:
        with pytest.raises(ValueError, match=message):
            create_model("small_cnn", **kw)
