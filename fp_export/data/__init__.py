"""Text for calibration and evaluation: the packaged corpus and users' files (``corpus``)."""
