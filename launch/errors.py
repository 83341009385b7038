"""Errors that the CLI turns into one line (launch/cli.py): light, so importing them is instant."""


class RunFailed(RuntimeError):
    """A run stopped on an error its message says in one line, after the workers logged the
    traceback; `lesa` prints the line and exits 1."""
