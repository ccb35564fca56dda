"""The one exception type the converter raises for bad input (a ValueError, like the
architecture parser's): the command line prints its message without a traceback."""


class ConversionError(ValueError):
    pass
