"""A tiny Task for exercising the shared loop (not a product model): a conv autoencoder trained with MSE plus a
random-noise input corruption, so the loop's RNG handling matters for bit-exact resume.

Run as a script (`python tests/toy.py key=value ...`) it trains through `ldm.train.loop.fit` on the digits; the
subprocess tests (kill, preemption, multi-process) use that entry point. `toy.nan_at_step=K` injects a NaN loss.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

from ldm.train.task import StepOutput, Task


class ToyTask(Task):
    phases = ("model",)

    def __init__(self, nan_at_step: int = -1, noise: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1))
        self.nan_at_step, self.noise, self.nan_fired = nan_at_step, noise, False

    def param_groups(self):
        return {"model": list(self.net.parameters())}

    def ema_module(self):
        return self.net

    def forward(self, batch, *, step, phase, micro=0):
        x = batch["image"]
        noisy = x + self.noise * torch.randn_like(x)
        loss = (self.net(noisy) - x).pow(2).mean()
        if step == self.nan_at_step and not self.nan_fired:  # a one-off spike, like a bad batch
            self.nan_fired = True
            loss = loss * float("nan")
        return StepOutput(loss, {"loss": loss.detach()})

    @torch.no_grad()
    def visualize(self, batch, ema):
        from ldm.io import make_grid

        net = ema if ema is not None else self.net
        return make_grid(torch.cat([batch["image"][:4], net(batch["image"][:4])]), nrow=4)


def toy_config(overrides: list[str]):
    from ldm.config import load_config

    # fp32 whatever the CPU: the toy's 1-vs-2-process tolerance is an fp32 one (auto would pick bf16 on native-bf16 CPUs)
    base = ["data.image_size=8", "train.batch_size=8", "train.log_every=1", "optim.lr=1e-2", "train.ema_decay=0.9",
            "train.mixed_precision=no"]
    return load_config(None, base + list(overrides))


def main(argv: list[str]) -> None:
    from ldm.data.images import build_dataset
    from ldm.train.loop import fit

    toy = {a.split("=")[0][4:]: float(a.split("=")[1]) for a in argv if a.startswith("toy.")}
    cfg = toy_config([a for a in argv if not a.startswith("toy.")])
    torch.manual_seed(0)
    task = ToyTask(nan_at_step=int(toy.get("nan_at_step", -1)), noise=toy.get("noise", 0.1))
    slow, dump = float(os.environ.get("TOY_STEP_SLEEP", "0")), os.environ.get("TOY_DUMP_DIR")
    if slow or dump:
        import hashlib
        import json
        import time

        inner = task.forward
        rank = os.environ.get("RANK", "0")

        def forward(batch, *, step, **kw):
            time.sleep(slow)
            if dump:  # weights entering step `step` = weights after step-1, one digest per step per rank
                digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in task.parameters()))
                with open(os.path.join(dump, f"rank{rank}.jsonl"), "a") as f:
                    f.write(json.dumps({"step": step, "sha": digest.hexdigest()}) + "\n")
            return inner(batch, step=step, **kw)

        task.forward = forward
    fit(cfg, task, build_dataset(cfg.data), progress=False)


if __name__ == "__main__":
    main(sys.argv[1:])
