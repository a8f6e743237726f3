"""The exception a dataset raises for a data problem a user can fix: `DataError("one sentence:
the file and what to do")`. It is `src.errors.DataError`, a `UserError`: every command prints
it as one line (exit code 2), also when raised in a DataLoader worker."""

from src.errors import DataError

__all__ = ["DataError"]
