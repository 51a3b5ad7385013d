"""Subcommands of the ``covidganseg`` CLI, one module each (see ``CovidGANSegLib.cli``)."""
