"""`ldm eval prompts`: the scores of a prompted sample folder through the CLI, checked against the digits classifier
and CLIP applied here by hand to the same PNGs, and its one-line refusals."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.cli import main

sys.path.insert(0, str(Path(__file__).parent))

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _folder(folder: Path, images: np.ndarray, prompts: list[str]) -> Path:
    """What `ldm sample --prompts` leaves: NNNNNN.png with NNNNNN.txt, plus a grid that is not a sample."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        Image.fromarray(image).save(folder / f"{i:06d}.png")
        (folder / f"{i:06d}.txt").write_text(prompt + "\n")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "grid.png")
    return folder


@pytest.fixture(scope="module")
def digits():
    """40 held-out digits; prompts name the true digit for the first 30, the next digit for the last 10, in the
    template forms the sampler is given (word and numeral), plus two prompts that name no digit."""
    from ldm.encoders.digits import digits_split

    _, _, images, labels = digits_split(32)
    images, labels = images[:42], labels[:42].astype(int)
    prompted = [int(d) if i < 30 else (int(d) + 1) % 10 for i, d in enumerate(labels[:40])]
    prompts = [f"a handwritten digit {WORDS[d]}" if i % 2 else f"the number {d}, written by hand"
               for i, d in enumerate(prompted)] + ["a cat", "a handwritten letter"]
    return images, prompted, prompts


def _by_hand(folder: Path, n: int) -> np.ndarray:
    """The shipped classifier's predictions on the folder's first n PNGs, read back from disk."""
    from ldm.encoders.digits import load_digits_classifier, preprocess_digits

    x = torch.from_numpy(np.stack([np.asarray(Image.open(folder / f"{i:06d}.png").convert("RGB"))
                                   for i in range(n)])).permute(0, 3, 1, 2)
    with torch.no_grad():
        return load_digits_classifier()(preprocess_digits(x)).argmax(1).numpy()


def test_digits_accuracy_through_the_cli(digits, tmp_path, capsys):
    images, prompted, prompts = digits
    folder = _folder(tmp_path / "s", images, prompts)
    assert main(["eval", "prompts", "--samples", str(folder), "--batch-size", "16", "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    assert f"written to {folder / 'prompt_scores.json'}" in stdout.splitlines()[-1]
    result = json.loads((folder / "prompt_scores.json").read_text())
    pred, truth = _by_hand(folder, 40), np.array(prompted)
    assert result["digits_num"] == 40 and "clip_score" not in result  # the two prompts naming no digit are left out
    assert result["digits_accuracy"] == pytest.approx(float((pred == truth).mean()))
    assert 0.5 < result["digits_accuracy"] < 0.8  # 30 right prompts (the classifier knows real digits), 10 wrong ones
    for d in set(prompted):
        assert result["digits_per_digit"][str(d)] == pytest.approx(float((pred[truth == d] == d).mean()))


def test_clip_score_through_the_cli(digits, tmp_path):
    """--clip: CLIPScore of the same PNGs and prompts, computed here from the CLIP model's own embeddings as
    max(100 * mean cosine, 0) (torchmetrics' form of Hessel et al. 2021 Eq. 1); --out names the JSON."""
    transformers = pytest.importorskip("transformers")
    from tiny_text import save_tiny_clip

    images, _, prompts = digits
    clip = save_tiny_clip(tmp_path / "clip")
    folder = _folder(tmp_path / "s", images[:6], prompts[:6])
    out = tmp_path / "scores.json"
    assert main(["eval", "prompts", "--samples", str(folder), "--clip", str(clip), "--metrics", "clip", "--out",
                 str(out)]) == 0
    result = json.loads(out.read_text())
    model = transformers.CLIPModel.from_pretrained(clip).eval()
    proc = transformers.CLIPProcessor.from_pretrained(clip)
    pngs = [torch.from_numpy(np.array(Image.open(folder / f"{i:06d}.png").convert("RGB"))).permute(2, 0, 1)
            for i in range(6)]
    with torch.no_grad():
        emb = model(**proc(text=prompts[:6], images=pngs, return_tensors="pt", padding=True))
    expected = max(float(100 * F.cosine_similarity(emb.image_embeds, emb.text_embeds, dim=-1).mean()), 0.0)
    assert result["clip_num"] == 6 and "digits_accuracy" not in result
    assert result["clip_score"] == pytest.approx(expected, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("case, message", [
    ("no folder", "does not exist; give the --out folder of `ldm sample"),
    ("no prompts", "000001.png has no prompt file 000001.txt"),
    ("no clip folder", "CLIP weights folder .* not found .*`hf download"),
    ("clip without --clip", "--metrics clip needs the CLIP weights: --clip DIR"),
    ("unknown metric", r"--metrics digits,fid: unknown \['fid'\]"),
    ("nothing to score", "no prompt names a digit .* and no CLIP folder is given"),
])
def test_bad_input_is_one_line_and_exit_2(digits, tmp_path, capsys, case, message):
    import re

    images, _, prompts = digits
    folder = _folder(tmp_path / "s", images[:3], prompts[:3])
    args = ["eval", "prompts", "--samples", str(folder)]
    if case == "no folder":
        args[-1] = str(tmp_path / "missing")
    elif case == "no prompts":
        (folder / "000001.txt").unlink()
    elif case == "no clip folder":
        args += ["--clip", str(tmp_path / "nope")]
    elif case == "clip without --clip":
        args += ["--metrics", "clip"]
    elif case == "unknown metric":
        args += ["--metrics", "digits,fid"]
    else:
        for i in range(3):
            (folder / f"{i:06d}.txt").write_text("a cat\n")
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(message, err) and "\n" not in err and "Traceback" not in err
    assert not (folder / "prompt_scores.json").exists()
