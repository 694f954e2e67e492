"""train.compile: what each task compiles, the timed first step, the eager fallback (one warning, bit-identical to
an eager run) and resume of a compiled run.

The fallback tests use the toy task and a compiler backend that fails, so they take seconds; the DiT tests compile
with inductor on the CPU (a C++ compiler is needed; the first run fills torch's on-disk cache, which makes later runs
much faster)."""

import json
import logging
from functools import partial

import pytest
import torch
from test_generator_task import _cfg, vae_dir  # noqa: F401  (vae_dir is a fixture)
from toy import ToyTask, toy_config

from ldm.data.images import build_dataset
from ldm.train.generator_task import build_generator_task
from ldm.train.loop import fit


class CompiledToy(ToyTask):
    def compile_modules(self, compile_fn):
        compile_fn(self.net)
        return ["net"]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def warnings_of_ldm():
    """WARNING lines of the 'ldm' logger (which does not propagate to pytest's caplog)."""
    handler = _Records()
    logger = logging.getLogger("ldm")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: a failed compilation must not leave state that a later test inherits."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _fit_toy(root, name, *extra, task_cls=CompiledToy):
    cfg = toy_config([f"train.run_root={root}", f"name={name}", "train.max_steps=4", "train.ckpt_every=1000",
                      *extra])
    torch.manual_seed(0)
    task = task_cls()
    fit(cfg, task, build_dataset(cfg.data), progress=False)
    return task


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _failing_backend(gm, example_inputs):
    raise RuntimeError("no C++ compiler found\n(a long compiler log follows)")


def _failing_backward_backend():
    """Forward compiles (as the FX graph itself); the backward's compiler fails, when the first backward runs."""
    from torch._dynamo.backends.common import aot_autograd

    def fail(gm, example_inputs):
        raise RuntimeError("unsupported op in backward")

    return aot_autograd(fw_compiler=lambda gm, example_inputs: gm.forward, bw_compiler=fail)


def test_without_compile_the_task_hook_is_not_called(tmp_path, monkeypatch):
    monkeypatch.setattr(CompiledToy, "compile_modules", lambda self, fn: pytest.fail("compile_modules called"))
    _fit_toy(tmp_path, "off")


@pytest.mark.parametrize("where", ["wrap", "forward", "backward"])
def test_a_failed_compilation_falls_back_with_one_warning_and_eager_weights(tmp_path, monkeypatch, where,
                                                                             warnings_of_ldm):
    eager = _fit_toy(tmp_path, "eager")
    real = torch.compile
    if where == "wrap":
        monkeypatch.setattr(torch, "compile", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("not supported")))
    else:
        backend = _failing_backend if where == "forward" else _failing_backward_backend()
        monkeypatch.setattr(torch, "compile", partial(real, backend=backend))
    task = _fit_toy(tmp_path, "fallback", "train.compile=true")
    assert len(warnings_of_ldm) == 1, warnings_of_ldm
    assert warnings_of_ldm[0].startswith("train.compile:") and "training continues eagerly" in warnings_of_ldm[0]
    assert ("not supported" if where == "wrap" else "unsupported op" if where == "backward"
            else "no C++ compiler found") in warnings_of_ldm[0]
    assert "\n" not in warnings_of_ldm[0]
    assert task.net._compiled_call_impl is None  # eager again
    _same_weights(task, eager)  # no step lost or run twice, the same draws
    rows = [json.loads(line) for line in (tmp_path / "fallback" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    assert not any("train/compile_s" in r for r in rows)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_dit_generator_trains_and_keeps_its_state_names(tmp_path, vae_dir, warnings_of_ldm,  # noqa: F811
                                                                 backend, monkeypatch):
    """train.compile=true compiles each DiT block in place, trains 3 finite steps, logs the compiling step apart and
    leaves the checkpoint's names as an eager run's. aot_eager traces forward and backward as inductor does but runs
    the traced graphs without generating code (seconds); inductor, torch.compile's default, takes ~30-60 s on a
    busy 2-core CPU with a cold cache."""
    if backend != "inductor":
        monkeypatch.setattr(torch, "compile", partial(torch.compile, backend=backend))
    counters = torch._dynamo.utils.counters
    graphs_before = counters["stats"]["unique_graphs"]
    cfg = _cfg(tmp_path, vae_dir, "train.max_steps=3", "train.log_every=1", "train.compile=true")
    torch.manual_seed(0)
    task, data = build_generator_task(cfg)
    eager_keys = list(task.state_dict())
    fit(cfg, task, data, progress=False)
    assert warnings_of_ldm == []
    assert all(b._compiled_call_impl is not None for b in task.model.blocks)  # the blocks that ran were compiled
    assert task.model.final_layer._compiled_call_impl is None
    assert counters["stats"]["unique_graphs"] > graphs_before
    assert list(task.state_dict()) == eager_keys
    rows = [json.loads(line) for line in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    compile_s = [r["train/compile_s"] for r in rows if "train/compile_s" in r]
    assert len(compile_s) == 1 and compile_s[0] > 0
    speeds = {r["step"]: r.get("train/images_per_s") for r in rows if "train/loss" in r}
    assert speeds[1] is None and speeds[2] > 0 and speeds[3] > 0  # the compiling step is not in images/s
    assert "compile + first step:" in (tmp_path / "g" / "train.log").read_text()


@pytest.mark.slow
def test_compiled_dit_resume_matches_an_uninterrupted_compiled_run(tmp_path, vae_dir):  # noqa: F811
    """Bit-exact (inductor): the resumed run compiles the same graphs, which compute the same numbers on the same
    device."""
    from ldm.runs import load_checkpoint

    def run(name, steps):
        cfg = _cfg(tmp_path, vae_dir, "name=" + name, f"train.max_steps={steps}", "train.compile=true")
        torch.manual_seed(0)
        task, data = build_generator_task(cfg)
        fit(cfg, task, data, progress=False)

    run("straight", 4)
    run("resumed", 2)
    run("resumed", 4)
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "step_0000004")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "step_0000004")
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k}"


def test_compile_modules_of_each_task():
    """DiT: every block; UNet: diffusers' UNet2DModel; tokenizer: encoder and decoder, not the discriminator."""
    from ldm.models.dit import build_dit
    from ldm.models.unet import UNetGenerator
    from ldm.train.generator_task import GeneratorTask
    from ldm.train.tokenizer_task import TokenizerTask

    seen = []

    class Stub:
        def __init__(self, model):
            self.model = model

    dit = build_dit("DiT-Pico/2", input_size=8, in_channels=4, num_classes=0)
    assert GeneratorTask.compile_modules(Stub(dit), seen.append) == ["model.blocks.0", "model.blocks.1"]
    assert seen == list(dit.blocks)
    unet = UNetGenerator(input_size=8, in_channels=4, block_out_channels=(32, 32), layers_per_block=1)
    seen.clear()
    assert GeneratorTask.compile_modules(Stub(unet), seen.append) == ["model.unet"] and seen == [unet.unet]

    class TokStub:
        autoencoder = torch.nn.Module()
        autoencoder.encoder, autoencoder.decoder = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)

        def frozen(self, name):
            return None

    seen.clear()
    tok = TokStub()
    assert TokenizerTask.compile_modules(tok, seen.append) == ["autoencoder.encoder", "autoencoder.decoder"]
    assert seen == [tok.autoencoder.encoder, tok.autoencoder.decoder]
    assert ToyTask().compile_modules(seen.append) == []  # Task's default
