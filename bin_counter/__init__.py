"""bin_counter: count the objects in Amazon Bin Image Dataset photos, tracked with MLflow."""

__version__ = "0.1.0"


class BinCounterError(Exception):
    """An error the user can act on; the CLI prints its message as one line, without a traceback."""
