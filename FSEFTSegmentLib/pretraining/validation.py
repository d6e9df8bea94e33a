"""Per-class validation Dice during pretraining, on volumes the training never draws.

Why: a run of a few thousand steps can leave small organs unlearnt while its mean loss looks fine;
the Dice of each class shows which classes the network has learnt, and when, and picks the best
checkpoint without touching real evaluation data. A dataset's `validation: N` names its validation
volumes:
- with images: its last N image/label pairs, which are then held out from training;
- synthesised: N new syntheses (variant `synthesize`, a seed the training never draws) of evenly
  spaced label maps. They show whether each class is learnt on unseen images of seen anatomy, not
  how well the network generalises to new patients.

Each volume is segmented whole in model space (MONAI sliding window, Gaussian blending, sigmoid >
0.5) and scored against its universal-id map, for the classes its dataset annotates and it holds.
"""

from __future__ import annotations

import time

import torch
from monai.inferers import sliding_window_inference

from ..evaluation import dice
from ..labels import UNIVERSAL_STRUCTURES
from .config import PretrainConfig, validation_indices
from .volume_cache import _VolumeCache


def class_name(universal_id: int) -> str:
    return UNIVERSAL_STRUCTURES[universal_id - 1].name


def validate(network: torch.nn.Module, config: PretrainConfig, cache: _VolumeCache, device: torch.device) -> dict:
    """{"dice": {class name: mean Dice over the volumes holding it}, "mean", "volumes", "seconds"}.

    The network is left in the mode it was in."""
    started = time.monotonic()
    crop = cache.crop
    totals: dict[int, list[float]] = {}
    was_training = network.training
    network.eval()
    volumes = 0
    try:
        with torch.inference_mode():
            for dataset, spec in enumerate(config.datasets):
                for index in validation_indices(spec):
                    volume = cache.get(dataset, index)
                    logits = sliding_window_inference(
                        volume.image[None], roi_size=(crop,) * 3, sw_batch_size=2, predictor=network,
                        overlap=0.25, mode="gaussian", sw_device=device, device=torch.device("cpu"),
                    )[0]
                    label = volume.label[0].numpy()
                    for universal in spec.annotated:
                        reference = label == universal
                        if reference.any():
                            predicted = logits[universal - 1].numpy() > 0  # sigmoid > 0.5
                            totals.setdefault(universal, []).append(dice(predicted, reference))
                    volumes += 1
    finally:
        network.train(was_training)
    per_class = {class_name(universal): round(sum(values) / len(values), 4) for universal, values in sorted(totals.items())}
    mean = round(sum(per_class.values()) / len(per_class), 4) if per_class else float("nan")
    return {"dice": per_class, "mean": mean, "volumes": volumes, "seconds": round(time.monotonic() - started, 1)}


def summary(result: dict, lowest: int = 3) -> str:
    """One line: the mean and the classes learnt least."""
    worst = sorted(result["dice"].items(), key=lambda item: item[1])[:lowest]
    listed = ", ".join(f"{name} {value:.2f}" for name, value in worst)
    return f"validation Dice {result['mean']:.3f} over {len(result['dice'])} classes ({result['volumes']} volumes); lowest: {listed}"


def table(result: dict) -> str:
    width = max([len(name) for name in result["dice"]] + [len("mean")])
    rows = [f"{name:<{width}}  {value:.3f}" for name, value in result["dice"].items()]
    return "\n".join(rows + [f"{'mean':<{width}}  {result['mean']:.3f}"])
