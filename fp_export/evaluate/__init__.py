"""The evaluate stage: perplexity by the paper's protocol (``perplexity``)."""
