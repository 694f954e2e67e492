"""ldm.hub: hf:// references and `ldm export --push-to-hub`, as a push/pull round trip without a network.

`fake_hub` replaces HfApi's create_repo / upload_folder with a writer of huggingface_hub's cache layout
(models--org--name/snapshots/<commit>/..., refs/main), the layout `hf download` leaves; the pulls then run
huggingface_hub's real snapshot_download against that cache with HF_HUB_OFFLINE=1.
"""

import hashlib
import shutil
from types import SimpleNamespace

import pytest
import torch

from ldm.hub import parse_hub_ref, resolve_path


def fake_hub(monkeypatch, cache):
    """Uploads land in `cache` as huggingface_hub's cache layout; returns the list of (repo_id, commit message)."""
    from huggingface_hub import HfApi

    pushed = []

    def create_repo(self, repo_id, **kwargs):
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, folder_path, repo_id, commit_message, **kwargs):
        sha = hashlib.sha1(f"{repo_id}:{len(pushed)}".encode()).hexdigest()
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(folder_path, repo / "snapshots" / sha)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(sha)
        pushed.append((repo_id, commit_message))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{sha}")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return pushed


def test_hub_references_parse():
    assert parse_hub_ref("hf://org/name") == ("org/name", None, None)
    assert parse_hub_ref("hf://org/name@v1.0/vae") == ("org/name", "v1.0", "vae")
    assert parse_hub_ref("hf://org/my.model/sub/DiT.pt") == ("org/my.model", None, "sub/DiT.pt")
    assert parse_hub_ref("hf://org/name@0123abc") == ("org/name", "0123abc", None)
    for bad in ("hf://name", "hf://org/", "hf:///x"):
        with pytest.raises(ValueError, match="hf://org/name"):
            parse_hub_ref(bad)
    assert resolve_path("runs/x") == "runs/x"  # local paths pass through untouched


@pytest.fixture
def vae(tmp_path):
    from ldm.tokenizers.kl import build_autoencoder_kl

    torch.manual_seed(0)
    build_autoencoder_kl(latent_channels=4, block_out_channels=[32, 32], layers_per_block=1,
                         norm_num_groups=8).save_pretrained(tmp_path / "vae")
    return tmp_path / "vae"


def test_tokenizer_push_pull_round_trip(vae, tmp_path, monkeypatch, capsys):
    from diffusers import AutoencoderKL

    from ldm.cli import main
    from ldm.tokenizers.export import load_tokenizer

    pushed = fake_hub(monkeypatch, tmp_path / "cache")
    out = tmp_path / "export"
    assert main(["export", str(vae), "--to", str(out), "--push-to-hub", "me/tiny-vae"]) == 0
    assert pushed == [("me/tiny-vae", "ldm export export")]
    assert "https://huggingface.co/me/tiny-vae" in capsys.readouterr().out
    local = load_tokenizer(out)
    assert local.fingerprint in (out / "README.md").read_text()

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pulled = load_tokenizer("hf://me/tiny-vae")
    assert pulled.fingerprint == local.fingerprint
    sha = (tmp_path / "cache" / "models--me--tiny-vae" / "refs" / "main").read_text()
    assert resolve_path(f"hf://me/tiny-vae@{sha}") == resolve_path("hf://me/tiny-vae@main")
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        a = AutoencoderKL.from_pretrained(resolve_path("hf://me/tiny-vae")).decode(x).sample
    assert torch.equal(a, local.decode(x)) or (a - local.decode(x)).abs().max() < 1e-6


def test_official_weights_and_tokenizer_from_the_hub_cache(vae, tmp_path, monkeypatch):
    from test_sample import _official_dit_file

    from ldm.eval.generator import load_official_generator
    from ldm.hub import push_folder

    fake_hub(monkeypatch, tmp_path / "cache")
    repo = tmp_path / "repo"
    shutil.copytree(vae, repo / "vae")
    _official_dit_file(repo / "DiT-tiny.pt")
    push_folder(repo, "me/dit-tiny", commit_message="weights")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    gen = load_official_generator("dit", "hf://me/dit-tiny/DiT-tiny.pt", tokenizer="hf://me/dit-tiny@main/vae")
    local = load_official_generator("dit", repo / "DiT-tiny.pt", tokenizer=vae)
    assert gen.tokenizer.fingerprint == local.tokenizer.fingerprint
    assert all(torch.equal(a, b) for a, b in zip(gen.model.state_dict().values(), local.model.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="has no 'missing.pt'"):
        resolve_path("hf://me/dit-tiny/missing.pt")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE=1 forbids uploads"):
        push_folder(repo, "me/dit-tiny", commit_message="again")


def test_offline_miss_is_one_line(tmp_path, monkeypatch, capsys):
    from ldm.cli import main

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["export", "hf://nobody/missing@v2", "--to", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "hf://nobody/missing@v2" in err and "HF_HUB_OFFLINE=1" in err
