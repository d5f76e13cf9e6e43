"""What an eval set's config names, as the lists the evaluation uses.

``classnames`` is a list or a file; ``templates`` is a list or the name of a built-in set
(templates.py). Errors are ConfigErrors naming the key, e.g. ``eval.zero_shot[0].templates``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from clipdist.config import ConfigError
from clipdist.eval.templates import TEMPLATE_SETS


def resolve_templates(value: Any, key: str) -> list[str]:
    if isinstance(value, str):
        if value not in TEMPLATE_SETS:
            raise ConfigError(f"{key}: unknown template set {value!r}; use one of {sorted(TEMPLATE_SETS)} or a list of prompts with '{{}}'")
        return list(TEMPLATE_SETS[value])
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{key}: expected a built-in set name {sorted(TEMPLATE_SETS)} or a non-empty list of prompts")
    for i, template in enumerate(value):
        if not isinstance(template, str) or "{}" not in template:
            raise ConfigError(f"{key}[{i}]: every template needs a '{{}}' placeholder, got {template!r}")
    return list(value)


def resolve_classnames(value: Any, key: str) -> list[str]:
    """A list of names, or a file: .txt (one name per line) or .json, either a list of names or
    a class index mapping "0".. to a name or to [id, name] (ImageNet's imagenet_class_index.json)."""
    if isinstance(value, str):
        names = read_classnames_file(value, key)
    elif isinstance(value, (list, tuple)):
        names = list(value)
    else:
        raise ConfigError(f"{key}: expected a list of class names or a .txt/.json file, got {value!r}")
    if not names:
        raise ConfigError(f"{key}: no class names")
    bad = next((i for i, name in enumerate(names) if not isinstance(name, str) or not name.strip()), None)
    if bad is not None:
        raise ConfigError(f"{key}: class {bad} has no name ({names[bad]!r})")
    return [name.strip() for name in names]


def read_classnames_file(path: str, key: str) -> list:
    if not os.path.isfile(path):
        raise ConfigError(f"{key}: no file {path}")
    try:
        with open(path, encoding="utf-8") as f:
            if not path.endswith(".json"):
                return [line.strip() for line in f if line.strip()]
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{key}: cannot read {path}: {error}") from error
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and all(str(k).isdigit() for k in data):
        indices = sorted(int(k) for k in data)
        if indices != list(range(len(indices))):
            raise ConfigError(f"{key}: {path}: class indices must be 0..{len(indices) - 1} without gaps")
        entries = [data[str(i)] for i in indices]
        # ImageNet's class index holds [wnid, name]; the name is what a prompt needs.
        return [entry[-1] if isinstance(entry, list) and entry else entry for entry in entries]
    raise ConfigError(f"{key}: {path}: expected a JSON list of names or an object {{\"0\": name, ...}}")
