"""Exception types. Every user-facing failure is an ``EdgeRazorError`` with an actionable message."""


class EdgeRazorError(Exception):
    """Base class: the CLI prints these without a traceback and exits with status 2."""


class PluginError(EdgeRazorError):
    """A plugin registry was asked for something it cannot give (unknown, duplicate, malformed)."""


class RecipeError(EdgeRazorError):
    """A recipe file or override is malformed: the message names the file, the key and what was expected."""


class QuantizationError(EdgeRazorError):
    """A model cannot be quantized as the recipe asks (e.g. a group size that does not divide a layer)."""


class DataError(EdgeRazorError):
    """A data source cannot be turned into training rows; the message names the source and field."""


class PackedFormatError(EdgeRazorError):
    """A packed export is damaged or inconsistent; the message names the file and the key."""


class GGUFFormatError(EdgeRazorError):
    """A GGUF file is damaged or does not hold what it must; the message names the file and what differs."""


class OutputExistsError(EdgeRazorError):
    """An export target already exists and the user did not ask to replace it (or it is not ours to replace)."""
