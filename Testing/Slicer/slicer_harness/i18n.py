"""``slicer.i18n`` for the harness (Slicer ``Base/Python/slicer/i18n.py``, v5.6.0).

``translate(context, text)`` looks ``text`` up in a catalogue keyed by context (empty: the
untranslated text, as with no language pack). ``tr(text)`` uses the calling file's context:
``<package>.<file stem>`` inside a package, else the file stem (``CovidGANSeg`` for the module
file). Tests can install a catalogue (:data:`catalogue`) to see which context a text is looked up
in - the way a localised Slicer would find (or miss) its translation. Not covered: the v5.8
placeholder check.
"""

from __future__ import annotations

import inspect
import os

#: ``{(context, source text): translation}``; empty = no language pack
catalogue: dict[tuple[str, str], str] = {}
#: ``(context, text)`` of every lookup, for tests
lookups: list[tuple[str, str]] = []


def translate(context: str, text: str) -> str:
    lookups.append((context, text))
    return catalogue.get((context, text), text)


def getContext(sourceFile: str) -> str:
    if os.path.isfile(sourceFile):
        folder = os.path.dirname(sourceFile)
        stem = os.path.basename(sourceFile).replace(".py", "")
        if os.path.isfile(os.path.join(folder, "__init__.py")):
            return os.path.basename(folder) + "." + stem
        return stem
    return os.path.basename(sourceFile)


def tr(text: str) -> str:
    frame = inspect.currentframe().f_back
    filename = inspect.getsourcefile(frame) or inspect.getfile(frame)
    return translate(getContext(filename), text)
