"""Hugging Face models: loading local directories (``loading``) and the registry of model
families (``families``)."""
