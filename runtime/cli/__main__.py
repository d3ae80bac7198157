"""`python -m runtime.cli`: the same as the `sightline` script."""

from runtime.cli import main

main()
