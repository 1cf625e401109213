"""Where a service's model comes from: a local folder or a Hugging Face hub id. `require_model_source` runs before
transformers or diffusers see the path, so a missing folder fails with one line naming the path and the fix
instead of the hub's "Repo id must be in the form ..."."""

from __future__ import annotations

import re
from pathlib import Path

from pony_common.config import MODEL_DIRS

# huggingface_hub's repo id rule: `name` or `namespace/name`, [\w.-] characters, at most 96, no "--" or "..",
# no leading or trailing "-" or ".".
_HUB_ID = re.compile(r"^(?:[\w][\w.-]{0,95}/)?[\w][\w.-]{0,95}$")


class ModelNotFoundError(FileNotFoundError):
    """A model path that is neither a local folder nor a hub id; the message names the path and the fix."""


def looks_like_hub_id(path: str) -> bool:
    """True for `name` or `namespace/name` as the hub accepts them (not `/abs/path`, `./x`, `a/b/c`, `~/x`)."""
    if not _HUB_ID.match(path) or "--" in path or ".." in path:
        return False
    return all(not part.endswith((".", "-")) for part in path.split("/"))


def require_model_source(path: str, service: str) -> str:
    """`path` when it is a local folder, or a hub id with no local folder of that name; else ModelNotFoundError.

    `service` is the settings key (`style_tagger`): the error names `PONY_<SERVICE>_MODEL`, and, when `path` ends in
    the folder `ponyctl models tiny DIR` writes for the service (`clip`), offers `ponyctl models tiny <its parent>`.
    """
    local = Path(path).expanduser()
    if local.is_dir():
        return path
    if local.exists():
        problem = "is a file, not a model folder"
    elif looks_like_hub_id(path):
        return path
    else:
        problem = "does not exist (and is not a Hugging Face hub id)"
    setting = f"PONY_{service.upper()}_MODEL"
    if local.name == MODEL_DIRS.get(service):
        fix = f"write the tiny models with `ponyctl models tiny {local.parent}`, or set {setting} to a model folder"
    else:
        fix = f"set {setting} to a model folder or hub id (or `ponyctl models tiny DIR` and PONY_MODELS_DIR=DIR)"
    raise ModelNotFoundError(f"{service} model {path} {problem}: {fix}")
