"""Sharded evaluation: 1 process and 2 processes (`accelerate launch --multi_gpu --num_processes 2`, which runs a
gloo group on a CPU machine) give identical numbers.

Run as a script (`accelerate launch ... tests/test_eval_distributed.py OUT SAMPLES REF`), this file is the worker:
it evaluates generation and reconstruction metrics and rank 0 writes them as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


def worker(out: str, samples: str, ref: str) -> None:
    sys.path.insert(0, str(REPO))
    import torch

    from ldm.eval.evaluate import evaluate_reconstruction, evaluate_samples
    from ldm.eval.features import dist_info

    gen = evaluate_samples(samples, ref, extractor="digits", batch_size=24, use_cache=False, progress=False)
    rec = evaluate_reconstruction(lambda x: torch.nn.functional.avg_pool2d(x, 3, 1, 1), samples, extractor="digits",
                                  metrics=("rfd", "psnr", "ssim"), batch_size=24, use_cache=False, progress=False)
    rank, world = dist_info()
    if rank == 0:
        Path(out).write_text(json.dumps({"world": world, "gen": gen, "rec": rec}))


@pytest.mark.slow  # ~33 s of torchrun; the default run's two-process checks are sampling, the cache and training
def test_one_and_two_processes_agree(tmp_path):
    from conftest import run_python

    from ldm.encoders.digits import digits_split

    tr_x, _, te_x, _ = digits_split()
    np.savez(tmp_path / "samples.npz", arr_0=te_x[:101])  # odd count: the two shards differ in size
    np.savez(tmp_path / "ref.npz", arr_0=tr_x[:150])
    args = [str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz")]
    run_python([__file__, str(tmp_path / "one.json"), *args], timeout=300)
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]
    run_python([*launch, __file__, str(tmp_path / "two.json"), *args], timeout=300)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["world"] == 1 and two["world"] == 2
    assert one["gen"]["num_samples"] == 101 and one["rec"]["num_images"] == 101
    assert one["gen"] == two["gen"] and one["rec"] == two["rec"]  # bit-identical numbers


if __name__ == "__main__":
    worker(*sys.argv[1:4])
