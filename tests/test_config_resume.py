"""The resume contract's pure part (ldm.config): which config changes a resumed run may make, which it must refuse,
and the message that says so."""

import copy
import fnmatch

import pytest
from conftest import REPO

from ldm.config import (
    RESUME_MAY_CHANGE,
    Change,
    ConfigError,
    RunConfig,
    as_container,
    format_refusal,
    load_config,
    may_change_on_resume,
    resume_changes,
)

LEGACY = REPO / "tests" / "fixtures" / "legacy_run"


def _saved(*overrides: str) -> dict:
    """The plain config a checkpoint stores (the loop writes as_container(cfg))."""
    return as_container(load_config(None, list(overrides)))


def _keys(changes: list[Change]) -> list[str]:
    return [c.key for c in changes]


def test_same_config_has_no_changes():
    assert resume_changes(_saved("name=a", "seed=3"), load_config(None, ["name=a", "seed=3"])) == ([], [])


def test_schedule_cadence_and_sampling_changes_are_allowed():
    cfg = load_config(None, ["optim.lr=3e-4", "optim.schedule=cosine", "optim.warmup_steps=100", "train.max_steps=5000",
                             "train.ckpt_every=50", "optim.grad_clip=0.5", "sample.cfg_scale=4.0",
                             "eval.num_samples=500", "name=renamed", "train.run_root=/elsewhere"])
    allowed, refused = resume_changes(_saved(), cfg)
    assert refused == []
    assert Change("optim.lr", 1e-4, 3e-4) in allowed
    assert set(_keys(allowed)) == {"optim.lr", "optim.schedule", "optim.warmup_steps", "train.max_steps",
                                   "train.ckpt_every", "optim.grad_clip", "sample.cfg_scale", "eval.num_samples",
                                   "name", "train.run_root"}


@pytest.mark.parametrize("override, key, old, new", [
    ("seed=1", "seed", 0, 1),
    ("train.batch_size=64", "train.batch_size", 32, 64),
    ("train.grad_accum_steps=2", "train.grad_accum_steps", 1, 2),  # the data position counts micro-batches
    ("diffusion.prediction=eps", "diffusion.prediction", "velocity", "eps"),
    ("diffusion.path=gvp", "diffusion.path", "linear", "gvp"),
    ("model.preset=DiT-B/2", "model.preset", "DiT-S/2", "DiT-B/2"),
    ("data.source=/other/images", "data.source", "digits", "/other/images"),
    ("tokenizer.latent_channels=8", "tokenizer.latent_channels", 4, 8),
    ("stage=tokenizer", "stage", "generator", "tokenizer"),
    ("train.ema_decay=0.999", "train.ema_decay", 0.9999, 0.999),
    ("train.mixed_precision=fp16", "train.mixed_precision", "auto", "fp16"),
])
def test_experiment_changes_are_refused(override, key, old, new):
    allowed, refused = resume_changes(_saved(), load_config(None, [override]))
    assert allowed == [] and refused == [Change(key, old, new)]


def test_allowed_and_refused_are_split_in_schema_order():
    cfg = load_config(None, ["seed=2", "optim.lr=2e-4", "model.preset=DiT-B/2", "train.batch_size=16"])
    allowed, refused = resume_changes(_saved(), cfg)
    assert _keys(allowed) == ["optim.lr"]
    assert _keys(refused) == ["seed", "model.preset", "train.batch_size"]  # RunConfig's field order


def test_allow_changes_overrides_named_keys_and_patterns():
    cfg = load_config(None, ["seed=2", "model.preset=DiT-B/2", "model.use_qknorm=true", "train.batch_size=16",
                             "train.allow_changes=[seed,model.*]"])
    allowed, refused = resume_changes(_saved(), cfg)
    assert _keys(allowed) == ["seed", "model.preset", "model.use_qknorm", "train.allow_changes"]
    assert refused == [Change("train.batch_size", 32, 16)]


def test_allow_changes_of_the_old_run_do_not_carry_over():
    """The override is the resuming command's: one given when the checkpoint was written allows nothing now."""
    saved = _saved("train.allow_changes=[seed]")
    allowed, refused = resume_changes(saved, load_config(None, ["seed=5"]))
    assert refused == [Change("seed", 0, 5)] and _keys(allowed) == ["train.allow_changes"]


def test_allow_changes_typo_fails_at_load():
    with pytest.raises(ConfigError, match=r"train.allow_changes: 'trian.batch_size' names no config key; did you "
                                          r"mean 'train.batch_size'\?"):
        load_config(None, ["train.allow_changes=[trian.batch_size]"])
    with pytest.raises(ConfigError, match=r"'zzz\.\*' names no config key"):
        load_config(None, ["train.allow_changes=[zzz.*]"])
    assert load_config(None, ["train.allow_changes=[eval.*,seed]"]).train.allow_changes == ["eval.*", "seed"]


def test_key_missing_from_an_old_checkpoint_compares_as_its_default():
    saved = _saved()
    del saved["train"]["allow_changes"]  # added to the schema after this "old" checkpoint was written
    del saved["diffusion"]["cos_loss_weight"]
    del saved["tokenizer"]["vq"]  # a whole section
    assert resume_changes(saved, load_config(None, [])) == ([], [])
    _, refused = resume_changes(saved, load_config(None, ["diffusion.cos_loss_weight=1.0", "tokenizer.vq.beta=0.5"]))
    assert refused == [Change("tokenizer.vq.beta", 0.25, 0.5), Change("diffusion.cos_loss_weight", 0.0, 1.0)]


def test_key_the_schema_no_longer_has_is_ignored():
    saved = _saved()
    saved["train"]["retired_option"] = 7
    saved["retired_section"] = {"x": 1}
    assert resume_changes(saved, load_config(None, [])) == ([], [])


def test_lists_compare_by_value():
    saved = _saved("tokenizer.block_out_channels=[32,64]", "optim.betas=[0.9,0.95]")
    same = load_config(None, ["tokenizer.block_out_channels=[32,64]", "optim.betas=[0.9,0.95]"])
    assert resume_changes(copy.deepcopy(saved), same) == ([], [])
    saved["optim"]["betas"] = (0.9, 0.95)  # a tuple where the checkpoint held one
    saved["tokenizer"]["attn_levels"] = ()
    assert resume_changes(saved, same) == ([], [])
    _, refused = resume_changes(saved, load_config(None, ["tokenizer.block_out_channels=[32,64,64]",
                                                          "optim.betas=[0.9,0.95]"]))
    assert refused == [Change("tokenizer.block_out_channels", [32, 64], [32, 64, 64])]
    _, refused = resume_changes(saved, load_config(None, ["tokenizer.block_out_channels=[64,32]",
                                                          "optim.betas=[0.9,0.95]"]))
    assert _keys(refused) == ["tokenizer.block_out_channels"]  # order matters


def test_nested_sequences_compare_by_value():
    saved = _saved()
    saved["sample"]["interval"] = (0.0, 0.7)
    allowed, refused = resume_changes(saved, load_config(None, ["sample.interval=[0.0,0.7]"]))
    assert (allowed, refused) == ([], [])


def test_may_change_patterns_each_name_keys_and_carry_a_reason():
    keys = list(_flat_keys(as_container(RunConfig())))
    for pattern, reason in RESUME_MAY_CHANGE.items():
        assert reason.strip(), pattern
        assert any(fnmatch.fnmatchcase(key, pattern) for key in keys), f"{pattern} matches no config key"
    assert may_change_on_resume("eval.extractor") and may_change_on_resume("sample.sampler")
    assert not may_change_on_resume("seed") and may_change_on_resume("seed", ["seed"])
    assert not may_change_on_resume("tokenizer.pretrained") and may_change_on_resume("tokenizer.checkpoint")


def _flat_keys(node: dict, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _flat_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def test_refusal_message_has_one_line_per_key_and_the_ways_forward():
    cfg = load_config(None, ["seed=1", "train.batch_size=64", "model.preset=DiT-B/2"])
    _, refused = resume_changes(_saved(), cfg)
    text = format_refusal(refused, "runs/x/checkpoints/step_0000100")
    lines = text.splitlines()
    assert "runs/x/checkpoints/step_0000100" in lines[0] and "change the experiment" in lines[0]
    assert lines[1:4] == ["  seed: 0 -> 1", "  model.preset: 'DiT-S/2' -> 'DiT-B/2'", "  train.batch_size: 32 -> 64"]
    assert len(lines) == 5
    assert "name=" in lines[4] and "train.allow_changes=[seed,model.preset,train.batch_size]" in lines[4]


def test_the_suggested_override_is_accepted():
    """The dotlist the message proposes parses, validates and then allows exactly the refused changes."""
    overrides = ["seed=1", "train.batch_size=64", "model.preset=DiT-B/2"]
    _, refused = resume_changes(_saved(), load_config(None, overrides))
    suggestion = format_refusal(refused).split("train.allow_changes=")[1].split(" ")[0]
    resumed = load_config(None, [*overrides, f"train.allow_changes={suggestion}"])
    allowed, refused_now = resume_changes(_saved(), resumed)
    assert refused_now == [] and {c.key for c in refused} <= set(_keys(allowed))


@pytest.mark.parametrize("run, overrides", [
    ("gen", ["tokenizer.checkpoint={root}/tok", "train.max_steps=4"]),  # what tests/test_legacy_run.py resumes with
    ("tok", ["train.max_steps=4"]),
])
def test_legacy_run_resumes_without_refusals(run, overrides):
    """A checkpoint written before train.allow_changes existed resumes with its own config.yaml, relocated."""
    import torch

    root = "/moved/legacy_run"
    state = torch.load(LEGACY / run / "checkpoints" / "step_0000002" / "state.pt", map_location="cpu",
                       weights_only=True)
    assert "allow_changes" not in state["config"]["train"]
    cfg = load_config(LEGACY / run / "config.yaml",
                      [f"train.run_root={root}", *(item.format(root=root) for item in overrides)])
    allowed, refused = resume_changes(state["config"], cfg)
    assert refused == []
    assert {"train.run_root", "train.max_steps"} <= set(_keys(allowed))
