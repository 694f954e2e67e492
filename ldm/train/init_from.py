"""`train.init_from`: a generator run that starts from another generator run's weights (post-training).

The new run is a new experiment: step 0, a fresh optimizer and lr schedule, its own seed, data order and objective
(e.g. diffusion.pixel_loss or diffusion.lpl switched on); only the network's weights, and the latent normalisation
they were trained in, come from the source, as `train.init_weights` says: "ema" (the source's EMA copy) or "raw"
(its trained network). The EMA of the new run starts from the loaded weights (it copies the network when the loop
starts). REPA's projector is not carried over (a new projector is initialised as in any run).

Refused with one line, before training: a source that is not a generator run (a tokenizer run), one trained on
another tokenizer (fingerprint), latent shape or number of classes, another network (the model.* keys that define
it, then every parameter's shape), another latent normalisation kind, "ema" from a run without EMA. On resume the
run's own checkpoint replaces these weights (the loop restores it after the task is built), so a resumed run is
bit-exact whatever the source holds by then.
"""

from __future__ import annotations

import logging

import torch

from ldm.config import ConfigError, RunConfig

log = logging.getLogger(__name__)

# model.* keys that only change how a network trains or runs, not which parameters it has
_NOT_ARCHITECTURE = ("class_dropout", "grad_checkpointing", "attention")


def init_generator_from(task, cfg: RunConfig) -> None:
    """Load train.init_from's weights into `task` (a GeneratorTask) in place; nothing when it is unset."""
    t = cfg.train
    if t.init_from is None:
        if t.init_weights is not None:
            raise ConfigError(f"train.init_weights={t.init_weights!r} without train.init_from: set train.init_from="
                              f"<generator run> or leave train.init_weights out")
        return
    if t.init_weights is None:
        raise ConfigError(f"train.init_from={t.init_from} needs train.init_weights=ema or train.init_weights=raw "
                          f"(which of its weights to start from)")
    from ldm.runs import load_checkpoint, resolve_checkpoint

    try:
        ckpt_dir = resolve_checkpoint(t.init_from)
    except FileNotFoundError as err:
        raise ConfigError(f"train.init_from: {err}") from None
    ckpt = load_checkpoint(ckpt_dir)
    facts = ckpt["state"].get("task", {})
    where = f"train.init_from={t.init_from}"
    if facts.get("kind") != "generator":
        raise ConfigError(f"{where} is a {facts.get('kind', 'tokenizer')} run, not a generator run: point it at a "
                          f"generator run (a tokenizer is chosen with tokenizer.checkpoint)")
    _check_same_setting(task, cfg, ckpt, facts, where)
    weights = ckpt["ema"] if t.init_weights == "ema" else _prefixed(ckpt["model"], "model.")
    if weights is None:
        raise ConfigError(f"{where} has no EMA weights (it ran with train.ema=false): use train.init_weights=raw")
    _check_shapes(task.model, weights, where)
    task.model.load_state_dict(weights, strict=True)
    task.normalizer.load_state_dict(_prefixed(ckpt["model"], "normalizer."), strict=True)
    log.info("initialised the generator from %s (%s weights): fresh optimizer, step 0", ckpt_dir, t.init_weights)


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _check_same_setting(task, cfg: RunConfig, ckpt: dict, facts: dict, where: str) -> None:
    """Tokenizer, latent shape, classes, normalisation kind and the network-defining model.* keys of the source."""
    tok = task.tokenizer
    if facts.get("tokenizer_fingerprint") != tok.fingerprint:
        raise ConfigError(f"{where} was trained on tokenizer {facts.get('tokenizer_source')!r} (fingerprint "
                          f"{facts.get('tokenizer_fingerprint')}), this run uses {tok.source!r} ({tok.fingerprint}): "
                          f"set tokenizer.checkpoint to the source's tokenizer or start from a run trained on this one")
    for key, mine, theirs in (("latent shape", list(task.latent_shape), facts.get("latent_shape")),
                              ("number of classes", task.num_classes, facts.get("num_classes")),
                              ("diffusion.latent_norm", task.normalizer.kind, facts.get("latent_norm"))):
        if mine != theirs:
            raise ConfigError(f"{where} has {key} {theirs!r}, this run {mine!r}: the weights do not fit; use the "
                              f"source's setting or another source run")
    saved_model = ckpt["state"].get("config", {}).get("model", {})
    for key, value in vars(cfg.model).items():
        if key in _NOT_ARCHITECTURE or key not in saved_model:
            continue
        theirs = saved_model[key]
        if (list(value) if isinstance(value, tuple) else value) != theirs:
            raise ConfigError(f"{where} is another architecture: it has model.{key}={theirs!r}, this run "
                              f"model.{key}={value!r}; set model.{key}={theirs} or start from a matching run")


def _check_shapes(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    wrong = [k for k in own if k in weights and own[k].shape != weights[k].shape]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"{wrong[0]} is {tuple(weights[wrong[0]].shape)} there, {tuple(own[wrong[0]].shape)} here")
        raise ConfigError(f"{where} is another architecture ({detail}); start from a run with this run's model.*")
