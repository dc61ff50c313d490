"""`python -m esper.weatherlight` is the `esper` command."""

from esper.weatherlight.cli import main

main()
