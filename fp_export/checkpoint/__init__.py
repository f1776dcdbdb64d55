"""The checkpoint stage's artifact: an fp-export checkpoint directory (``layout``) and the resume
state of an interrupted quantization (``resume``), both serialized by ``layout``."""
