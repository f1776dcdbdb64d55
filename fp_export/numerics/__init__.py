"""Number grids (``formats``), scales (``scales``) and the ``Fp4ToFp8`` op (``fp4_to_fp8``): pure
functions on tensors, the base every other stage builds on."""
