"""hopt_st's own exception types (few: built-in types are used wherever one fits).

Every error hopt_st raises is a built-in exception (``ValueError`` for bad values, ``TypeError`` for wrong
types, ``KeyError`` for unknown names, ``FileNotFoundError`` / ``FileExistsError`` / ``OSError`` for files,
``TimeoutError`` for a busy checkpoint directory) or one of the subclasses below, and its message names the
file, element or argument at fault and says what to do.
"""

from __future__ import annotations

import os


class CorruptFileError(ValueError):
    """A file exists but cannot be read: truncated, garbled, or not the format its name says.

    Parameters
    ----------
    path
        The file at fault.
    message
        What is wrong and what to do (the path is prepended when the message does not name it).
    """

    def __init__(self, path: str | os.PathLike, message: str):
        self.path = os.fspath(path)
        if self.path not in message:
            message = f"{self.path!r}: {message}"
        super().__init__(message)

    @classmethod
    def from_error(
        cls,
        path: str | os.PathLike,
        error: BaseException,
        *,
        what: str = "file",
        fix: str = "Download or copy it again.",
    ) -> CorruptFileError:
        """``"<what> '<path>' is truncated or corrupt (<error type>: <error>): <fix>"``, for a reader's own error."""
        detail = " ".join(str(error).split())[:300]
        return cls(
            path,
            f"{what} {os.fspath(path)!r} is truncated or corrupt ({type(error).__name__}: {detail}): {fix}",
        )

    def __reduce__(self):  # picklable across processes despite the two-argument constructor
        return (type(self), (self.path, self.args[0]))
