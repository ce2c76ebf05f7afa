"""detectron2's DatasetMapper, with one line naming the file for an image that cannot be read."""
from detectron2.data import DatasetMapper
from detectron2.data.detection_utils import SizeMismatchError, read_image
from PIL import UnidentifiedImageError

from .datasets import DatasetError

__all__ = ["CheckedDatasetMapper", "read_image_checked"]


def _unreadable(path, call):
    """``call()``, its errors in reading the image ``path`` re-raised as one :class:`DatasetError` line."""
    try:
        return call()
    except FileNotFoundError:
        reason = "not found"
    except UnidentifiedImageError:
        reason = "not an image (empty or corrupt file)"
    except SizeMismatchError as e:  # its message names the file, the two sizes and what to check
        raise DatasetError(str(e)) from None
    except IsADirectoryError:
        reason = "is a folder, not an image file"
    except OSError as e:  # PIL: "image file is truncated", ...
        reason = f"cannot be read ({e})"
    raise DatasetError(f"image {path}: {reason}") from None


def read_image_checked(path: str, format=None):
    """detectron2's ``read_image``, with one :class:`DatasetError` line naming a missing, empty, truncated or corrupt
    file."""
    return _unreadable(path, lambda: read_image(path, format=format))


class CheckedDatasetMapper(DatasetMapper):
    """:class:`detectron2.data.DatasetMapper` (same arguments and output) whose errors in reading an image, a missing,
    empty, truncated or corrupt file or one whose size differs from the json's (detectron2's
    ``check_image_size``), are re-raised as a one-line :class:`DatasetError` naming the file, instead of a
    traceback from inside a data-loader worker."""

    def __call__(self, dataset_dict):
        parent = super().__call__
        return _unreadable(dataset_dict.get("file_name"), lambda: parent(dataset_dict))
