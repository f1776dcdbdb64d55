"""Quantized tensors and layers: recipes as data (``recipe``), weight quantizers (``quantizer``,
``gptq``), quantized weights (``weights``), activation quantizers (``activations``), LoRC
(``lorc``) and the quantized linear (``qlinear``)."""
