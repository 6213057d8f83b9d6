"""A YAML file of settings (a train `--config`, a run's `config.yaml`, an experiment plan), read safely.

`read_yaml_mapping` is the one reader: `yaml.safe_load` (plain data, no Python objects built), an
empty file is an empty mapping, and a file that is not text, not YAML or not a mapping is one
MicrosegError line naming the file. Each caller checks its own fields (and whether the file exists,
which each says in its own words).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from microseg.core.errors import MicrosegError


def read_yaml_mapping(path: Path, entries: str) -> dict[str, Any]:
    """The mapping the YAML file `path` holds ({} for an empty file); `entries` says what its entries
    are ("option: value") in the refusal of a file that holds something else."""
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise MicrosegError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise MicrosegError(f"{path} is not a text (YAML) file") from None
    if not isinstance(loaded, dict):
        raise MicrosegError(f"{path} must hold a mapping of {entries}")
    return loaded
