"""Tools around a trained model: ONNX / ``torch.export`` (``export``), timm-format folders (``timm_export``),
checkpoint averaging (``averaging``) and attention maps (``attention_maps``). Nothing is re-exported: import each name
from its module; the command-line tools run as ``python -m natzoo.tools.<module>``. See docs/architecture.md."""
