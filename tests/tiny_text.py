"""Tiny randomly initialised text encoders for the text-conditioning tests (not product models): a word-level
tokenizer over the digits captions' words and a CLIP text tower or T5 encoder of width 32, saved with save_pretrained
into a folder that ldm.encoders.text.load_text_encoder reads back, as it reads a downloaded model."""

from __future__ import annotations

from pathlib import Path

import pytest


def caption_words() -> list[str]:
    from ldm.data.captions import digit_captions

    return sorted({w.strip(",").lower() for d in range(10) for c in digit_captions(d) for w in c.split()})


def save_tiny_encoder(folder: Path, kind: str = "clip", *, seed: int = 0, width: int = 32, layers: int = 2) -> Path:
    """A random `kind` ("clip" or "t5") encoder + word-level tokenizer saved to `folder` (created)."""
    transformers = pytest.importorskip("transformers")
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    # [EOS] is not id 2: CLIPTextModel reads eos_token_id == 2 as "the highest id is the end token" (original CLIP)
    vocab = {"[PAD]": 0, "[BOS]": 1, "[UNK]": 2, "[EOS]": 3, **{w: i + 4 for i, w in enumerate(caption_words())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 1),
                                                                                               ("[EOS]", 3)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]",
                                                eos_token="[EOS]", unk_token="[UNK]")
    torch.manual_seed(seed)
    if kind == "clip":
        cfg = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width,
                                          num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=16,
                                          bos_token_id=1, eos_token_id=3, pad_token_id=0)
        model = transformers.CLIPTextModel(cfg)
    else:
        cfg = transformers.T5Config(vocab_size=len(vocab), d_model=width, d_kv=width // 2, d_ff=2 * width,
                                    num_layers=layers, num_heads=2, pad_token_id=0, eos_token_id=3)
        model = transformers.T5EncoderModel(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def save_tiny_clip(folder: Path, *, seed: int = 0) -> Path:
    """A random two-tower CLIPModel (16 px images, width 32) with a CLIPProcessor around the word-level tokenizer,
    saved to `folder`: what CLIPScore loads."""
    transformers = pytest.importorskip("transformers")
    import torch

    save_tiny_encoder(folder / "text", "clip", seed=seed)
    tok = transformers.AutoTokenizer.from_pretrained(folder / "text")
    images = transformers.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    text = {"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": 1, "eos_token_id": 3,
            "pad_token_id": 0}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 16, "patch_size": 8}
    torch.manual_seed(seed)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(folder)
    transformers.CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(folder)
    return folder
