"""The one exception type for problems a user can fix (config, data, files); main.py prints it as one line."""


class UserError(ValueError):
    """A bad config field, missing data or an unreadable checkpoint: the message names the field/path."""
