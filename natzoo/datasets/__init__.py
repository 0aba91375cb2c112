"""Datasets and data modules: the generated demo dataset and the ImageNet-layout image-folder data module."""

from natzoo.datasets.demo import DEMO_CLASSES, ensure_demo_dataset, generate_demo_dataset
from natzoo.datasets.folder import ImageFolderDataModule, check_image_folder_layout

__all__ = [
    "DEMO_CLASSES",
    "ImageFolderDataModule",
    "check_image_folder_layout",
    "ensure_demo_dataset",
    "generate_demo_dataset",
]
