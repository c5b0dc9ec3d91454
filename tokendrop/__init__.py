"""tokendrop: fewer visual tokens for Hugging Face LLaVA-NeXT models, in one line.

    handle = tokendrop.patch(model, "hired", budget=0.2)
    model.generate(**processor(images=..., text=..., return_tensors="pt"))
    handle.last        # what was kept, per image
    tokendrop.unpatch(model)
"""

__version__ = "0.1.0"  # before the imports: modules below record it in their outputs

from .method import describe as methods
from .patch import Handle, ImageRecord, patch, patched, unpatch
from .profile_grid import profile
from .training import Example, RouterTraining, train_router
from .visualize import show

__all__ = ["patch", "unpatch", "patched", "methods", "profile", "show", "train_router", "RouterTraining", "Example",
           "Handle", "ImageRecord", "__version__"]
