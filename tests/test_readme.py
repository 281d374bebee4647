"""The README's Python examples run as written (on the CPU: ``.cuda()`` is
the one call made a no-op), so the docs cannot drift from the API."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def example(heading: str) -> str:
    """The first ```python block of the README section ``heading``."""
    text = README.read_text()
    section = text[text.index(f"\n## {heading}\n"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


class FirstPassOnly:
    """A one-batch loader that yields its batch in the first pass only: the
    example's 23 passes of ResNet-50 take 4 steps, not 92, on 2 CPU cores."""

    def __init__(self, batch):
        self.batch, self.passes = batch, 0

    def __len__(self):
        return 1

    def __iter__(self):
        self.passes += 1
        return iter([self.batch] if self.passes == 1 else [])


def test_the_training_from_python_example_trains(monkeypatch, capsys):
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *args, **kwargs: self)
    torch.manual_seed(0)
    names = {"loader": FirstPassOnly((torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), torch.tensor([1, 7])))}
    exec(compile(example("Training from Python"), "README.md", "exec"), names)
    trainer, passes = names["trainer"], names["passes"]
    assert passes == 23 and trainer.delta.shape == (2, 3, 32, 32)
    assert 0 < trainer.delta.abs().max() <= 4 / 255 + 1e-6  # the perturbation moved, within epsilon
    assert names["loader"].passes == passes and trainer.step == 4  # 4 replays, 4 optimizer steps
    assert len(capsys.readouterr().out.splitlines()) == passes  # one log record a pass


def test_the_perturbation_ops_example_runs():
    torch.manual_seed(0)
    names = {"grad": torch.randn(128, 3, 32, 32)}  # the example's "d loss / d inp"
    exec(compile(example("The perturbation ops"), "README.md", "exec"), names)
    delta, x, inp = names["delta"], names["x"], names["inp"]
    assert 0 < delta.abs().max() <= 8 / 255 + 1e-6
    assert inp.shape == x.shape and inp.dtype == torch.float32
