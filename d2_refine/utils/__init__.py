from .env import DETECTRON2_INSTALL_HINT, has_detectron2, require_detectron2  # noqa: F401
