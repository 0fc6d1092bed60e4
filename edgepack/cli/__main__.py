"""``python -m edgepack.cli``: the same command line as the ``edgepack`` console script."""

from edgepack.cli.main import main

main()
