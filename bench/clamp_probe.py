"""Which gradient does this torch give ``clamp`` at its bounds?

The paper's code fed the model ``clamp(x + delta, 0, 1)`` and let autograd
mask delta's gradient; torch answered "1 on the bounds" from 0.4.1
(pytorch/pytorch#7049) until the 2026 change to strict masks. Our
``clamp_input`` pixel mode states the paper's (inclusive) mask,
``clamp_input_strict`` the newer one; this probe records which one the
installed torch has, on each device.

    python bench/clamp_probe.py [--json PATH]
"""
from __future__ import annotations

import sys

import torch

from common import guarded, parse, parser, write_json


def probe(device) -> dict:
    out = {}
    for name, fn in (("clamp(x, 0, 1)", lambda t: t.clamp(0, 1)), ("clamp_min(x, 0)", lambda t: t.clamp_min(0)),
                     ("clamp_max(x, 1)", lambda t: t.clamp_max(1)), ("clamp_(x, 0, 1) in place",
                                                                      lambda t: t.clone().clamp_(0, 1))):
        x = torch.tensor([0.0, 0.5, 1.0], device=device, requires_grad=True)
        fn(x).sum().backward()
        out[name] = x.grad.tolist()  # gradient at 0, inside, at 1
    lo, _, hi = out["clamp(x, 0, 1)"]
    out["mask"] = "inclusive" if (lo, hi) == (1.0, 1.0) else "strict" if (lo, hi) == (0.0, 0.0) else "mixed"
    return out


@guarded
def main(argv=None):
    args = parse(parser(__doc__, device=False), argv)  # it probes every device torch sees
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = {d: probe(d) for d in devices}
    for d, r in results.items():
        print(f"torch {torch.__version__} on {d}: clamp's mask at the bounds is {r['mask']}; "
              + "; ".join(f"{k}: {v}" for k, v in r.items() if k != "mask"))
    if args.json:
        write_json(args.json, torch.device(devices[-1]), probe=results)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
