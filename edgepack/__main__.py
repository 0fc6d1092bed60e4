"""``python -m edgepack``: the same command line as the ``edgepack`` console script."""

from edgepack.cli.main import main

main()
