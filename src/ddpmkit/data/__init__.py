"""Data sources -> float tensors in [-1, 1]; uint8 NHWC at the edges.

``open_source`` opens digits, CIFAR-10, an ``.npz`` or an image folder as an ``ImageDataset``
(un-augmented; the trainer flips with ``horizontal_flip_where``, the mask drawn from its own generator);
``verify_source`` lists unreadable files; ``quantize_uint8`` / ``from_uint8_nhwc`` are the pixel map
(the one home of the rounding; callers convert to uint8 through ``ddpmkit.images.to_uint8_nhwc``).
"""

from ddpmkit.data.cifar import CIFAR10_MD5, CIFAR10_URL, data_root, find_cifar10
from ddpmkit.data.convert import (
    from_uint8_nhwc,
    horizontal_flip_where,
    quantize_uint8,
    random_horizontal_flip,
)
from ddpmkit.data.image_files import ACCEPTED_FORMATS, IMAGE_EXTENSIONS, UnreadableImageError
from ddpmkit.data.sources import (
    DIGITS_NUM_TEST,
    ArrayImageDataset,
    BadImageWarning,
    FolderImageDataset,
    ImageDataset,
    OnBadImage,
    SourceKind,
    SourceReport,
    SourceShape,
    Split,
    inspect_source,
    load_digits_uint8,
    load_npz_uint8,
    open_source,
    source_shape,
    verify_source,
)

__all__ = [
    "ACCEPTED_FORMATS",
    "CIFAR10_MD5",
    "CIFAR10_URL",
    "DIGITS_NUM_TEST",
    "IMAGE_EXTENSIONS",
    "ArrayImageDataset",
    "BadImageWarning",
    "FolderImageDataset",
    "ImageDataset",
    "OnBadImage",
    "SourceKind",
    "SourceReport",
    "SourceShape",
    "Split",
    "UnreadableImageError",
    "data_root",
    "find_cifar10",
    "from_uint8_nhwc",
    "horizontal_flip_where",
    "inspect_source",
    "load_digits_uint8",
    "load_npz_uint8",
    "open_source",
    "quantize_uint8",
    "random_horizontal_flip",
    "source_shape",
    "verify_source",
]
