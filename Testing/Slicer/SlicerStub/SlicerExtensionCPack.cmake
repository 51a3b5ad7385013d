# Stub of Slicer's SlicerExtensionCPack.cmake: records that packaging was requested (the real
# one builds the extension archive with CPack; "cmake --install" gives the same file tree here).
set(SLICER_STUB_CPACK_INCLUDED TRUE)
message(STATUS "Slicer stub: extension packaging for ${PROJECT_NAME} (use cmake --install to lay out the files)")
