"""The names a config may choose from, as plain tuples, so that ldm.config validates them at load time without torch.

Each tuple names the keys of one registry that lives higher up, beside its implementations:
  SAMPLER_NAMES     ldm.diffusion.samplers.SAMPLERS           (sample.sampler)
  DIT_PRESET_NAMES  ldm.models.dit.DIT_PRESETS                (model.preset when model.arch=dit)
  EXTRACTOR_NAMES   ldm.eval.extractors.EXTRACTORS            (eval.extractor, pipeline fid_extractors)
  ENCODER_NAMES     ldm.encoders.ENCODERS plus "digits"       (tokenizer.va.encoder, diffusion.repa_encoder)
  TOKENIZER_KINDS   the tokenizer kinds ldm.tokenizers builds (tokenizer.kind)
tests/test_config.py checks that every tuple equals its registry, so adding a choice means adding its name here too.
"""

from __future__ import annotations

SAMPLER_NAMES = ("ddpm", "ddim", "dpm_solver++", "euler", "heun", "dopri5", "euler_maruyama")

# "DiT-<size>/<patch>" (DiT Table 1 sizes plus our small CPU sizes Ti and Pico) and the LightningDiT variants.
_DIT_SIZES = ("XL", "L", "B", "S", "Ti", "Pico")
DIT_PRESET_NAMES = (tuple(f"DiT-{size}/{p}" for size in _DIT_SIZES for p in (1, 2, 4, 8))
                    + tuple(f"LightningDiT-{size}/{p}" for size in _DIT_SIZES for p in (1, 2)))

EXTRACTOR_NAMES = ("inception", "dinov2", "digits")

ENCODER_NAMES = (tuple(f"dinov2_vit{s}14{reg}" for s in ("s", "b", "l", "g") for reg in ("", "_reg4"))
                 + ("mae_vitb16", "mae_vitl16", "mae_vith14", "digits"))

TOKENIZER_KINDS = ("kl", "vq", "fsq", "litevae", "dc")
