"""Offscreen rendering of a Slicer slice view (EGL, no display) from the harness's scene.

This is Slicer's own rendering path, minus Qt: the harness's ``vtkMRMLSliceLogic`` blends the
background / foreground / label layers into an RGBA image exactly as in the application, and a
``vtkMRMLDisplayableManagerGroup`` with Slicer's ``vtkMRMLSegmentationsDisplayableManager2D``
draws segmentations (fill + outline) on top, in a ``vtkRenderWindow`` that renders offscreen
through EGL (Mesa). What the Qt slice widget adds (slice controller bar, corner annotations) is
not drawn.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

DISPLAYABLE_MANAGERS = ("vtkMRMLSegmentationsDisplayableManager2D", "vtkMRMLModelSliceDisplayableManager")


def useEGL() -> None:
    """Ask VTK for an EGL render window when there is no X display (must run before the first window)."""
    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")


class SliceViewRenderer:
    """Render one of the harness's slice views (``"Red"``, ``"Yellow"``, ``"Green"``) to an RGB array / PNG."""

    def __init__(self, harness, viewName: str = "Red", size: tuple[int, int] = (512, 512)) -> None:
        useEGL()
        import slicer
        from vtkmodules.vtkRenderingCore import vtkActor2D, vtkImageMapper, vtkRenderer, vtkRenderWindow, vtkRenderWindowInteractor

        self.harness = harness
        self.sliceLogic = harness.sliceLogics[viewName]
        self.sliceNode = self.sliceLogic.GetSliceNode()
        self.size = size
        self.renderWindow = vtkRenderWindow()
        self.renderWindow.SetOffScreenRendering(1)
        self.renderWindow.SetMultiSamples(0)
        self.renderWindow.SetSize(*size)
        # as in Slicer's slice view: the blended slice image in layer 0, the displayable managers
        # (segmentations, models, ...) in an overlay renderer in layer 1 that blends over it
        self.imageRenderer = vtkRenderer()
        self.imageRenderer.SetLayer(0)
        self.renderer = vtkRenderer()
        self.renderer.SetLayer(1)
        self.renderer.GetActiveCamera().ParallelProjectionOn()
        self.renderWindow.SetNumberOfLayers(2)
        self.renderWindow.SetAlphaBitPlanes(1)
        self.renderWindow.AddRenderer(self.imageRenderer)
        self.renderWindow.AddRenderer(self.renderer)
        self.interactor = vtkRenderWindowInteractor()
        self.interactor.SetRenderWindow(self.renderWindow)
        self.interactor.Initialize()

        factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
        factory.SetMRMLApplicationLogic(harness.applicationLogic)
        for manager in DISPLAYABLE_MANAGERS:
            if not factory.IsDisplayableManagerRegistered(manager):
                factory.RegisterDisplayableManager(manager)
        self.managers = slicer.vtkMRMLDisplayableManagerGroup()
        self.managers.SetRenderer(self.renderer)
        self.managers.Initialize(factory, self.renderer)
        self.managers.SetMRMLDisplayableNode(self.sliceNode)

        mapper = vtkImageMapper()  # the blended slice is RGBA 0..255 already
        mapper.SetColorWindow(255)
        mapper.SetColorLevel(127.5)
        self.imageMapper = mapper
        self.imageActor = vtkActor2D()
        self.imageActor.SetMapper(mapper)
        self.imageActor.GetProperty().SetDisplayLocationToBackground()
        self.imageRenderer.AddViewProp(self.imageActor)
        self.sliceLogic.ResizeSliceNode(*size)

    def show(self, background=None, foreground=None, foregroundOpacity: float | None = None) -> None:
        composite = self.sliceLogic.GetSliceCompositeNode()
        if background is not None:
            composite.SetBackgroundVolumeID(background.GetID())
        if foreground is not None:
            composite.SetForegroundVolumeID(foreground.GetID())
        if foregroundOpacity is not None:
            composite.SetForegroundOpacity(foregroundOpacity)

    def alignTo(self, volumeNode) -> None:
        """Rotate the view to the volume's closest axial plane and fit it (like "Reset field of view")."""
        self.sliceNode.RotateToVolumePlane(volumeNode)
        self.sliceLogic.FitSliceToBackground()

    def jumpTo(self, ras) -> None:
        """Move the slice (not the in-plane view) so that it goes through ``ras``."""
        self.sliceNode.JumpSliceByOffsetting(*[float(x) for x in ras])

    def render(self) -> np.ndarray:
        """The view as an ``(height, width, 3)`` uint8 array (top row first)."""
        from vtk.util import numpy_support
        from vtkmodules.vtkRenderingCore import vtkWindowToImageFilter

        connection = self.sliceLogic.GetImageDataConnection()  # changes with the layers shown
        if connection is None:
            raise RuntimeError("the slice view shows nothing: set a background volume first")
        self.imageMapper.SetInputConnection(connection)
        self.renderWindow.Render()
        grab = vtkWindowToImageFilter()
        grab.SetInput(self.renderWindow)
        grab.SetInputBufferTypeToRGB()
        grab.ReadFrontBufferOff()
        grab.Update()
        image = grab.GetOutput()
        w, h, _ = image.GetDimensions()
        rgb = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)[:, :, :3]
        self._lastImage = image
        return np.ascontiguousarray(rgb[::-1])

    def savePNG(self, path: str | Path) -> np.ndarray:
        """Render and write a PNG; returns the RGB array."""
        from vtkmodules.vtkIOImage import vtkPNGWriter

        rgb = self.render()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = vtkPNGWriter()
        writer.SetFileName(str(path))
        writer.SetInputData(self._lastImage)
        writer.Write()
        return rgb

    def rasToPixel(self, ras) -> tuple[int, int]:
        """Pixel (column, row from the top) where a RAS point lands in the view."""
        import vtk

        xyToRas = vtk.vtkMatrix4x4()
        xyToRas.DeepCopy(self.sliceNode.GetXYToRAS())
        xyToRas.Invert()
        x, y, _, _ = xyToRas.MultiplyPoint([*map(float, ras), 1.0])
        return int(round(x)), int(round(self.size[1] - 1 - y))

    def close(self) -> None:
        self.managers.SetMRMLDisplayableNode(None)
        self.renderWindow.Finalize()
