class DataError(ValueError):
    """A dataset that cannot be used as given: the message names the path and the problem."""
