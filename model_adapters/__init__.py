"""Built-in model adapters (installed as ``edgerazor.model_adapters``)."""
