"""difill: code completion by masked diffusion."""

from importlib import resources
from pathlib import Path

__version__ = "0.1.0"


def default_model_path() -> Path:
    """Directory of the bundled default model (Hugging Face layout)."""
    return Path(str(resources.files("difill") / "default_model"))
