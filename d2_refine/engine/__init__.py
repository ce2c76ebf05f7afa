"""Training and evaluation entry points shared by every method (needs detectron2)."""
from ..utils.env import require_detectron2

require_detectron2("d2_refine.engine (train_net.py)")

from .checks import CheckedCheckpointer, check_amp, check_model, check_test_aug, check_weights  # noqa: E402,F401
from .config import ConfigError, setup_cfg  # noqa: E402,F401
from .evaluator import D2RefineCOCOEvaluator  # noqa: E402,F401
from .trainer import Trainer  # noqa: E402,F401
