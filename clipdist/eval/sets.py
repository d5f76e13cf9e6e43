"""What an eval set's config names, as the lists the evaluation uses.

``classnames`` is a list or a file; ``templates`` is a list, the name of a built-in set
(templates.py) or a .txt file (one per line); ``root`` is a folder in clip_benchmark's
WebDataset layout (clipdist/data/wds_layout.py) that gives all three. Errors are ConfigErrors
naming the key, e.g. ``eval.zero_shot[0].templates``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from clipdist.config import ConfigError, ZeroShotSetConfig, missing_local_shards
from clipdist.data import wds_layout
from clipdist.eval.templates import PLACEHOLDERS, TEMPLATE_SETS, fill_template

DEFAULT_TEMPLATES = "imagenet80"  # eval.zero_shot[i].templates unset, without a root


@dataclass(frozen=True)
class ZeroShotSet:
    urls: str
    classnames: list[str]
    templates: list[str]


def resolve_zero_shot_set(eval_set: ZeroShotSetConfig, key: str) -> ZeroShotSet:
    """The shards, class names and templates of ``eval.zero_shot[i]`` (``key``). With ``root``
    (clip_benchmark's layout) they come from the folder, except classnames/templates given too."""
    check_root_or_urls(eval_set, key)
    urls, classnames, templates = eval_set.urls, eval_set.classnames, eval_set.templates
    if eval_set.root:
        urls = wds_layout.layout_shards(eval_set.root, f"{key}.root")
        classnames = os.path.join(eval_set.root, wds_layout.CLASSNAMES) if classnames is None else classnames
        templates = os.path.join(eval_set.root, wds_layout.TEMPLATES) if templates is None else templates
    templates = DEFAULT_TEMPLATES if templates is None else templates
    return ZeroShotSet(urls, resolve_classnames(classnames, f"{key}.classnames"), resolve_templates(templates, f"{key}.templates"))


def check_zero_shot_set(eval_set: ZeroShotSetConfig, key: str, *, read_files: bool) -> None:
    """The config check (clipdist.config.validate_eval) of one zero-shot set: all of it where
    files may be read; else what the config says without reading the root, .txt or .json files."""
    if read_files:
        resolved = resolve_zero_shot_set(eval_set, key)
        missing = missing_local_shards(resolved.urls) if eval_set.root else []  # urls: checked with the retrieval sets'
        if missing:
            raise ConfigError(f"{key}.root: {len(missing)} shard(s) match no file, first: {missing[0]}")
        return
    check_root_or_urls(eval_set, key)
    if not (is_templates_file(eval_set.templates) or (eval_set.root and eval_set.templates is None)):
        resolve_templates(DEFAULT_TEMPLATES if eval_set.templates is None else eval_set.templates, f"{key}.templates")
    if not (isinstance(eval_set.classnames, str) or (eval_set.root and eval_set.classnames is None)):
        resolve_classnames(eval_set.classnames, f"{key}.classnames")


def check_root_or_urls(eval_set: ZeroShotSetConfig, key: str) -> None:
    if eval_set.root and eval_set.urls:
        raise ConfigError(f"{key}.urls: give urls or root, not both (root's shards are {wds_layout.SPLIT}/0.tar..)")


def is_templates_file(value: Any) -> bool:
    return isinstance(value, str) and value.endswith(".txt")


def resolve_templates(value: Any, key: str) -> list[str]:
    if isinstance(value, str):
        if is_templates_file(value):
            value = read_lines(value, key)
        elif value in TEMPLATE_SETS:
            return list(TEMPLATE_SETS[value])
        else:
            raise ConfigError(f"{key}: unknown template set {value!r}; use one of {sorted(TEMPLATE_SETS)}, a .txt file or a list of prompts with '{{}}'")
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{key}: expected a built-in set name {sorted(TEMPLATE_SETS)}, a .txt file or a non-empty list of prompts")
    for i, template in enumerate(value):
        if not is_template(template):
            raise ConfigError(f"{key}[{i}]: every template needs a '{{}}' (or clip_benchmark's '{{c}}') placeholder and no other, got {template!r}")
    return list(value)


def is_template(template: Any) -> bool:
    if not isinstance(template, str) or not any(placeholder in template for placeholder in PLACEHOLDERS):
        return False
    try:
        fill_template(template, "x")
    except (IndexError, KeyError, ValueError):  # another field, e.g. '{0} {1}' or '{name}'
        return False
    return True


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


def read_lines(path: str, key: str) -> list[str]:
    """The non-empty lines of a text file, stripped (as clip_benchmark reads its .txt files)."""
    if not os.path.isfile(path):
        raise ConfigError(f"{key}: no file {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{key}: cannot read {path}: {error}") from error


def read_classnames_file(path: str, key: str) -> list:
    if not path.endswith(".json"):
        return read_lines(path, key)
    if not os.path.isfile(path):
        raise ConfigError(f"{key}: no file {path}")
    try:
        with open(path, encoding="utf-8") as f:
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
