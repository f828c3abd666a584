"""What a study is: the field catalogue, study presets (YAML), training settings, the registry of
2D formats and where outputs go. Imports only the base modules (``errors``, ``fileio``)."""
