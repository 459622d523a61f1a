"""Data: datasets through the `datasets` library, built-in offline sets, augmentation, the training loader."""
