"""Training runs executed in worker processes by the distributed tests, both
through freeadv_fast.distributed.launch and as a script under torchrun:

    python -m torch.distributed.run ... tests/dist_workers.py MODE OUT_DIR
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import EPS, MEAN, STD, STEP, sgd, small_cnn, toy_data  # noqa: E402

from freeadv_fast import FreeAdversarialTrainer, distributed, load_checkpoint  # noqa: E402
from freeadv_fast.data import TensorBatches  # noqa: E402

PASSES, BATCH, STOP_AT_STEP = 2, 8, 10  # 4 batches per pass, 2 replays: stop mid second pass


def run(mode: str, out_dir: str, dropout: float = 0.0, device: str = "cpu"):
    """mode: "full" trains 2 passes; "interrupt" stops mid-run writing a
    checkpoint; "resume" continues from it. Rank 0 saves the weights, every
    rank its delta. Dropout makes the result depend on the restored RNG state.
    ``device="cuda"``: on the GPU (with FREEADV_SHARE_GPU=1, every rank on one)."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    # on a GPU some backward kernels (adaptive average pooling) have no deterministic form: warn there, and the
    # GPU test compares within a tolerance
    torch.use_deterministic_algorithms(True, warn_only=device != "cpu")
    out = Path(out_dir)
    d = distributed.setup(cpu=device == "cpu")
    try:
        model = distributed.wrap_model(small_cnn(batchnorm=False, dropout=dropout).to(d.device), d)
        x, y = toy_data(n=32)
        loader = TensorBatches(x, y, batch_size=BATCH, seed=3, rank=d.rank, world_size=d.world_size)
        trainer = FreeAdversarialTrainer(model, sgd(model), replays=2, epsilon=EPS, step_size=STEP, mean=MEAN,
                                         std=STD)
        ckpt = out / "checkpoint.pt"
        if mode == "resume":
            load_checkpoint(ckpt, trainer)
        stop = (lambda: trainer.step >= STOP_AT_STEP) if mode == "interrupt" else None
        done = trainer.fit(loader, PASSES, checkpoint_path=ckpt if mode != "full" else None, should_stop=stop)
        assert done == (mode != "interrupt")
        torch.save(trainer.delta.cpu(), out / f"delta-{mode}-rank{d.rank}.pt")
        if d.is_main:
            torch.save({k: v.cpu() for k, v in distributed.unwrap(model).state_dict().items()}, out / f"model-{mode}.pt")
    finally:
        distributed.teardown()
        torch.use_deterministic_algorithms(deterministic)


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], *map(float, sys.argv[3:4]), *sys.argv[4:5])
