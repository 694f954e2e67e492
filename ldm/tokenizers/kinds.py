"""The registry of tokenizer kinds: `KINDS[name]` and `kind_of(model)` (the interface: ldm.tokenizers.base).

Adding a kind: its module defines a `TokenizerKind` subclass; add an instance below and its name to
ldm.names.TOKENIZER_KINDS (tests/test_config.py checks that the two agree).
"""

from __future__ import annotations

from torch import nn

from ldm.tokenizers.base import TokenizerKind
from ldm.tokenizers.dcae import DCKind
from ldm.tokenizers.fsq import FSQKind
from ldm.tokenizers.kl import KLKind
from ldm.tokenizers.litevae import LiteVAEKind
from ldm.tokenizers.vq import VQKind

KINDS: dict[str, TokenizerKind] = {k.name: k for k in (KLKind(), VQKind(), FSQKind(), LiteVAEKind(), DCKind())}


def get_kind(name: str) -> TokenizerKind:
    """The kind called `name` (tokenizer.kind), or a ValueError naming the ones there are."""
    if name not in KINDS:
        raise ValueError(f"tokenizer.kind={name!r}; expected one of {sorted(KINDS)}")
    return KINDS[name]


def kind_of(model: nn.Module) -> TokenizerKind:
    """The kind whose autoencoder `model` is."""
    for kind in KINDS.values():
        if kind.owns(model):
            return kind
    raise TypeError(f"not a tokenizer autoencoder: {type(model).__name__} (kinds: {sorted(KINDS)})")
