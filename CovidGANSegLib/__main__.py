"""``python -m CovidGANSegLib``: the same as the ``covidganseg`` console script."""

from CovidGANSegLib.cli import main

raise SystemExit(main())
