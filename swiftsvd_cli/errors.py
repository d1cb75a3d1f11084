"""The one exception type for user-facing errors: the CLI prints its message on one line and exits 1."""


class SwiftSVDError(Exception):
    """A problem the user can fix (bad path, mismatched artifact, impossible setting); never a bug."""
