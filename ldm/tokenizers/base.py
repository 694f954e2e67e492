"""The tokenizer-kind interface: what every kind of autoencoder supports (the registry is ldm.tokenizers.kinds).

A kind knows how to build its autoencoder from the config (`tokenizer.kind`), record and rebuild its architecture,
encode for training (the latent to decode and the kind's own loss term), encode and decode for inference, where the
adaptive weights read their gradients, and how it is written to and read from an export folder. Everything that
handles tokenizers (ldm.tokenizers.export: build / load / export / the frozen `Tokenizer`; the TokenizerTask; the
VA-VAE regulariser; `ldm eval latents`) goes through `kind_of(model)` or `KINDS[name]`.

Families decide what the rest of the framework may ask of a kind:

    gaussian       a posterior q(z|x) = N(mean, exp(logvar)) (`posterior`); trained with LDM's NLL through the
                   scalar log-variance (losses.nll_loss) plus its KL term; inference encodes the posterior mean
    quantised      a finite code set (`indices`, `codebook_size`); trained with the mean reconstruction loss plus its
                   codebook terms (if any); `ldm eval latents` reports code usage
    deterministic  a plain autoencoder: z = E(x), trained with the mean reconstruction loss

Adding a kind "foo": write ldm/tokenizers/foo.py with its nn.Module and a `TokenizerKind` subclass `FooKind`, add
an instance to `KINDS` in ldm/tokenizers/kinds.py and its name to ldm.names.TOKENIZER_KINDS (tests/test_config.py
checks that the two agree).
Kinds whose network is not a diffusers class export to ldm's own folder (`tokenizer_config.json` = the architecture
record, `tokenizer.safetensors` = the inference weights), which `load_tokenizer` reads back.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file
from torch import nn

from ldm.io import atomic_write_text, save_tensors

FAMILIES = ("gaussian", "quantised", "deterministic")
LDM_CONFIG_FILE = "tokenizer_config.json"   # ldm's own export folder: {"kind": ..., "config": ...}
LDM_WEIGHTS_FILE = "tokenizer.safetensors"
# the weights files diffusers' from_pretrained looks for, preferred first (no variants: ldm never passes one)
DIFFUSERS_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                          "diffusion_pytorch_model.bin")


class Posterior(NamedTuple):
    """Diagonal Gaussian q(z|x): mean and log-variance, each (B, C, h, w)."""
    mean: torch.Tensor
    logvar: torch.Tensor

    def sample(self, generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """z = mean + exp(logvar / 2) * eps (reparameterisation, Kingma & Welling 2014 Eq. 10). eps comes from
        `generator`: one, one per sample (a list of B: sample i's eps from generator i, whatever batch it is in), or
        None (torch's global RNG)."""
        if generator is None or isinstance(generator, torch.Generator):
            eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        else:
            if len(generator) != self.mean.shape[0]:
                raise ValueError(f"got {len(generator)} generators for a batch of {self.mean.shape[0]}")
            eps = torch.stack([torch.randn(self.mean.shape[1:], generator=g, device=g.device, dtype=self.mean.dtype)
                               for g in generator]).to(self.mean.device)  # (B, C, h, w)
        return self.mean + torch.exp(0.5 * self.logvar) * eps


class Encoded(NamedTuple):
    """A training-time encoding: the latent the decoder reconstructs from, the kind's own (weighted) loss term
    (0-dim; KL: kl_weight * KL; VQ: codebook + commitment + entropy; 0 when it has none) and scalars to log."""
    z: torch.Tensor
    loss: torch.Tensor
    logs: dict[str, torch.Tensor]


class TokenizerKind(ABC):
    """The operations one kind of autoencoder supports (see the module docstring). Methods take the module."""

    name: str = ""
    family: str = "deterministic"
    module_type: type = nn.Module
    regularisers: tuple[str, ...] = ("eq", "va")   # tokenizer regularisers (REGULARISERS keys) that apply to it

    # ---------------------------------------------------------------------------------------------- build / arch
    def owns(self, model: nn.Module) -> bool:
        return type(model) is self.module_type

    @abstractmethod
    def build(self, cfg, image_size: int) -> nn.Module:
        """A randomly initialised autoencoder from a TokenizerCfg."""

    def arch(self, model: nn.Module) -> dict[str, Any]:
        """JSON-able constructor arguments that `from_arch` rebuilds the (untrained) network from."""
        return dict(model.config)

    def from_arch(self, config: dict[str, Any]) -> nn.Module:
        return self.module_type(**config)

    def downsample(self, model: nn.Module) -> int:
        return model.downsample

    def latent_channels(self, model: nn.Module) -> int:
        return model.latent_channels

    def configured_latent_channels(self, cfg) -> tuple[str, Any, int]:
        """(the TokenizerCfg key that sets the latent channels the generator sees, its value, those channels), read
        from the config alone (the latent cache's consistency check names this key)."""
        return "tokenizer.latent_channels", cfg.latent_channels, cfg.latent_channels

    def training_buffers(self) -> tuple[str, ...]:
        """state_dict entries used only while training (left out of exports and fingerprints)."""
        return ()

    # ---------------------------------------------------------------------------------------------- encode / decode
    def encode_train(self, model: nn.Module, x: torch.Tensor, *, cfg,
                     draws: Sequence[torch.Generator] | None) -> Encoded:
        """The training encoding of images x (B, 3, H, W); `draws` are per-sample generators for any noise the
        kind adds (None: torch's global RNG); `cfg` the TokenizerCfg (loss weights)."""
        z = model.encode(x)
        return Encoded(z, z.new_zeros(()), {})

    def encode(self, model: nn.Module, x: torch.Tensor, *, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """The inference latent of images x: deterministic unless `sample` (gaussian kinds: a posterior sample)."""
        return model.encode(x)

    def decode(self, model: nn.Module, z: torch.Tensor) -> torch.Tensor:
        return model.decode(z)

    def posterior(self, model: nn.Module, x: torch.Tensor) -> Posterior:
        raise ValueError(f"posterior() is defined for gaussian tokenizers only; {self.name!r} is {self.family}")

    def indices(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"code indices are defined for quantised tokenizers only; {self.name!r} is {self.family}")

    def codebook_size(self, model: nn.Module) -> int:
        raise ValueError(f"{self.name!r} tokenizers have no codebook")

    def encoder_last_layer(self, model: nn.Module) -> torch.Tensor:
        """The weight VA-VAE's adaptive VF weight differentiates at (the encoder's output conv)."""
        return model.encoder.conv_out.weight

    def decoder_last_layer(self, model: nn.Module) -> torch.Tensor:
        """The weight the adaptive GAN weight differentiates at (Esser et al. 2021 Eq. 7: the decoder's last layer)."""
        return model.decoder.conv_out.weight

    # ---------------------------------------------------------------------------------------------- folders
    def is_folder(self, folder: Path) -> bool:
        """Whether `folder` is an export of this kind (ldm's own folder format by default)."""
        record = folder / LDM_CONFIG_FILE
        return record.is_file() and json.loads(record.read_text()).get("kind") == self.name

    def save_folder(self, model: nn.Module, out_dir: Path, *, stats, scaling_factor: float | None) -> None:
        """Write the inference network to out_dir (ldm's folder: architecture record + safetensors weights)."""
        skip = set(self.training_buffers())
        save_tensors(out_dir / LDM_WEIGHTS_FILE, {k: v for k, v in model.state_dict().items() if k not in skip})
        atomic_write_text(out_dir / LDM_CONFIG_FILE,
                          json.dumps({"kind": self.name, "config": self.arch(model)}, indent=2) + "\n")

    def load_folder(self, folder: Path) -> tuple[nn.Module, Any, float | None]:
        """(network, latent statistics found in the folder's own config or None, scaling factor or None)."""
        weights = folder / LDM_WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"tokenizer folder {str(folder)!r} has {LDM_CONFIG_FILE} but no {LDM_WEIGHTS_FILE}")
        model = self.from_arch(json.loads((folder / LDM_CONFIG_FILE).read_text())["config"])
        load_strict(model, load_file(str(weights)), str(weights), allow_missing=self.training_buffers())
        return model, None, None


def load_strict(model: nn.Module, state: dict, what: str, allow_missing: Sequence[str] = ()) -> None:
    """load_state_dict that names the file and the first mismatching keys instead of torch's wall of text."""
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in allow_missing]
    if missing or result.unexpected_keys:
        raise ValueError(f"{what}: weights do not match the tokenizer architecture; missing keys {missing[:8]}, "
                         f"unexpected keys {result.unexpected_keys[:8]}")


def load_diffusers_strict(cls: type, folder: Path, *, example_repo: str) -> nn.Module:
    """cls.from_pretrained(folder) (a diffusers model class; config.json already checked) from local files only,
    refusing with one line naming the weights file what diffusers would let through or report as a traceback: no
    weights file, an unreadable file or tensors of other shapes than config.json says (errors), and tensors missing
    from the file (diffusers initialises them at random with only a warning) or extra tensors (ignored, a warning).
    `example_repo` names a hub folder for the download hint."""
    config = folder / "config.json"
    weights = next((folder / name for name in DIFFUSERS_WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder / DIFFUSERS_WEIGHT_FILES[0]} does not exist: the {cls.__name__} folder has "
                                f"config.json but no weights (download the whole folder, e.g. `huggingface-cli "
                                f"download {example_repo} --local-dir {folder}`)")
    try:
        model, info = cls.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    except (OSError, ValueError) as err:  # unreadable file, tensors of other shapes than config.json says
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{weights}: cannot be loaded as the {cls.__name__} of {config} ({first})") from None
    if info["missing_keys"] or info["unexpected_keys"]:
        raise ValueError(f"{weights}: weights do not match {config}: missing keys {sorted(info['missing_keys'])[:8]}, "
                         f"unexpected keys {sorted(info['unexpected_keys'])[:8]}")
    return model
