"""Renamed and removed config keys: merging an old name raises one line that names its replacement.

Built on yacs' ``register_renamed_key`` (the mechanism behind detectron2's renamed keys): the table lives on the
root config, so ``merge_from_file`` (YAML, ``_BASE_`` files included) and ``merge_from_list`` (command line)
both check it, and ``cfg.clone()`` keeps it. The error is yacs' one line::

    KeyError: Key MODEL.FPT.GT.MODE was renamed to MODEL.FPT.GROUNDING.MODE; please update your config.

Each ``add_<method>_config`` calls :func:`register_renamed_keys` with its own table, after adding its keys::

    RENAMED_KEYS = {
        "MODEL.FPT.GT": "MODEL.FPT.GROUNDING",                     # a node: every key under it too
        "MODEL.IOU_NET.NMS_THRESH": "MODEL.IOU_NET.NMS_THRESH_TEST",  # a key
        "MODEL.FPT.PRESET": ("_BASE_ configs/FPT/Base-FPT-lite.yaml", "presets are base files now"),  # + a note
    }

Importable without detectron2 (works on fvcore's and detectron2's CfgNode alike).
"""
from typing import Mapping, Tuple, Union

__all__ = ["register_renamed_keys", "RenamedKeys"]

#: old full key -> new full key, or (replacement, note) where the note explains a change of meaning or units
RenamedKeys = Mapping[str, Union[str, Tuple[str, str]]]


def _node_at(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _leaves(node, prefix: str):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}.{key}")
        else:
            yield f"{prefix}.{key}"


def register_renamed_keys(cfg, renamed: RenamedKeys) -> None:
    """Register ``renamed`` (old full key -> new full key or (replacement, note)) on the root config ``cfg``.

    An old key that is still present in ``cfg`` is an error (a rename must remove it). When the new key is a
    node of ``cfg`` (e.g. ``MODEL.FPT.GT`` -> ``MODEL.FPT.GROUNDING``), every key under it is registered under
    its old name too, so ``MODEL.FPT.GT.MODE dot`` on the command line names ``MODEL.FPT.GROUNDING.MODE``.
    Registering the same table twice is a no-op.
    """
    table = {}
    for old, new in renamed.items():
        if _node_at(cfg, old) is not None:
            raise ValueError(f"config key {old} is registered as renamed but is still defined")
        new_key, note = (new, None) if isinstance(new, str) else new
        table[old] = (new_key, note)
        node = _node_at(cfg, new_key)
        if isinstance(node, dict):
            for leaf in _leaves(node, new_key):
                table[old + leaf[len(new_key):]] = (leaf, note)
    known = cfg.__dict__[type(cfg).RENAMED_KEYS]
    for old, (new_key, note) in table.items():
        if old not in known:
            cfg.register_renamed_key(old, new_key, note)
