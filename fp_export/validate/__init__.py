"""The validate stage: backends compared with the PyTorch quantized model through Polygraphy
(``runners``: one per backend; ``compare``: the comparison, tolerances, float32 noise floor;
``float64_graph`` / ``float64_model``: the float64 check of an exported graph's function)."""
