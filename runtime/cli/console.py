"""The console errors and progress go to (stderr), shared by every command module."""

from rich.console import Console

err_console = Console(stderr=True, soft_wrap=True)  # never break an error line
