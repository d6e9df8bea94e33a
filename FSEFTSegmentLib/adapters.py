"""Adapter artefacts: a folder holding the trained tensors and what is needed to trust and reuse them.

`<folder>/adapter.safetensors` holds exactly `AdaptedModel.trainable_state()` (kilobytes for the
black-box methods, whose backbone stays the base model's); `<folder>/adapter.json` holds the
`AdapterMetadata`: the base model's name and sha256, the method and its hyper-parameters, the
target structures (names, colours, terminology, the base head row each started from), the
supports with content hashes, the seed, the size prior and expected volumes (quality flag), the
training curve, library versions and creation time.

Saving builds the folder under a hidden sibling name and renames it into place, so a crash never
leaves a half-written adapter. Replacing an existing adapter swaps the two folders in one atomic
step where the system offers it (Linux `renameat2(RENAME_EXCHANGE)`, macOS `renamex_np(RENAME_SWAP)`);
elsewhere the old folder is first renamed aside, which leaves a window of a few microseconds in
which the path does not exist (never one in which it holds a mix of old and new files).
Loading is strict: the base model's sha256 must match, and the tensors must be exactly the
trainable tensors of the rebuilt model, with equal shapes.

Prediction with adapters is a layer above (`prediction.predict_with_adapters`): it imports this
module, never the other way round.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import errno
import json
import os
import platform
import secrets
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence, TypedDict

import torch

from . import __version__
from .adapter_library import FORMAT, METADATA_FILE, TENSORS_FILE, check_metadata
from .errors import FSEFTError, InputError, ModelError, listed
from .labels import Structure, novel_structure, resolve_structure
from .methods import get_method
from .methods.adapted import AdaptedModel
from .model.network import FoundationSwinUNETR
from .io.files import ensure_folder, sha256_file


class BaseModelInfo(TypedDict):
    name: str
    sha256: str
    architecture: dict


class StructureInfo(TypedDict):
    name: str
    display_name: str
    color: list[int]
    terminology: dict
    pretrained_row: int | None


class SupportInfo(TypedDict):
    id: str
    image: str
    image_sha256: str
    labels: str
    labels_sha256: str


class AdapterMetadata(TypedDict, total=False):
    """What `adapter.json` holds (format 1). `save_adapter` fills the fields marked *derived*."""

    format: int  # derived: 1
    base_model: BaseModelInfo
    method: str  # derived: model.method.name
    tune_decoder: bool  # derived
    hyper_parameters: dict
    structures: list[StructureInfo]  # one per head output channel, in order
    k: int
    supports: list[SupportInfo]
    seed: int | None
    size_prior: dict | None
    expected_volumes_ml: dict[str, list[float]] | None  # structure name -> [low, high], for the quality flag
    training_curve: list
    versions: dict[str, str]  # derived: fseft, torch, monai, python
    created: str  # derived: ISO time (UTC)
    trainable_parameters: int  # derived
    tensors_sha256: str  # derived: sha256 of adapter.safetensors


REQUIRED = ("base_model", "structures")


# ---------------------------------------------------------------- metadata helpers


def structure_info(structure: Structure, pretrained_row: int | None) -> StructureInfo:
    """A target structure as `adapter.json` records it."""
    return {
        "name": structure.name,
        "display_name": structure.display_name,
        "color": [int(c) for c in structure.color],
        "terminology": structure.slicerio_terminology(),
        "pretrained_row": pretrained_row,
    }


def library_versions() -> dict[str, str]:
    import monai

    return {"fseft": __version__, "torch": torch.__version__, "monai": monai.__version__, "python": platform.python_version()}


def adapter_structures(metadata: dict) -> list[Structure]:
    """The adapter's target structures: the universal table's entry for a known name, else a novel
    structure with the stored display name and colour."""
    structures = []
    for entry in metadata["structures"]:
        try:
            known = resolve_structure(entry["name"])
        except FSEFTError:
            known = None
        if known is not None and known.name == entry["name"]:
            structures.append(known)
        else:
            novel = novel_structure(entry.get("display_name") or entry["name"], entry.get("color"))
            structures.append(novel if novel.name == entry["name"] else dataclasses.replace(novel, name=entry["name"]))
    return structures


def expected_volumes(metadata: dict) -> dict[str, tuple[float, float]]:
    """Expected volume range (mL) per structure name, for the quality flag ({} when none was recorded)."""
    ranges = metadata.get("expected_volumes_ml") or {}
    return {name: (float(low), float(high)) for name, (low, high) in ranges.items()}


def recorded_base_model(folders: Sequence[str | os.PathLike]) -> dict | None:
    """The base model (name, sha256, ...) all these adapters were trained on; InputError if they differ."""
    bases = {}
    for folder in folders:
        base = read_metadata(folder)["base_model"]
        bases.setdefault(base["sha256"].lower(), (base, Path(folder)))
    if len(bases) > 1:
        listed = "; ".join(f"{folder}: {base['name']} (sha256 {digest[:12]}...)" for digest, (base, folder) in bases.items())
        raise InputError(f"the adapters were trained on different base models ({listed}); apply them in separate runs")
    return next(iter(bases.values()))[0] if bases else None


def needs_own_network(metadata: dict) -> bool:
    """Whether the adapter changes the backbone (so it cannot share the base network's features)."""
    return not get_method(metadata["method"]).black_box or bool(metadata.get("tune_decoder"))


# ---------------------------------------------------------------- saving


def _is_adapter_folder(folder: Path) -> bool:
    return folder.is_dir() and (folder / METADATA_FILE).is_file()


def _swap(a: Path, b: Path) -> bool:
    """Exchange two paths atomically where the system can; False where it cannot (then nothing changed)."""
    if not (sys.platform.startswith("linux") or sys.platform == "darwin"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if sys.platform == "darwin":
            result = libc.renamex_np(os.fsencode(a), os.fsencode(b), 2)  # RENAME_SWAP
        else:
            at_fdcwd, rename_exchange = -100, 2
            result = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    except (AttributeError, OSError, TypeError):  # no such libc function (glibc before 2.28, musl)
        return False
    return result == 0  # EINVAL/ENOSYS (file system without exchange): fall back


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_adapter(folder: str | os.PathLike, model: AdaptedModel, metadata: dict) -> Path:
    """Write `model`'s trainable tensors and `metadata` (completed with the derived fields) as an
    adapter folder, atomically. An existing adapter folder is replaced; any other existing,
    non-empty folder or a file is refused (InputError). Returns the folder."""
    folder = Path(folder).expanduser()
    for key in REQUIRED:
        if key not in metadata:
            raise ValueError(f"adapter metadata needs '{key}'")
    if not {"name", "sha256"} <= set(metadata["base_model"]):
        raise ValueError("adapter metadata 'base_model' needs 'name' and 'sha256'")
    if metadata.get("method", model.method.name) != model.method.name:
        raise ValueError(f"metadata method '{metadata['method']}' is not the model's '{model.method.name}'")
    outputs = model.structure_count
    if len(metadata["structures"]) != outputs:
        raise ValueError(f"{len(metadata['structures'])} structures in the metadata for {outputs} head outputs")
    if folder.exists() and not _is_adapter_folder(folder) and not (folder.is_dir() and not any(folder.iterdir())):
        raise InputError("exists and is not an adapter folder; refusing to overwrite it", folder)

    from safetensors.torch import save_file

    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.trainable_state().items()}
    ensure_folder(folder.parent)
    staging = folder.with_name(f".{folder.name}.saving-{secrets.token_hex(4)}")
    try:
        staging.mkdir()
        save_file(tensors, str(staging / TENSORS_FILE), metadata={"format": str(FORMAT), "method": model.method.name})
        document: dict[str, Any] = {"format": FORMAT, **{k: v for k, v in metadata.items() if k != "format"}}
        document.update(
            method=model.method.name,
            tune_decoder=bool(model.tune_decoder),
            head="softmax" if model.softmax else "sigmoid",
            trainable_parameters=model.trainable_count(),
            tensors_sha256=sha256_file(staging / TENSORS_FILE),
        )
        document.setdefault("versions", library_versions())
        document.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        for key in ("hyper_parameters", "supports", "training_curve"):
            document.setdefault(key, {} if key == "hyper_parameters" else [])
        for key in ("k", "seed", "size_prior", "expected_volumes_ml"):
            document.setdefault(key, None)
        (staging / METADATA_FILE).write_text(json.dumps(document, indent=2, default=_json_default) + "\n", encoding="utf-8")
        for name in (TENSORS_FILE, METADATA_FILE):  # on disk before the rename makes them visible
            with open(staging / name, "rb") as stream, contextlib.suppress(OSError):
                os.fsync(stream.fileno())
        _fsync_folder(staging)
        _install(staging, folder)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if not isinstance(error, OSError) and "I/O error" in str(error):  # safetensors' own error type for a failed write
            code = errno.ENOSPC if "No space left" in str(error) else errno.EIO
            raise OSError(code, os.strerror(code), str(folder)) from None
        raise
    _fsync_folder(folder.parent)
    return folder


def _install(staging: Path, folder: Path) -> None:
    """Move the finished staging folder to `folder`, replacing an existing one (see the module note)."""
    if not folder.exists():
        os.rename(staging, folder)  # fails (rather than merging) if a folder appeared meanwhile
        return
    if _swap(staging, folder):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the old adapter
        return
    aside = folder.with_name(f".{folder.name}.replaced-{secrets.token_hex(4)}")
    os.rename(folder, aside)
    try:
        os.rename(staging, folder)
    except BaseException:
        os.rename(aside, folder)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _json_default(value):
    if isinstance(value, (Path, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in adapter.json")


# ---------------------------------------------------------------- loading


def read_metadata(folder: str | os.PathLike) -> dict:
    """`adapter.json`, checked for what loading needs (InputError naming the file otherwise)."""
    folder = Path(folder).expanduser()
    path = folder / METADATA_FILE
    if not folder.is_dir():
        raise InputError("no such adapter folder", folder)
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"not an adapter folder: {METADATA_FILE} is missing", folder) from None
    except (OSError, ValueError) as error:
        raise InputError(f"unreadable adapter metadata ({type(error).__name__}: {str(error)[:120]})", path) from None
    check_metadata(metadata, path)
    try:
        get_method(metadata["method"])
    except InputError as error:
        raise InputError(f"adapter uses an {error}", path) from None
    return metadata


def check_base_model(folder: str | os.PathLike, metadata: dict, base_sha256: str) -> None:
    """Refuse (ModelError) an adapter trained on another base model than the one loaded."""
    trained = metadata["base_model"]["sha256"].lower()
    if trained != base_sha256.lower():
        raise ModelError(
            f"adapter {Path(folder)} was trained on base model {metadata['base_model']['name']} "
            f"(sha256 {trained[:12]}...) but the loaded model is {base_sha256.lower()[:12]}..."
        )


def load_adapter(folder: str | os.PathLike, network: FoundationSwinUNETR, base_sha256: str) -> tuple[AdaptedModel, dict]:
    """Rebuild an adapter on `network` (the base model whose weights hash to `base_sha256`).

    The method is applied to `network` in place: LoRA, AdaptFormer, BitFit, Affine-LN, full and
    decoder-tuned adapters change its weights, so give those their own copy of the base network
    (`load_adapters` does); black-box adapters leave it untouched and may share it. Returns the
    eval-mode model and the metadata.
    """
    folder = Path(folder).expanduser()
    metadata = read_metadata(folder)
    check_base_model(folder, metadata, base_sha256)
    tensors_path = folder / TENSORS_FILE
    if not tensors_path.is_file():
        raise InputError(f"not a complete adapter: {TENSORS_FILE} is missing", folder)
    recorded = metadata.get("tensors_sha256")
    if recorded is not None and sha256_file(tensors_path) != recorded:
        raise InputError(f"does not match the sha256 recorded in {METADATA_FILE} (changed or damaged)", tensors_path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise InputError(f"not a readable safetensors file ({str(error)[:120]})", tensors_path) from None

    rows = [entry.get("pretrained_row") for entry in metadata["structures"]]
    if any(row is not None and not (isinstance(row, int) and 0 <= row < network.architecture.out_channels) for row in rows):
        raise InputError(f"a pretrained_row is outside the base model's {network.architecture.out_channels} classes", folder / METADATA_FILE)
    head = metadata.get("head", "sigmoid")  # adapters written before the softmax head existed are sigmoid
    if head not in ("sigmoid", "softmax"):
        raise InputError(f"unknown head '{head}' (sigmoid or softmax)", folder / METADATA_FILE)
    model = AdaptedModel(network, get_method(metadata["method"]), rows, tune_decoder=bool(metadata.get("tune_decoder")), softmax=head == "softmax")
    expected = model.trainable_state()
    problems = []
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshaped = sorted(f"{k} {tuple(tensors[k].shape)} != {tuple(expected[k].shape)}" for k in set(expected) & set(tensors) if tensors[k].shape != expected[k].shape)
    wrong_type = sorted(k for k in set(expected) & set(tensors) if not tensors[k].is_floating_point())
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped), ("not floating point", wrong_type)):
        if keys:
            problems.append(f"{len(keys)} {label}: {listed(keys)}")
    if problems:
        raise InputError(f"tensors do not fit a {metadata['method']} adapter with {len(rows)} structure(s) on this base model: " + "; ".join(problems), tensors_path)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            parameters[name].copy_(value)
    return model.eval(), metadata


def load_adapters(folders: Sequence[str | os.PathLike], network: FoundationSwinUNETR, base_sha256: str) -> list[tuple[AdaptedModel, dict]]:
    """Several adapters on one base network: black-box ones share `network` (one backbone pass for
    all of them), each backbone-changing one gets its own copy; the weights of `network` never change."""
    loaded = []
    for folder in folders:
        own = needs_own_network(read_metadata(folder))
        loaded.append(load_adapter(folder, copy.deepcopy(network) if own else network, base_sha256))
    return loaded
