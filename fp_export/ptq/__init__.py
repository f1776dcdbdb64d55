"""The quantize stage: sequential layer-by-layer PTQ of a Hugging Face model into a checkpoint."""
