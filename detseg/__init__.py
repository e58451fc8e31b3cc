"""detseg: detection, segmentation and matting in practice."""

from detseg.errors import DetsegError
from detseg.registry import list_models, register_model

__version__ = "0.1.0"

__all__ = ["DetsegError", "list_models", "register_model", "__version__"]
