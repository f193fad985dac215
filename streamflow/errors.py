"""The root of every error StreamFlow reports to a person or a caller as one clear sentence."""


class StreamflowError(Exception):
    """An expected failure (bad input, missing data, refused promotion): its message is the whole story."""
