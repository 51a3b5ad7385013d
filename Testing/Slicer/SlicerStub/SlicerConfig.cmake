# A stub Slicer_DIR for checking an extension's CMake files without building Slicer.
#
# find_package(Slicer) with -DSlicer_DIR=<this folder> gives what an extension uses from a real
# Slicer build tree: Slicer_USE_FILE (the module macros), Slicer_EXTENSION_GENERATE_CONFIG,
# Slicer_EXTENSION_CPACK and the qt-scripted-modules directories. The macros copy and install
# the listed files like the real ones and, unlike them, FAIL when a listed file does not exist or
# when a file of a listed Python package (or of a module's folder / Resources) is not listed:
# the real build would silently produce an extension without it.

set(Slicer_FOUND TRUE)
set(Slicer_VERSION_MAJOR 5)
set(Slicer_VERSION_MINOR 11)
set(Slicer_VERSION_PATCH 0)
if(DEFINED SLICER_STUB_VERSION)  # -DSLICER_STUB_VERSION=5.4.0: pretend another release (version checks)
  string(REPLACE "." ";" _parts "${SLICER_STUB_VERSION}")
  list(GET _parts 0 Slicer_VERSION_MAJOR)
  list(GET _parts 1 Slicer_VERSION_MINOR)
endif()
set(Slicer_VERSION "${Slicer_VERSION_MAJOR}.${Slicer_VERSION_MINOR}.${Slicer_VERSION_PATCH}")
set(Slicer_IS_STUB TRUE)

set(Slicer_QTSCRIPTEDMODULES_SUBDIR "qt-scripted-modules")
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR "lib/Slicer-${Slicer_VERSION_MAJOR}.${Slicer_VERSION_MINOR}/${Slicer_QTSCRIPTEDMODULES_SUBDIR}")
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR "${Slicer_QTSCRIPTEDMODULES_LIB_DIR}")

set(Slicer_USE_FILE "${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake")
set(Slicer_EXTENSION_GENERATE_CONFIG "${CMAKE_CURRENT_LIST_DIR}/SlicerExtensionGenerateConfig.cmake")
set(Slicer_EXTENSION_CPACK "${CMAKE_CURRENT_LIST_DIR}/SlicerExtensionCPack.cmake")
