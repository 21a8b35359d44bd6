"""Where densemoe meets other software: transformers (``hf``) and serving engines (``serving``)."""
