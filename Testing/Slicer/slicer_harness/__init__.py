"""A minimal, faithful ``slicer`` application layer over the ``slicer-core`` wheel, for tests.

``install()`` gives the process what a Slicer session started with ``--testing
--no-main-window`` has: ``slicer.app``, ``slicer.mrmlScene``, ``slicer.modules`` with real module
logics, ``slicer.ScriptedLoadableModule``, ``slicer.parameterNodeWrapper`` and ``slicer.i18n``.
See :mod:`.application` for what is real and what is emulated.
"""

from .application import FakeApplication, Harness, LoadableModule, QtUnavailable, install, slicerCoreAvailable

__all__ = ["FakeApplication", "Harness", "LoadableModule", "QtUnavailable", "install", "slicerCoreAvailable"]
