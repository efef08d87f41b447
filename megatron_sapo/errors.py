"""The one exception type for bad user input (config, layout, data, checkpoint).

Its message is a single line that names the offending field and says how to fix it. Entry points catch it,
print ``error: <message>`` and exit with status 2, without a traceback and before any heavy work starts.
"""


class InputError(ValueError):
    """Bad config, layout, data or checkpoint; the message names the field and the fix."""
