# Stub of Slicer's SlicerExtensionGenerateConfig.cmake: writes the extension description file
# (<name>.s4ext, the format of the Extensions Index) from the EXTENSION_* variables.
set(_s4ext "${CMAKE_BINARY_DIR}/${PROJECT_NAME}.s4ext")
string(REPLACE ";" " " _depends "${EXTENSION_DEPENDS}")
string(REPLACE ";" " " _screenshots "${EXTENSION_SCREENSHOTURLS}")
file(WRITE "${_s4ext}"
"scm git
homepage ${EXTENSION_HOMEPAGE}
category ${EXTENSION_CATEGORY}
contributors ${EXTENSION_CONTRIBUTORS}
description ${EXTENSION_DESCRIPTION}
iconurl ${EXTENSION_ICONURL}
screenshoturls ${_screenshots}
depends ${_depends}
build_subdirectory .
enabled 1
")
message(STATUS "Slicer stub: wrote ${_s4ext}")
