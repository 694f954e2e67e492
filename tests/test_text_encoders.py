"""Frozen text encoders (ldm/encoders/text.py) on tiny random CLIP / T5 models saved to a folder and loaded back
offline: per-token and pooled outputs checked against the transformers model run directly, padding invariance, the
fingerprint, and the one-line error for a model that is not there."""

import pytest
import torch

pytest.importorskip("transformers")

from tiny_text import save_tiny_encoder

from ldm.encoders.text import load_text_encoder, masked_mean

CAPTIONS = ["a handwritten digit seven", "7", "the number 3, written by hand"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    return {kind: save_tiny_encoder(root / kind, kind) for kind in ("clip", "t5")}


@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_outputs_match_the_model_run_directly(folders, kind):
    import transformers

    enc = load_text_encoder(str(folders[kind]), max_tokens=12)
    assert enc.kind == kind and enc.token_dim == enc.pooled_dim == 32 and not enc.training
    assert not any(p.requires_grad for p in enc.parameters())
    out = enc.encode(CAPTIONS)
    assert out.tokens.shape == (3, 12, 32) and out.mask.shape == (3, 12) and out.pooled.shape == (3, 32)
    # [BOS] words [EOS]: 4 + 2, 1 + 2 and 7 + 2 real tokens (the comma is a token of the word-level tokenizer)
    assert out.mask.sum(1).tolist() == [6, 3, 9] and out.mask[:, 0].all()
    tok = transformers.AutoTokenizer.from_pretrained(folders[kind])
    cls = transformers.CLIPTextModel if kind == "clip" else transformers.T5EncoderModel
    model = cls.from_pretrained(folders[kind]).eval()
    for i, caption in enumerate(CAPTIONS):  # each caption alone, unpadded: the real positions must agree
        ids = tok([caption], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = model(input_ids=ids)
        n = ids.shape[1]
        torch.testing.assert_close(out.tokens[i, :n], ref.last_hidden_state[0], rtol=1e-5, atol=1e-5)
        if kind == "clip":  # CLIP's pooled output: the final-layer-normed state of the end-of-text token
            torch.testing.assert_close(out.pooled[i], ref.last_hidden_state[0, n - 1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out.pooled[i], ref.pooler_output[0], rtol=1e-5, atol=1e-5)
        else:  # T5: the mean of the real token states
            torch.testing.assert_close(out.pooled[i], ref.last_hidden_state[0].mean(0), rtol=1e-5, atol=1e-5)


def test_masked_mean_by_hand():
    tokens = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert masked_mean(tokens, torch.tensor([[True, True, False]])).tolist() == [[2.0, 3.0]]


def test_fingerprint_identifies_weights_and_settings(folders, tmp_path):
    a = load_text_encoder(str(folders["clip"]), max_tokens=12)
    assert load_text_encoder(str(folders["clip"]), max_tokens=12).fingerprint == a.fingerprint
    assert load_text_encoder(str(folders["clip"]), max_tokens=10).fingerprint != a.fingerprint
    other = save_tiny_encoder(tmp_path / "other", "clip", seed=1)
    assert load_text_encoder(str(other), max_tokens=12).fingerprint != a.fingerprint
    assert load_text_encoder(str(folders["t5"]), max_tokens=12).fingerprint != a.fingerprint


def test_clip_refuses_more_tokens_than_positions(folders):
    with pytest.raises(ValueError, match="text.max_tokens=20 exceeds the 16 positions"):
        load_text_encoder(str(folders["clip"]), max_tokens=20)


def test_missing_model_is_one_line_naming_the_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError) as err:
        load_text_encoder("google/t5-v1_1-xxl")
    msg = str(err.value)
    assert "\n" not in msg and "'google/t5-v1_1-xxl' not found locally" in msg and "hf download" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="needs config.json"):
        load_text_encoder(str(tmp_path / "empty"))
