"""Training data: patch sampling with foreground/tumour oversampling, augmentation, loaders.

``sampler`` (where to cut a patch, reading it padded), ``augment`` (batchgenerators
transforms, nnU-Net's probabilities), ``batches`` (one batch in one process), ``loader``
(worker processes that always shut down cleanly).
"""

from autoliver.data.loader import (
    DataLoadingError,
    LoaderStats,
    PatchLoader,
    make_train_loader,
    make_val_loader,
)

__all__ = ["DataLoadingError", "LoaderStats", "PatchLoader", "make_train_loader", "make_val_loader"]
