"""Data sources (Fashion-MNIST, CIFAR, STL-10, image folders, digits) and labeled subsets."""

from simclrv2.data.sources import (
    DATASETS,
    IMAGE_EXTENSIONS,
    ConcatImageDataset,
    DatasetInfo,
    ImageDataset,
    ImageFolderDataset,
    MemmapImageDataset,
    SubsetDataset,
    TensorImageDataset,
    concat,
    dataset_info,
    hide_labels,
    load_dataset,
    subset,
)
from simclrv2.data.subsets import labeled_subset, read_subset_file, split_labeled, validation_indices, write_subset_file

__all__ = [
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "ConcatImageDataset",
    "DatasetInfo",
    "ImageDataset",
    "ImageFolderDataset",
    "MemmapImageDataset",
    "SubsetDataset",
    "TensorImageDataset",
    "concat",
    "dataset_info",
    "hide_labels",
    "load_dataset",
    "subset",
    "labeled_subset",
    "read_subset_file",
    "split_labeled",
    "validation_indices",
    "write_subset_file",
]
