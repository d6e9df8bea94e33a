"""The model registry file (`Resources/models.json`) and the per-user data folder, without importing torch.

Why a module of its own: Slicer's process lists the models for its picker and the saved adapters
without loading the engine (`jobs`), while `model.registry` checks entries in depth and imports
torch. Both find the file, the default model and the per-user folder here, so they always agree.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

RESOURCES = Path(__file__).resolve().parents[1] / "Resources"
REGISTRY_FILE = RESOURCES / "models.json"


def registry_path() -> Path:
    """`FSEFT_REGISTRY` when set (tests, private registries), else the extension's models.json."""
    return Path(os.environ.get("FSEFT_REGISTRY") or REGISTRY_FILE).expanduser()


def cache_dir() -> Path:
    """`$FSEFT_CACHE`, else the platform's per-user cache folder (nothing is created here)."""
    if os.environ.get("FSEFT_CACHE"):
        return Path(os.environ["FSEFT_CACHE"]).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local"
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "fseft"


def read_document(path: str | os.PathLike | None = None) -> dict:
    """The parsed JSON document (errors are the caller's: `model.registry` turns them into ModelError)."""
    return json.loads(Path(path or registry_path()).read_text(encoding="utf-8"))


def default_model(document: dict | None = None) -> str:
    """The model used wherever none is named: the registry's "default", else its first entry."""
    document = document if document is not None else read_document()
    return document.get("default") or document["models"][0]["name"]


def model_names() -> list[str]:
    """Registered model names, the default first."""
    document = read_document()
    names = [entry["name"] for entry in document["models"]]
    default = default_model(document)
    return [default] + [name for name in names if name != default]
