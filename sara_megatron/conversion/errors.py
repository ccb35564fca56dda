"""The one exception type the converter raises for bad input (a ValueError, like the
architecture parser's): the command line prints its message without a traceback."""

from sara_megatron.tool_errors import UserFacingError


class ConversionError(UserFacingError, ValueError):
    """An input the converter cannot convert as asked (names the file, tensor or setting)."""
