"""Generator networks: DiT / LightningDiT (dit.py), the diffusers UNet adapter (unet.py), shared layers (layers.py),
the name -> factory dict `GENERATORS` (generators.py) and the importer of official DiT / SiT / LightningDiT weights
(checkpoints.py).

Both networks share one interface: `net(x, t, y, *, return_hidden=False, force_drop=None, generator=None)` with
x (B, C, H, W) latents, t (B,) in [0, 1] (t = 0 data, t = 1 noise), y (B,) class ids or None (null label)."""

from ldm.models.generators import GENERATORS, build_generator_model

__all__ = ["GENERATORS", "build_generator_model"]
