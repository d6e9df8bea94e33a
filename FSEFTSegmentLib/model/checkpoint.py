"""Safe, strict checkpoint reading for the foundation network.

Accepts what users actually meet: a raw state dict or one wrapped under `state_dict`/`net`/`model`,
DDP's `module.` prefix, the head named `classifier` or MONAI's `out.conv.conv`, `.pt/.pth` or
`.safetensors`. Never executes pickled code (`weights_only=True`), and is strict where the paper's
loader is not: a missing, unexpected or mis-shaped key is an error that lists them.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import torch

from ..errors import ModelError, listed
from ..io.files import check_readable
from .network import Architecture, FoundationSwinUNETR

WRAPPER_KEYS = ("state_dict", "net", "model")
#: safetensors metadata key holding the Architecture as JSON (written by `pretraining.export_model`)
ARCHITECTURE_METADATA = "fseft.architecture"
KEY_RENAMES = ((re.compile(r"^module\."), ""), (re.compile(r"^out\.conv\.conv\."), "classifier."))


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The file's tensors with canonical key names, without running any code it may contain."""
    path = Path(path)
    _check_file(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path))
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(error))
        if found is None:  # not a pickle of tensors at all (random bytes, a text file, ...)
            raise ModelError(f"not a PyTorch or safetensors checkpoint ({_unpickler_reason(error)})", path) from None
        raise ModelError(f"refused: the checkpoint holds pickled objects, not plain tensors (it names {found.group(1)}, "
                         "and loading it could run code)", path) from None
    except PermissionError:
        raise ModelError("cannot be read (permission denied)", path) from None
    except Exception as error:  # noqa: BLE001 - weights_only / safetensors run no code: any failure is the file's
        raise ModelError(f"not a PyTorch or safetensors checkpoint ({_reason(error)})", path) from None
    for wrapper in WRAPPER_KEYS:
        if isinstance(raw, dict) and wrapper in raw and isinstance(raw[wrapper], dict):
            raw = raw[wrapper]
            break
    if not isinstance(raw, dict) or not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ModelError("does not contain a state dict of tensors", path)
    return {_canonical_key(key): value for key, value in raw.items()}


def stored_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A safetensors file's metadata (what `pretraining.loop.export_model` writes), {} for other files."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    _check_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except PermissionError:
        raise ModelError("cannot be read (permission denied)", path) from None
    except Exception as error:  # noqa: BLE001 - safetensors' own error type included: the file is at fault
        raise ModelError(f"not a safetensors checkpoint ({_reason(error)})", path) from None


def _check_file(path: Path) -> None:
    if path.is_dir():
        raise ModelError("is a folder, not a checkpoint file (.pt, .pth or .safetensors)", path)
    if not path.is_file():
        raise ModelError("no such checkpoint file", path)
    if path.stat().st_size == 0:
        raise ModelError("is empty, not a checkpoint", path)
    check_readable(path, ModelError)


def _unpickler_reason(error: Exception) -> str:
    """PyTorch's safe unpickler wraps its finding in paragraphs of advice: keep the finding."""
    found = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
    return found.group(1).strip()[:100] if found else _reason(error)


def _reason(error: Exception) -> str:
    """A reader's error as a short parenthesis: its first line, or its type when it has no text."""
    text = str(error).strip().splitlines()[0][:100] if str(error).strip() else ""
    return text if text and not text.isdigit() else type(error).__name__


def stored_architecture(path: str | os.PathLike) -> Architecture | None:
    """The Architecture a safetensors file states in its metadata (spacing, patch, HU window,
    class names travel with the weights), or None for files that carry none."""
    text = stored_metadata(path).get(ARCHITECTURE_METADATA)
    try:
        return Architecture.from_dict(json.loads(text)) if text else None
    except (ValueError, TypeError) as error:
        raise ModelError(f"unreadable architecture metadata ({type(error).__name__})", path) from None


def _canonical_key(key: str) -> str:
    for pattern, replacement in KEY_RENAMES:
        key = pattern.sub(replacement, key)
    return key


def infer_architecture(tensors: dict[str, torch.Tensor], defaults: Architecture = Architecture(), path=None) -> Architecture:
    """Feature size, channels, depths and heads read off the tensor shapes; the rest from `defaults`."""
    try:
        embed = tensors["swinViT.patch_embed.proj.weight"]
        head = tensors["classifier.weight"]
    except KeyError as missing:
        raise ModelError(f"not a Swin-UNETR checkpoint: key {missing} is missing", path) from None
    depths, heads = [], []
    for stage in range(1, 5):
        blocks = {int(m.group(1)) for k in tensors if (m := re.match(rf"swinViT\.layers{stage}\.0\.blocks\.(\d+)\.", k))}
        table = tensors.get(f"swinViT.layers{stage}.0.blocks.0.attn.relative_position_bias_table")
        if not blocks or table is None:
            raise ModelError(f"not a Swin-UNETR checkpoint: stage {stage} has no transformer blocks", path)
        depths.append(len(blocks))
        heads.append(int(table.shape[1]))
    values = defaults.to_dict()
    values.update(
        feature_size=int(embed.shape[0]),
        in_channels=int(embed.shape[1]),
        out_channels=int(head.shape[0]),
        depths=tuple(depths),
        num_heads=tuple(heads),
    )
    return Architecture.from_dict(values)


def check_layout(tensors: dict[str, torch.Tensor], network: torch.nn.Module, path=None) -> None:
    """Raise a ModelError listing every missing, unexpected or mis-shaped key."""
    expected = network.state_dict()
    problems = []
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshaped = sorted(
        f"{k} {tuple(tensors[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(expected) & set(tensors)
        if tensors[k].shape != expected[k].shape
    )
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if keys:
            problems.append(f"{len(keys)} {label}: {listed(keys)}")
    if problems:
        raise ModelError("wrong checkpoint layout: " + "; ".join(problems), path)


def build_from_checkpoint(path: str | os.PathLike, defaults: Architecture = Architecture()) -> FoundationSwinUNETR:
    """Read, check strictly and load a checkpoint into an eval-mode network on the CPU."""
    tensors = read_tensors(path)
    architecture = infer_architecture(tensors, defaults, path)
    network = FoundationSwinUNETR(architecture)
    check_layout(tensors, network, path)
    network.load_state_dict(tensors, strict=True)
    return network.eval()
