"""bin_counter: count the objects in Amazon Bin Image Dataset photos, tracked with MLflow."""

__version__ = "0.3.0"


class BinCounterError(Exception):
    """An error the user can act on; the CLI prints its message as one line, without a traceback."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as the one line a user reads: its first line, whitespace collapsed, at most `limit` characters
    (botocore, MLflow and torch put pages of detail after it; `-v` keeps the traceback)."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return " ".join(lines[0].split())[:limit] if lines else type(exc).__name__
