from .env import has_detectron2, require_detectron2, DETECTRON2_INSTALL_HINT  # noqa: F401
