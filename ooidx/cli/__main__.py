"""C{python -m ooidx.cli}: the C{ooidx} command."""
from ooidx.cli import main

main()
