"""Building the frozen config of a run: detectron2 defaults + every d2_refine node + the YAML + KEY VALUE opts,
with one clear line for the usual mistakes (missing file, unknown key, bad value) instead of a yacs traceback."""
import logging
import os
import re

import torch
from detectron2.config import get_cfg

from ..config import add_d2_refine_config
from ..utils.messages import exception_line


class ConfigError(ValueError):
    """A config file or option that cannot be used; the message is one line meant for the user."""


def _describe(exc: Exception) -> str:
    return re.sub(r"Non-existent (config )?key: (\S+)",
                  r"unknown config key \2 (not defined by detectron2 or d2_refine)", exception_line(exc))


def setup_cfg(config_file: str = "", opts=(), freeze: bool = True):
    """``get_cfg()`` + ``add_d2_refine_config`` + ``config_file`` + ``opts`` (a flat KEY VALUE list)."""
    cfg = get_cfg()
    add_d2_refine_config(cfg)
    if config_file:
        if not os.path.isfile(config_file):
            raise ConfigError(f"config file not found: {config_file}")
        try:
            cfg.merge_from_file(config_file)
        except FileNotFoundError as e:  # a _BASE_ that does not exist
            raise ConfigError(f"in {config_file}: file not found: {e.filename or _describe(e)}") from None
        except (KeyError, ValueError, AssertionError, TypeError) as e:
            raise ConfigError(f"in {config_file}: {_describe(e)}") from None
        except Exception as e:  # yaml syntax errors and the like
            raise ConfigError(f"cannot read {config_file}: {type(e).__name__}: {_describe(e)}") from None
    opts = list(opts or [])
    if len(opts) % 2:
        raise ConfigError(f"options must be KEY VALUE pairs; got an odd number: {' '.join(opts)}")
    try:
        cfg.merge_from_list(opts)
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        raise ConfigError(f"in command-line options: {_describe(e)}") from None
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger(__name__).warning("MODEL.DEVICE is %r but CUDA is not available: running on the CPU.",
                                            cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    if freeze:
        cfg.freeze()
    return cfg
