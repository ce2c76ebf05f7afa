"""Every key a method's ``add_<method>_config`` adds is read by that method's code: a key nothing reads (a typo, a
feature removed) would silently do nothing when a user sets it."""
import os
import re

import pytest

from d2_refine.projects import PROJECTS, import_config_functions
from helpers import ROOT, bare_model_cfg


def _leaf_keys(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaf_keys(value, f"{prefix}{key}.")
        else:
            yield prefix + key


@pytest.mark.parametrize("name", sorted(PROJECTS))
def test_every_config_key_is_read_by_the_method(name):
    add = next(fn for fn in import_config_functions() if fn.__name__ == f"add_{name}_config")
    cfg = bare_model_cfg()
    add(cfg)  # some return cfg, some None
    nodes = [k for k in cfg.MODEL if k != "ROI_HEADS" or name == "iounet"]
    folder = os.path.join(ROOT, "projects", PROJECTS[name], name)
    code = ""
    for root, _, files in os.walk(folder):
        code += "".join(open(os.path.join(root, f)).read() for f in files if f.endswith(".py") and f != "config.py")
    unread = [f"MODEL.{node}.{key}" for node in nodes if isinstance(cfg.MODEL[node], dict)
              for key in _leaf_keys(cfg.MODEL[node])
              if not re.search(r"[.\"']%s\b" % re.escape(key.rsplit(".", 1)[-1]), code)]
    assert not unread, f"keys no code of {name} reads: {unread}"
