"""Tools that work on trained models: export, prediction, and the model description every checkpoint carries."""
