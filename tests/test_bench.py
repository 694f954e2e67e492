"""The benchmark scripts run: bench/gpu.py --smoke writes every section without an error (CI's check that the GPU
script does not crash; the GPU numbers themselves come from `bash bench/gpu.sh` on a GPU), and the CPU benchmarks
finish at their smallest settings (slow: each spends most of its ~15 s importing torch, diffusers and ldm)."""

import json
import sys

import pytest

from conftest import REPO, run_python


@pytest.mark.slow  # ~22 s: every section of bench/gpu.py at toy sizes on the CPU
def test_gpu_smoke_writes_every_section(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    from gpu import SECTIONS

    out = tmp_path / "bench_gpu.json"
    run_python(["bench/gpu.py", "--smoke", "--out", str(out)], timeout=240)
    data = json.loads(out.read_text())
    assert set(data["sections"]) == set(SECTIONS)
    errors = {k: v["error"] for k, v in data["sections"].items() if "error" in v}
    assert not errors, errors
    s = data["sections"]
    for name in ("dit_train_eager", "dit_compiled_ours", "dit_compiled_diffusers"):
        for r in s[name]["results"].values():
            assert r["img_s"] > 0 and 0 < r["mfu"] < 1 and r["tflops"] > 0, (name, r)
    assert s["dit_train_eager"]["speed_ours_over_diffusers"] > 0
    assert {"sdpa", "math", "xformers"} <= set(s["attention"]["results"])
    assert s["attention"]["results"]["sdpa"]["img_s"] > 0
    assert set(s["tokenizer_train"]["results"]) == {"bf16", "fp32"}
    assert s["tokenizer_train"]["speed_bf16_over_fp32"] > 0
    assert s["inception"]["speed_ours_over_torch_fidelity"] > 0
    assert s["sampling"]["config"]["nfe"] == 2 * s["sampling"]["config"]["sample_steps"] - 1  # Heun: 2n - 1
    assert s["sampling"]["results"]["ours"]["img_s"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("args, expect", [
    (["bench/bench_dit.py", "--configs", "pico", "--steps", "1", "--warmup", "0", "--side-by-side", "--no-memory"],
     "default settings"),
    (["bench/bench_loop.py", "--steps", "2", "--warmup", "1", "--rounds", "1", "--set",
      "generator.model.preset=DiT-Pico/2"], "ldm fit / bare loop:"),
    (["bench/bench_tokenizer.py", "--presets", "tiny_f4", "--batch", "1", "--size", "32", "--steps", "1",
      "--compare-bf16"], "bf16 autocast vs fp32"),
    (["bench/bench_samplers.py", "--compare-bf16", "--models", "tiny", "--batch", "tiny=1", "--repeats", "1"],
     "| tiny | 1 | heun (49 NFE) |"),
    (["bench/profile_quickstart.py", "--steps", "2", "--warmup", "1", "--set", "generator.model.preset=DiT-Pico/2",
      "tokenizer.train.batch_size=4", "generator.train.batch_size=8", "generator.sample.batch_size=8"],
     "| tokenizer + GAN |"),
], ids=["dit", "loop", "tokenizer", "samplers", "profile"])
def test_cpu_benchmarks_run_at_smallest_settings(args, expect):
    proc = run_python(args, timeout=300)
    assert expect in proc.stdout, proc.stdout[-2000:]
