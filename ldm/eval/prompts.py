"""Scores of prompted samples (a sample folder of `ldm sample --prompt`, each NNNNNN.png with its NNNNNN.txt):

  digits_prompt_accuracy   offline, for the embedded digits' captions: the fraction of samples that the shipped
                           digits classifier (ldm/encoders/digits.py) assigns to the digit their prompt names
                           (ldm.data.captions.digit_of_caption); chance is 10 %.
  clip_score               CLIPScore (Hessel et al. 2021, arXiv:2104.08718 Eq. 1) as torchmetrics computes it:
                           max(100 * mean_i cos(E_image_i, E_text_i), 0), i.e. weight 100 (the paper: 2.5) and the
                           clamp at 0 applied to the mean (the paper clamps each pair; the two agree whenever no
                           pair has a negative cosine, as with real CLIP and real prompts). CLIP weights come from a
                           local folder (nothing is downloaded: a missing folder is one line naming what to get).

`score_prompted_samples` runs the metrics `ldm eval prompts` asks for (by default: digits accuracy when a prompt names
a digit, CLIPScore when a CLIP folder is given) and returns their numbers flat, as the command writes them to JSON.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ldm.data.captions import digit_of_caption
from ldm.eval.generate import read_png


def prompted_samples(folder: str | Path) -> tuple[list[Path], list[str]]:
    """(PNG paths, their prompts) of a sample folder, in index order; ValueError when a PNG has no prompt file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"sample folder {str(folder)!r} does not exist; give the --out folder of `ldm sample "
                                f"--prompt / --prompts`")
    pngs = sorted(p for p in folder.glob("[0-9]*.png"))
    if not pngs:
        raise FileNotFoundError(f"no samples (NNNNNN.png) in {folder}")
    prompts = []
    for png in pngs:
        txt = png.with_suffix(".txt")
        if not txt.is_file():
            raise ValueError(f"{png} has no prompt file {txt.name}: score folders written by `ldm sample --prompt`")
        prompts.append(txt.read_text(encoding="utf-8").strip())
    return pngs, prompts


@torch.no_grad()
def digits_prompt_accuracy(folder: str | Path, *, batch_size: int = 256, device: str | torch.device = "cpu",
                           weights: str | Path | None = None, progress: bool = False) -> dict:
    """{"accuracy", "num", "per_digit": {d: accuracy}} of the samples whose prompt names one digit."""
    from tqdm.auto import tqdm

    from ldm.encoders.digits import load_digits_classifier, preprocess_digits

    pngs, prompts = prompted_samples(folder)
    targets = [digit_of_caption(p) for p in prompts]
    keep = [i for i, d in enumerate(targets) if d is not None]
    if not keep:
        raise ValueError(f"no prompt in {folder} names a digit (e.g. 'a handwritten digit seven')")
    net = load_digits_classifier(weights, device=device)
    predicted = []
    for a in tqdm(range(0, len(keep), batch_size), desc="digits classifier", unit="batch", disable=not progress):
        images = np.stack([read_png(pngs[i]) for i in keep[a:a + batch_size]])  # (B, H, W, 3) uint8
        x = torch.from_numpy(images).permute(0, 3, 1, 2).to(device)  # (B, 3, H, W)
        predicted += net(preprocess_digits(x)).argmax(1).tolist()
    truth = np.array([targets[i] for i in keep])
    hit = np.array(predicted) == truth
    return {"accuracy": float(hit.mean()), "num": len(keep),
            "per_digit": {int(d): float(hit[truth == d].mean()) for d in np.unique(truth)}}


def check_clip_folder(clip: str | Path) -> Path:
    """The local CLIP folder `clip`; FileNotFoundError, one line naming what to download, when it is not one."""
    clip = Path(clip).expanduser()
    if not (clip / "config.json").is_file():
        raise FileNotFoundError(f"CLIP weights folder {str(clip)!r} not found (needs config.json, weights and "
                                f"processor files); download one once, e.g. `hf download openai/clip-vit-large-patch14 "
                                f"--local-dir {clip}`")
    return clip


@torch.no_grad()
def clip_score(folder: str | Path, clip: str | Path, *, batch_size: int = 64,
               device: str | torch.device = "cpu", progress: bool = False) -> dict:
    """{"clip_score", "num"}: torchmetrics' CLIPScore of every sample against its prompt, CLIP from folder `clip`."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from tqdm.auto import tqdm

    clip = check_clip_folder(clip)
    pngs, prompts = prompted_samples(folder)

    def load():  # torchmetrics takes a loader; ours reads the local folder only
        from transformers import CLIPModel, CLIPProcessor

        return (_ClipFeatures(CLIPModel.from_pretrained(str(clip), local_files_only=True).eval()),
                CLIPProcessor.from_pretrained(str(clip), local_files_only=True))

    metric = CLIPScore(model_name_or_path=load).to(device)
    for a in tqdm(range(0, len(pngs), batch_size), desc="CLIPScore", unit="batch", disable=not progress):
        images = torch.from_numpy(np.stack([read_png(p) for p in pngs[a:a + batch_size]])).permute(0, 3, 1, 2)
        metric.update(images.to(device), prompts[a:a + batch_size])
    return {"clip_score": float(metric.compute()), "num": len(pngs)}


PROMPT_METRICS = ("digits", "clip")


def score_prompted_samples(folder: str | Path, *, metrics: list[str] | None = None, clip: str | Path | None = None,
                           digits_weights: str | Path | None = None, batch_size: int = 64,
                           device: str | torch.device = "cpu", progress: bool = False) -> dict:
    """The scores of a prompted sample folder, flat: digits_accuracy, digits_num, digits_per_digit (metric "digits")
    and clip_score, clip_num ("clip"). `metrics` None: digits when a prompt names a digit, clip when `clip` is given.
    Every input is checked before any network runs: the folder, its prompt files, the CLIP folder."""
    _, prompts = prompted_samples(folder)
    names_digit = any(digit_of_caption(p) is not None for p in prompts)
    if metrics is None:
        metrics = [m for m, on in (("digits", names_digit), ("clip", clip is not None)) if on]
        if not metrics:
            raise ValueError(f"nothing to score in {folder}: no prompt names a digit (the offline digits accuracy) "
                             f"and no CLIP folder is given (--clip DIR for CLIPScore)")
    unknown = [m for m in metrics if m not in PROMPT_METRICS]
    if unknown or not metrics:
        raise ValueError(f"--metrics {','.join(metrics)}: unknown {unknown}; expected a comma list of "
                         f"{list(PROMPT_METRICS)}")
    if "clip" in metrics:
        if clip is None:
            raise ValueError("--metrics clip needs the CLIP weights: --clip DIR (a local CLIP folder)")
        check_clip_folder(clip)
    out: dict = {}
    if "digits" in metrics:
        acc = digits_prompt_accuracy(folder, batch_size=batch_size, device=device, weights=digits_weights,
                                     progress=progress)
        out.update(digits_accuracy=acc["accuracy"], digits_num=acc["num"], digits_per_digit=acc["per_digit"])
    if "clip" in metrics:
        score = clip_score(folder, clip, batch_size=batch_size, device=device, progress=progress)
        out.update(clip_score=score["clip_score"], clip_num=score["num"])
    return out


class _ClipFeatures(torch.nn.Module):
    """A CLIPModel whose get_image_features / get_text_features return the projected embeddings as tensors:
    transformers 5 returns a model output (embeddings in `pooler_output`), torchmetrics 1.9 expects the tensor."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.config = model, model.config  # torchmetrics reads the text length limit from the config

    @staticmethod
    def _tensor(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))  # (B, projection_dim)

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))  # (B, projection_dim)
