"""Datasets and data modules: the generated demo dataset and the ImageNet-layout image-folder data module
(classification); COCO-format detection data in :mod:`natzoo.datasets.coco` and the generated shapes dataset in
:mod:`natzoo.datasets.coco_shapes` (imported on use, so classification does not load the detection transforms)."""

from natzoo.datasets.demo import DEMO_CLASSES, ensure_demo_dataset, generate_demo_dataset
from natzoo.datasets.folder import ImageFolderDataModule, check_image_folder_layout

__all__ = [
    "DEMO_CLASSES",
    "ImageFolderDataModule",
    "check_image_folder_layout",
    "ensure_demo_dataset",
    "generate_demo_dataset",
]
