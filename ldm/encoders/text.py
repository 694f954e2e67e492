"""Frozen text encoders from `transformers` (CLIP's text tower, T5's encoder): captions -> per-token embeddings,
a padding mask and a pooled embedding, the condition of text-to-image generators (ldm/models/text_cond.py).

    CLIP   CLIPTextModel (Radford et al. 2021, arXiv:2103.00020), as Stable Diffusion 1.x (Rombach et al. 2022,
           arXiv:2112.10752 §4.3.2) uses it: tokens = the last hidden state (B, L, D), pooled = `pooler_output`, the
           final-layer-normed state of the end-of-text token (CLIP's text embedding before its projection).
    T5     T5EncoderModel (Raffel et al. 2020, arXiv:1910.10683), as PixArt-alpha (Chen et al. 2023,
           arXiv:2310.00426 §2.3: T5-XXL (4.3B), 120 tokens) uses it: tokens = the last hidden state. T5 has no pooled
           output; ours is the mean of the token states over the real (unpadded) tokens (our choice; PixArt uses
           none, SD3 takes its pooled vector from CLIP instead).

Captions are padded / truncated to `max_tokens` (CLIP: 77 positions at most; PixArt-alpha: 120 T5 tokens); the mask
says which positions are real tokens. Embeddings are returned in float32 whatever dtype the encoder runs in.

Loading is offline (`load_text_encoder`): a folder with config.json, the weights and the tokenizer files, or a
Hugging Face Hub id already in the local cache (`local_files_only=True`; nothing is downloaded at run time); a model
that is not there fails with one line saying what to download and where to put it. The encoder is frozen: eval
mode, no gradients, and `fingerprint` (sha256 of the kind, max_tokens, the tokenizer's vocabulary and every weight
tensor) identifies it in caches and generator checkpoints.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

TEXT_ENCODER_KINDS = ("clip", "t5")


class TextEmbedding(NamedTuple):
    tokens: torch.Tensor  # (B, L, D) float32 per-token embeddings
    mask: torch.Tensor    # (B, L) bool, True = a real token
    pooled: torch.Tensor  # (B, Dp) float32


def _require_transformers():
    try:
        import transformers
    except ImportError as err:
        raise ValueError("text conditioning (text.encoder) needs the transformers package: pip install "
                          "'ldm[text]'") from err
    return transformers


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of tokens (B, L, D) over the positions where mask (B, L) is True -> (B, D)."""
    w = mask.to(tokens.dtype).unsqueeze(-1)  # (B, L, 1)
    return (tokens * w).sum(1) / w.sum(1).clamp_min(1.0)


class TextEncoder(nn.Module):
    """A frozen transformers text encoder and its tokenizer: `encode(list of captions) -> TextEmbedding`."""

    def __init__(self, model: nn.Module, tokenizer, *, kind: str, source: str, max_tokens: int):
        super().__init__()
        if kind not in TEXT_ENCODER_KINDS:
            raise ValueError(f"text encoder kind {kind!r}; expected one of {list(TEXT_ENCODER_KINDS)}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer, self.kind, self.source, self.max_tokens = tokenizer, kind, str(source), int(max_tokens)
        self.token_dim = int(model.config.hidden_size if kind == "clip" else model.config.d_model)
        self.pooled_dim = self.token_dim
        limit = getattr(model.config, "max_position_embeddings", None) if kind == "clip" else None
        if limit is not None and self.max_tokens > limit:
            raise ValueError(f"text.max_tokens={self.max_tokens} exceeds the {limit} positions of CLIP text encoder "
                             f"{source}; use text.max_tokens={limit} or fewer")
        self.fingerprint = self._fingerprint()
        self.eval()

    def train(self, mode: bool = True) -> TextEncoder:  # frozen: always in eval mode
        return super().train(False)

    def _fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps({"kind": self.kind, "max_tokens": self.max_tokens}).encode())
        h.update(json.dumps(self.tokenizer.get_vocab(), sort_keys=True).encode())
        state = self.model.state_dict()
        for name in sorted(state):
            t = state[name].detach().cpu().contiguous()
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()[:16]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, captions: list[str]) -> TextEmbedding:
        """Captions -> TextEmbedding with L = max_tokens (padded to it, longer captions truncated)."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise ValueError("TextEncoder.encode takes a list of caption strings")
        batch = self.tokenizer(list(captions), padding="max_length", max_length=self.max_tokens, truncation=True,
                               return_tensors="pt")
        ids = batch["input_ids"].to(self.device)  # (B, L)
        mask = batch["attention_mask"].to(self.device).bool()  # (B, L)
        out = self.model(input_ids=ids, attention_mask=mask.long())
        tokens = out.last_hidden_state.float()  # (B, L, D)
        pooled = out.pooler_output.float() if self.kind == "clip" else masked_mean(tokens, mask)  # (B, Dp)
        return TextEmbedding(tokens, mask, pooled)


def _kind_of(config) -> str:
    model_type = getattr(config, "model_type", "")
    if model_type in ("clip", "clip_text_model"):
        return "clip"
    if model_type in ("t5", "mt5", "umt5"):
        return "t5"
    raise ValueError(f"text encoder model_type {model_type!r} is not supported; expected a CLIP (clip, "
                     f"clip_text_model) or T5 (t5, mt5, umt5) model")


def load_text_encoder(name_or_path: str | None, *, max_tokens: int = 77, device: torch.device | str = "cpu",
                      dtype: torch.dtype | None = None) -> TextEncoder:
    """The frozen encoder at a local folder or a Hub id in the local Hugging Face cache (never downloaded here).

    FileNotFoundError, in one line, when it is not there: what to download and where to put it. None (a run whose
    text.encoder is null) is a ValueError: a generator trained on precomputed embeddings has no encoder."""
    if name_or_path is None:
        raise ValueError("no text encoder to load: text.encoder is null (a generator trained on precomputed "
                         "embeddings, text.embeddings, has none: sample it with --prompt-embeddings FILE, "
                         "docs/conditioning.md)")
    transformers = _require_transformers()
    transformers.utils.logging.disable_progress_bar()  # one weight file per run: a bar per tensor group is noise
    local = Path(name_or_path).expanduser()
    where = str(local) if local.exists() else name_or_path
    if local.is_dir() and not (local / "config.json").is_file():
        raise FileNotFoundError(f"text encoder folder {where!r} has no config.json: the folder needs config.json, the "
                                f"weights (model.safetensors) and the tokenizer files (save_pretrained / hf download)")
    try:
        config = transformers.AutoConfig.from_pretrained(where, local_files_only=True)
        kind = _kind_of(config)
        cls = transformers.CLIPTextModel if kind == "clip" else transformers.T5EncoderModel
        model = cls.from_pretrained(where, local_files_only=True, **({"dtype": dtype} if dtype else {}))
        tokenizer = transformers.AutoTokenizer.from_pretrained(where, local_files_only=True)
    except OSError as err:
        hint = (f"download it once where the Hub is reachable (`hf download {name_or_path} --local-dir DIR`, or "
                f"`huggingface-cli download`) and set text.encoder=DIR, or copy the model into the Hugging Face "
                f"cache ($HF_HOME/hub)") if not local.exists() else ("the folder needs config.json, the weights "
                                                                      "(model.safetensors) and the tokenizer files")
        raise FileNotFoundError(f"text encoder {name_or_path!r} not found locally ({type(err).__name__}: "
                                f"{str(err).splitlines()[0][:200]}); {hint}") from None
    return TextEncoder(model, tokenizer, kind=kind, source=where, max_tokens=max_tokens).to(device)
