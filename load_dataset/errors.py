"""The one exception type for data problems a user can fix."""


class DataError(ValueError):
    """A data file, folder or value is missing or wrong; the message says which and what to do."""
