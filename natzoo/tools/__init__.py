"""Tools around a trained model: ONNX / ``torch.export`` (``export``; its command line ``export_cli``), timm-format
folders (``timm_export``), checkpoint averaging (``averaging``), attention maps (``attention_maps``), prediction
(``predict``), the model description every checkpoint carries (``model_info``) and the model sources of the export and
prediction commands (``sources``). Nothing is re-exported: import each name from its module; the command-line tools run
as ``python -m natzoo.tools.<module>``. See docs/architecture.md."""
