"""CovidGANSeg: self-supervised COVID-19 lesion segmentation in chest CT (3D GAN + TransUNet).

Module / Widget / Logic / Test as in Slicer's scripted-module template. The Widget only wires the
GUI; the Logic does everything and works without it::

    logic = slicer.util.getModuleLogic("CovidGANSeg")      # or CovidGANSeg.CovidGANSegLogic()
    result = logic.segmentLesions(volumeNode, ganCheckpoint, segCheckpoint, device="auto")
    table = logic.quantify(result["segmentation"], volumeNode)

Inference runs in a child process (``PythonSlicer -m CovidGANSegLib``): torch is never imported in
Slicer's GUI process, the GUI stays responsive, and Cancel ends the child's whole process tree.
"""

import contextlib
import logging
import os
import pathlib
import shutil
import tempfile
from typing import Annotated, Optional, Union

import vtk

import slicer
from slicer.ScriptedLoadableModule import *  # noqa: F403 - the template's base classes
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.util import VTKObservationMixin
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer < 5.4
    def _(text):
        return text

from CovidGANSegLib import protocol
try:
    from slicer.i18n import translate
except ImportError:  # Slicer < 5.4
    def translate(context, text):
        return text

from CovidGANSegModuleLib import dependencies, display, jobs, models, process, review, segmentations, tables, volumeio

DEVICES = list(protocol.DEVICES)


#
# CovidGANSeg
#

class CovidGANSeg(ScriptedLoadableModule):  # noqa: F405
    """Module description shown in Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)  # noqa: F405
        self.parent.title = _("CovidGANSeg")
        # Slicer's own category name, translated in Slicer's context (as its own modules do)
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []  # PyTorch is an extension dependency, checked at run time
        self.parent.contributors = ["CovidGANSeg contributors"]
        self.parent.helpText = _("""
Self-supervised segmentation of COVID-19 lesions in chest CT. A 3D GAN turns the CT into a
<i>pseudo-healthy</i> CT; the difference between the two marks where infection was removed, and a
TransUNet trained on such differences segments the lesions. Results are ordinary Slicer nodes:
a pseudo-healthy volume, a difference map (heat overlay), a segmentation with <b>Lungs</b> and
<b>Lesion</b> segments to correct in the Segment Editor, and tables with lesion volume, percent of
lung involved, MosMed category and agreement with a ground truth.
<p>After correcting the Lesion segment, <b>Compare with AI result</b> shows what changed (mL added and
removed, Dice between the AI and the corrected lesion, number of lesions before and after), and
<b>Export</b> writes the corrected mask as <i>study_XXXX_mask.nii.gz</i> on the CT's own grid.</p>
<p><b>Not for clinical use.</b> Models trained on synthetic phantoms are demonstration models.</p>
""")
        self.parent.acknowledgementText = _("""
Method after the paper on self-supervised COVID-19 lesion segmentation with a 3D GAN and a
TransUNet, and the pseudo-healthy synthesis of Shabani et al. (2022). Built on 3D Slicer,
PyTorch and the Slicer PyTorch extension.
""")


#
# CovidGANSegParameterNode
#

@parameterNodeWrapper
class CovidGANSegParameterNode:
    """The module's state, saved with the scene; bound to the .ui through ``SlicerParameterName``.

    inputVolume - the chest CT (Hounsfield units).
    modelsFolder - folder searched for checkpoints with model cards.
    ganCheckpoint / segCheckpoint - the chosen models (set from the model lists).
    device - "auto" (GPU if available), "cpu" or "cuda".
    overlayOpacity - opacity of the difference-map overlay in the slice views.
    differenceThreshold - difference (HU) below which the overlay is transparent.
    growLesions - grow the AI detections into connected lesion-range density (off: the detections alone).
    reuseLungs - segment with the "Lungs" segment of ``segmentation`` as it is now (e.g. corrected in the
        Segment Editor to include consolidation) instead of computing the lung mask.
    groundTruth - reference lesions for the comparison (segmentation or labelmap).
    pseudoHealthyVolume ... comparisonTable - the latest outputs.
    reviewTable - what the Segment Editor corrections changed against the AI result.
    batchInputFolder / batchOutputFolder - folder of CT files in, segmentations + CSV out ("" = none).
    exportFolder / exportStudyId - where the corrected lesion mask goes, as study_XXXX_mask.nii.gz.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    modelsFolder: pathlib.Path = models.defaultModelsFolder()
    ganCheckpoint: str = ""
    segCheckpoint: str = ""
    device: Annotated[str, Choice(DEVICES)] = "auto"
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    differenceThreshold: Annotated[float, WithinRange(0.0, 1000.0)] = 100.0
    growLesions: bool = True
    reuseLungs: bool = False
    groundTruth: Optional[Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]]  # None must be declared: Slicer's union default
    pseudoHealthyVolume: vtkMRMLScalarVolumeNode
    differenceVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    quantificationTable: vtkMRMLTableNode
    comparisonTable: vtkMRMLTableNode
    reviewTable: vtkMRMLTableNode
    # folders as text, "" = not chosen (a Path parameter would read "." and a ctkDirectoryButton shows
    # Slicer's working folder for it); set by the Widget from directorySelected, see setup()
    batchInputFolder: str = ""
    batchOutputFolder: str = ""
    exportFolder: str = ""
    exportStudyId: str = ""


#
# CovidGANSegWidget
#

@contextlib.contextmanager
def _errorsShown(message: str, waitCursor: bool = False):
    """``slicer.util.tryWithErrorDisplay`` that stops the error here.

    ``tryWithErrorDisplay`` shows the error (or, in testing mode, nothing) and re-raises it; in a
    button slot, a timer callback, ``setup()`` or ``enter()`` a re-raised error becomes a
    traceback on the console or breaks the panel. Testing mode gets the message in the log.
    """
    try:
        with slicer.util.tryWithErrorDisplay(message, waitCursor=waitCursor):
            yield
    except Exception as exc:  # noqa: BLE001 - shown to the user above; nothing else to do in a GUI slot
        if slicer.app.testingEnabled():
            logging.error("%s %s", message, exc)


class CovidGANSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):  # noqa: F405
    """GUI wiring only: every action calls the Logic; long actions run as jobs polled by a QTimer."""

    def __init__(self, parent=None) -> None:
        # attributes first: without a parent, Slicer's base class calls setup() from its __init__
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._jobButton = None
        self._jobButtonText = ""
        self._listedModelsFolder = None
        self._timer = None
        VTKObservationMixin.__init__(self)
        ScriptedLoadableModuleWidget.__init__(self, parent)  # noqa: F405

    def setup(self) -> None:
        import qt

        ScriptedLoadableModuleWidget.setup(self)  # noqa: F405
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CovidGANSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = CovidGANSegLogic()
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self.onTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.pseudoHealthyButton.connect("clicked(bool)", self.onPseudoHealthyButton)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.batchButton.connect("clicked(bool)", self.onBatchButton)
        self.ui.quantifyButton.connect("clicked(bool)", self.onQuantifyButton)
        self.ui.compareButton.connect("clicked(bool)", self.onCompareButton)
        self.ui.segmentEditorButton.connect("clicked(bool)", self.onSegmentEditorButton)
        self.ui.compareAIButton.connect("clicked(bool)", self.onCompareAIButton)
        self.ui.exportButton.connect("clicked(bool)", self.onExportButton)
        self.ui.refreshModelsButton.connect("clicked(bool)", lambda checked=False: self.updateModelLists(force=True))
        self.ui.ganModelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.segModelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        # Folder buttons set their parameter on every pick: ctkDirectoryButton signals
        # directoryChanged only for a folder other than the one it holds, and it holds (and shows)
        # Slicer's working folder until set, so picking the shown folder would change nothing.
        for button, name in ((self.ui.batchInputButton, "batchInputFolder"), (self.ui.batchOutputButton, "batchOutputFolder"),
                             (self.ui.exportFolderButton, "exportFolder")):
            button.connect("directorySelected(QString)", lambda path, name=name: self._setFolder(name, path))

        with _errorsShown(_("Could not set up the module panel."), waitCursor=True):
            self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        if self._job is not None:
            self._job.cancel()
            self._job = None
        if self._parameterNode is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
        self.removeObservers()

    def enter(self) -> None:
        with _errorsShown(_("Could not open the module panel."), waitCursor=True):
            self.initializeParameterNode()

    def exit(self) -> None:
        # The GUI stays bound to this wrapper (re-binding on enter would add an observer that
        # Slicer never removes); only our own observer, which touches the slice views, goes.
        self._observeParameterNode(False)

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None:
            self._job.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            with _errorsShown(_("Could not open the module panel."), waitCursor=True):
                self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        parameterNode = self.logic.getParameterNode()
        if self._parameterNode is None or self._parameterNode.parameterNode is not parameterNode.parameterNode:
            self.setParameterNode(parameterNode)
        else:
            self._observeParameterNode(True)
            self._onParameterNodeModified()
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolumeNode

    def _guiMapping(self) -> dict:
        """Widgets with a ``SlicerParameterName``, as ``connectGui`` finds them."""
        mapping = {}
        for widget in vars(self.ui).values():
            name = widget.property("SlicerParameterName") if hasattr(widget, "property") else None
            if name:
                mapping[name] = widget
        return mapping

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self._observeParameterNode(False)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # connectParametersToGui returns the tag in Slicer 5.6, 5.8 and 5.10 (connectGui returns
            # None before 5.10, and disconnectGui(None) disconnects nothing)
            self._parameterNodeGuiTag = self._parameterNode.connectParametersToGui(self._guiMapping())
            self._observeParameterNode(True)
            self._onParameterNodeModified()

    def _observeParameterNode(self, observe: bool) -> None:
        p = self._parameterNode
        if p is None:
            return
        has = self.hasObserver(p, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        if observe and not has:
            self.addObserver(p, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        elif not observe and has:
            self.removeObserver(p, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def _setFolder(self, name: str, path: str) -> None:
        if self._parameterNode is not None and path:
            setattr(self._parameterNode, name, str(path))

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        if str(p.modelsFolder) != self._listedModelsFolder:
            self.updateModelLists()
        if p.differenceVolume:  # only touch the slice views when our overlay is there
            self.logic.setOverlayOpacity(p.overlayOpacity, p.differenceVolume)
            self.logic.setDifferenceThreshold(p.differenceVolume, p.differenceThreshold)
        for button, folder in ((self.ui.batchInputButton, p.batchInputFolder), (self.ui.batchOutputButton, p.batchOutputFolder),
                               (self.ui.exportFolderButton, p.exportFolder)):
            button.text = folder if folder else _("Choose a folder...")
            if folder:
                wasBlocked = button.blockSignals(True)
                button.directory = folder
                button.blockSignals(wasBlocked)
        idle = self._job is None
        hasInput = bool(p.inputVolume)
        hasSegmentation = bool(p.segmentation)
        self.ui.pseudoHealthyButton.enabled = (idle and hasInput and bool(p.ganCheckpoint)) or self._jobButton is self.ui.pseudoHealthyButton
        self.ui.segmentButton.enabled = (idle and hasInput and bool(p.ganCheckpoint and p.segCheckpoint)) or self._jobButton is self.ui.segmentButton
        self.ui.batchButton.enabled = ((idle and bool(p.ganCheckpoint and p.segCheckpoint) and bool(p.batchInputFolder)
                                        and bool(p.batchOutputFolder)) or self._jobButton is self.ui.batchButton)
        self.ui.quantifyButton.enabled = idle and hasSegmentation
        self.ui.compareButton.enabled = idle and hasSegmentation and bool(p.groundTruth)
        self.ui.segmentEditorButton.enabled = idle and hasSegmentation and hasInput
        self.ui.compareAIButton.enabled = idle and hasSegmentation and hasInput and self.logic.hasAIResult(p.segmentation)
        self.ui.exportButton.enabled = idle and hasSegmentation and hasInput and bool(p.exportFolder)

    # -- models ------------------------------------------------------------------------------
    def updateModelLists(self, force: bool = False) -> None:
        p = self._parameterNode
        folder = str(p.modelsFolder) if p else ""
        if folder == self._listedModelsFolder and not force:
            return
        self._listedModelsFolder = folder
        with _errorsShown(_("Could not list the models."), waitCursor=True):
            gans, segs = self.logic.listModels(folder)
            for combo, cards, current in ((self.ui.ganModelComboBox, gans, p.ganCheckpoint if p else ""),
                                          (self.ui.segModelComboBox, segs, p.segCheckpoint if p else "")):
                wasBlocked = combo.blockSignals(True)
                combo.clear()
                for card in cards:
                    combo.addItem(models.displayName(card), card["checkpoint_path"])
                index = next((i for i, c in enumerate(cards) if c["checkpoint_path"] == current), 0 if cards else -1)
                combo.currentIndex = index
                combo.blockSignals(wasBlocked)
            self.onModelSelected()

    def onModelSelected(self, index: int = -1) -> None:
        if self._parameterNode is None:
            return
        gan = self.ui.ganModelComboBox.currentData or ""
        seg = self.ui.segModelComboBox.currentData or ""
        with slicer.util.NodeModify(self._parameterNode):
            self._parameterNode.ganCheckpoint = gan
            self._parameterNode.segCheckpoint = seg
        self.ui.modelInfoLabel.text = self.logic.describeModels(gan, seg)

    # -- long-running jobs -------------------------------------------------------------------
    def _dependenciesReady(self) -> bool:
        return self.logic.ensureDependencies(confirm=lambda text: slicer.util.confirmOkCancelDisplay(text, windowTitle=_("CovidGANSeg")))

    def _startJob(self, button, startFunction) -> None:
        if self._job is not None:  # the button currently reads "Cancel"
            self._job.cancel()
            self.onTimer()
            return
        with _errorsShown(_("Could not start."), waitCursor=True):
            if not self._dependenciesReady():
                return
            self._job = startFunction()
            self._jobButton, self._jobButtonText = button, button.text
            button.text = _("Cancel")
            self.ui.progressBar.value = 0
            self.ui.progressBar.visible = True
            self._onParameterNodeModified()
            self._timer.start()

    def onPseudoHealthyButton(self, checked=False) -> None:
        p = self._parameterNode
        self._startJob(self.ui.pseudoHealthyButton, lambda: self.logic.startPseudoHealthy(
            p.inputVolume, p.ganCheckpoint, p.device, differenceThreshold=p.differenceThreshold, overlayOpacity=p.overlayOpacity))

    def onSegmentButton(self, checked=False) -> None:
        p = self._parameterNode
        self._startJob(self.ui.segmentButton, lambda: self.logic.startSegmentation(
            p.inputVolume, p.ganCheckpoint, p.segCheckpoint, p.device, differenceThreshold=p.differenceThreshold,
            overlayOpacity=p.overlayOpacity, grow=p.growLesions, lungSegmentation=self._lungSegmentation()))

    def _lungSegmentation(self):
        """The segmentation whose "Lungs" segment replaces the computed lung mask, or None."""
        p = self._parameterNode
        if not p.reuseLungs:
            return None
        if p.segmentation is None:
            raise ValueError(_("'Use the edited lungs' is checked but there is no segmentation yet: segment once, correct "
                               "its Lungs segment in the Segment Editor, then segment again."))
        return p.segmentation

    def onBatchButton(self, checked=False) -> None:
        p = self._parameterNode
        self._startJob(self.ui.batchButton, lambda: self.logic.startBatch(
            p.batchInputFolder, p.batchOutputFolder, p.ganCheckpoint, p.segCheckpoint, p.device, grow=p.growLesions))

    def onTimer(self) -> None:
        job = self._job
        if job is None:
            self._timer.stop()
            return
        status = job.poll()
        self.ui.progressBar.value = int(round(100 * status.fraction))
        self.ui.statusLabel.text = "\n".join([status.text, *status.messages])
        if not status.done:
            return
        self._timer.stop()
        self._job = None
        self._jobButton.text = self._jobButtonText
        self._jobButton = None
        self.ui.progressBar.visible = False
        if status.state == jobs.JobState.FAILED:
            # the child's own message, shown once; no traceback (it is not a bug of this process)
            slicer.util.errorDisplay(_("Processing failed.") + "\n\n" + (job.errorText or ""), windowTitle=_("CovidGANSeg"))
        elif status.state == jobs.JobState.SUCCEEDED:
            with _errorsShown(_("Could not show the results.")):
                self._showJobResult(job.result)
        self._onParameterNodeModified()

    def _showJobResult(self, result) -> None:
        p = self._parameterNode
        with slicer.util.NodeModify(p):
            for key, attribute in (("pseudoHealthy", "pseudoHealthyVolume"), ("difference", "differenceVolume"),
                                   ("segmentation", "segmentation"), ("quantificationTable", "quantificationTable")):
                if result.get(key) is not None:
                    setattr(p, attribute, result[key])
        table = result.get("quantificationTable")
        if table is not None:
            self.ui.resultsTableView.setMRMLTableNode(table)
        if result.get("device"):
            self.ui.statusLabel.text = self.ui.statusLabel.text + "\n" + _("Computed on: {device}").format(device=result["device"])
        if result.get("csv"):
            self.ui.statusLabel.text = self.ui.statusLabel.text + "\n" + _("Results table: {path}").format(path=result["csv"])

    # -- immediate actions -------------------------------------------------------------------
    def onQuantifyButton(self, checked=False) -> None:
        with _errorsShown(_("Quantification failed."), waitCursor=True):
            p = self._parameterNode
            table = self.logic.quantify(p.segmentation, p.inputVolume, tableNode=p.quantificationTable)
            p.quantificationTable = table
            self.ui.resultsTableView.setMRMLTableNode(table)

    def onCompareButton(self, checked=False) -> None:
        with _errorsShown(_("Comparison failed."), waitCursor=True):
            p = self._parameterNode
            table = self.logic.compare(p.segmentation, p.groundTruth, p.inputVolume, tableNode=p.comparisonTable)
            p.comparisonTable = table
            self.ui.resultsTableView.setMRMLTableNode(table)
            self.logic.showTable(table)

    def onSegmentEditorButton(self, checked=False) -> None:
        """One click: the Segment Editor on the result, "Lesion" selected, the CT as source volume."""
        with _errorsShown(_("Could not open the Segment Editor."), waitCursor=True):
            p = self._parameterNode
            segmentationNode, sourceVolume = p.segmentation, p.inputVolume
            # its singleton parameter node first: the Segment Editor reads it when it is entered
            self.logic.prepareSegmentEditor(segmentationNode, sourceVolume)
            slicer.util.selectModule("SegmentEditor")
            editor = slicer.util.getModuleWidget("SegmentEditor").editor
            editor.setSegmentationNode(segmentationNode)
            editor.setSourceVolumeNode(sourceVolume)
            editor.setCurrentSegmentID(segmentations.segmentId(segmentationNode, segmentations.LESION_NAME))

    def onCompareAIButton(self, checked=False) -> None:
        with _errorsShown(_("Comparison with the AI result failed."), waitCursor=True):
            p = self._parameterNode
            table = self.logic.compareWithAIResult(p.segmentation, p.inputVolume, tableNode=p.reviewTable)
            p.reviewTable = table
            self.ui.resultsTableView.setMRMLTableNode(table)
            self.logic.showTable(table)

    def onExportButton(self, checked=False) -> None:
        with _errorsShown(_("Export failed."), waitCursor=True):
            p = self._parameterNode
            path = self.logic.exportLesionMask(p.segmentation, p.inputVolume, p.exportFolder, p.exportStudyId or None)
            self.ui.statusLabel.text = _("Corrected lesion mask written to {path}").format(path=path)


#
# CovidGANSegLogic
#

class CovidGANSegLogic(ScriptedLoadableModuleLogic):  # noqa: F405
    """Everything the module does, usable from the Python console and headless Slicer.

    Long operations come in two forms: ``startX(...)`` returns a :class:`jobs.Job` to poll (the
    Widget polls it with a QTimer, so the GUI never freezes) and ``x(...)`` runs it to the end.

    Attributes that tests and scripts may replace:
        processRunner: starts child processes (``process.SubprocessRunner``).
        cliCommand: command prefix of the library's CLI (default ``[PythonSlicer, "-m", "CovidGANSegLib"]``).
        extraEnvironment: variables added to the child's environment.
        verifyChecksums: check each checkpoint's SHA-256 against its model card before use.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)  # noqa: F405
        self.processRunner = process.SubprocessRunner()
        self.cliCommand = None
        self.extraEnvironment = {}
        self.verifyChecksums = True

    def getParameterNode(self):
        return CovidGANSegParameterNode(super().getParameterNode())

    # -- environment -------------------------------------------------------------------------
    def commandPrefix(self) -> list:
        return list(self.cliCommand) if self.cliCommand else [process.pythonExecutable(), "-m", "CovidGANSegLib"]

    def ensureDependencies(self, confirm) -> bool:
        """Install missing Python packages after ``confirm(question)`` says yes; True when ready."""
        return dependencies.ensureDependencies(confirm)

    def _workDirectory(self) -> pathlib.Path:
        base = getattr(slicer.app, "temporaryPath", None) or tempfile.gettempdir()
        pathlib.Path(base).mkdir(parents=True, exist_ok=True)
        return pathlib.Path(tempfile.mkdtemp(prefix="CovidGANSeg-", dir=base))

    def _writeInput(self, inputVolume, lungsKji=None):
        """A fresh work directory holding the input volume as NIfTI, and ``lungsKji`` (a ``[k, j, i]``
        mask on its grid) as ``input_lungs.nii`` when given: ``(work, inputPath, lungsPath or None)``."""
        work = self._workDirectory()
        try:
            inputPath = volumeio.writeVolumeNifti(inputVolume, work / "input.nii")
            lungsPath = None if lungsKji is None else volumeio.writeMaskNifti(lungsKji, inputVolume, work / "input_lungs.nii")
            return work, inputPath, lungsPath
        except Exception:
            shutil.rmtree(work, ignore_errors=True)
            raise

    # -- models ------------------------------------------------------------------------------
    def listModels(self, folder):
        """``(gan_cards, seg_cards)`` found under ``folder`` (model cards, no torch)."""
        cards = models.findModels(folder)
        return [c for c in cards if c.get("kind") == "gan"], [c for c in cards if c.get("kind") == "seg"]

    def describeModels(self, ganCheckpoint, segCheckpoint) -> str:
        parts = []
        for checkpoint, kind in ((ganCheckpoint, "gan"), (segCheckpoint, "seg")):
            if not checkpoint:
                continue
            try:
                parts.append(models.describe(models.checkModel(checkpoint, kind, verify=False)))
            except ValueError as exc:
                parts.append(f'<p style="color:#c00000">{exc}</p>')
        return "".join(parts) or models.describe(None)

    def checkModel(self, checkpoint, kind: str) -> dict:
        return models.checkModel(checkpoint, kind, verify=self.verifyChecksums)

    # -- pseudo-healthy ----------------------------------------------------------------------
    def startPseudoHealthy(self, inputVolume, ganCheckpoint, device: str = "auto", *, differenceThreshold: float = 100.0,
                           overlayOpacity: float = 0.5, show: bool = True):
        """Start generating "<input> pseudo-healthy" and "<input> difference" volumes; returns the job."""
        volumeio.checkInputVolume(inputVolume)
        self._checkDevice(device)
        gan = self.checkModel(ganCheckpoint, "gan")
        work, inputPath = self._writeInput(inputVolume)[:2]
        phPath, diffPath = work / "pseudo_healthy.nii", work / "difference.nii"

        argv = jobs.commandLineForDevice(self.commandPrefix(), protocol.PseudoHealthyParameters(
            checkpoint=gan["checkpoint_path"], input=inputPath, output=phPath, difference=diffPath, device=device))

        def onSuccess():
            with self._rollbackOnError() as created:
                ph = created(volumeio.addVolumeFromNifti(slicer.mrmlScene, phPath, inputVolume, f"{inputVolume.GetName()} pseudo-healthy"))
                diff = created(volumeio.addVolumeFromNifti(slicer.mrmlScene, diffPath, inputVolume, f"{inputVolume.GetName()} difference"))
                self._styleOutputs(inputVolume, ph, diff, differenceThreshold)
                if show:
                    display.showOverlay(slicer.mrmlScene, inputVolume, diff, overlayOpacity)
                return {"pseudoHealthy": ph, "difference": diff}

        return self._startCliJob(_("Pseudo-healthy generation"), argv, device, onSuccess, work, inputPath, inputVolume)

    def generatePseudoHealthy(self, inputVolume, ganCheckpoint, device: str = "auto", *, progressCallback=None, **kwargs) -> dict:
        """Blocking :meth:`startPseudoHealthy`: ``{"pseudoHealthy": node, "difference": node}``."""
        return self.startPseudoHealthy(inputVolume, ganCheckpoint, device, **kwargs).wait(progressCallback)

    # -- segmentation ------------------------------------------------------------------------
    def startSegmentation(self, inputVolume, ganCheckpoint, segCheckpoint, device: str = "auto", *, pseudoHealthy: bool = True,
                          differenceThreshold: float = 100.0, overlayOpacity: float = 0.5, show: bool = True, grow: bool = True,
                          lungSegmentation=None):
        """Start segmenting lungs and lesions; on success a segmentation node "<input> segmentation"
        (segments "Lungs" and "Lesion" on the input geometry), a quantification table and, with
        ``pseudoHealthy``, the pseudo-healthy and difference volumes are added to the scene.
        ``grow=False``: the AI detections alone, not grown into connected lesion-range density
        (``segment --no-growth``: more precise, loses most of the lesions' extent).
        ``lungSegmentation``: a segmentation whose "Lungs" segment, as it is now (after Segment Editor
        corrections), is used as the lung mask (``segment --input-lungs``) instead of computing one;
        dependent consolidation that the computed mask leaves out then stays in."""
        volumeio.checkInputVolume(inputVolume)
        self._checkDevice(device)
        # the GAN is needed for the pseudo-healthy / difference volumes; otherwise optional (the CLI
        # then only checks that both models share their preprocessing)
        gan = self.checkModel(ganCheckpoint, "gan") if (ganCheckpoint or pseudoHealthy) else None
        seg = self.checkModel(segCheckpoint, "seg")
        lungsGiven = self._lungsFrom(lungSegmentation, inputVolume) if lungSegmentation is not None else None
        work, inputPath, inputLungs = self._writeInput(inputVolume, lungsGiven)
        del lungsGiven
        paths = {k: work / f"{k}.nii" for k in ("lesion", "lungs", "pseudo_healthy", "difference")}
        reportPath = work / "report.json"

        argv = jobs.commandLineForDevice(self.commandPrefix(), protocol.SegmentParameters(
            input=inputPath, seg=seg["checkpoint_path"], gan=gan["checkpoint_path"] if gan is not None else None,
            output=paths["lesion"], lungs=paths["lungs"], report=reportPath,
            pseudo_healthy=paths["pseudo_healthy"] if pseudoHealthy else None,
            difference=paths["difference"] if pseudoHealthy else None, input_lungs=inputLungs, grow=grow, device=device))

        def onSuccess():
            import json

            name = inputVolume.GetName()
            lesionImage, lesion = segmentations.orientedMaskFromFile(paths["lesion"], inputVolume)  # read in place, no copy
            lungsImage, lungs = segmentations.orientedMaskFromFile(paths["lungs"], inputVolume)
            quantity = self._quantifyMasks(lesion.view(bool), lungs.view(bool), inputVolume)
            report = json.loads(reportPath.read_text()) if reportPath.is_file() else {}
            with self._rollbackOnError() as created:
                result = {"report": report}
                if pseudoHealthy:
                    result["pseudoHealthy"] = created(volumeio.addVolumeFromNifti(slicer.mrmlScene, paths["pseudo_healthy"], inputVolume,
                                                                                  f"{name} pseudo-healthy"))
                    result["difference"] = created(volumeio.addVolumeFromNifti(slicer.mrmlScene, paths["difference"], inputVolume,
                                                                               f"{name} difference"))
                    self._styleOutputs(inputVolume, result["pseudoHealthy"], result["difference"], differenceThreshold)
                segmentationNode = created(segmentations.createSegmentationNode(
                    slicer.mrmlScene, f"{name} segmentation", inputVolume,
                    [(segmentations.LUNGS_NAME, lungsImage, segmentations.LUNGS_COLOR),
                     (segmentations.LESION_NAME, lesionImage, segmentations.LESION_COLOR)]))
                # the AI result as produced, for "Compare with AI result" after Segment Editor corrections
                created(review.storeAIResult(slicer.mrmlScene, segmentationNode, lesion, inputVolume))
                del lesion, lungs, lesionImage, lungsImage
                result["segmentation"] = segmentationNode
                table = created(tables.newOrReusedTable(slicer.mrmlScene, None, f"{name} lesion quantification"))
                tables.fillTable(table, tables.QUANTIFICATION_COLUMNS, [self._quantificationRow(segmentationNode, quantity)])
                result["quantificationTable"] = table
                result["quantities"] = quantity
                result["device"] = report.get("device", "")
                if show:
                    display.showOverlay(slicer.mrmlScene, inputVolume, result.get("difference"), overlayOpacity)
                return result

        return self._startCliJob(_("Lesion segmentation"), argv, device, onSuccess, work, inputPath, inputVolume)

    @staticmethod
    def _lungsFrom(segmentationNode, inputVolume):
        """The "Lungs" segment of ``segmentationNode`` as it is now, ``[k, j, i]`` on the input's grid."""
        mask = segmentations.segmentMask(segmentationNode, segmentations.LUNGS_NAME, inputVolume)
        if not mask.any():
            raise ValueError(f"The '{segmentations.LUNGS_NAME}' segment of '{segmentationNode.GetName()}' is empty on "
                             f"'{inputVolume.GetName()}': paint the lungs, or segment without the edited lungs.")
        return mask

    def segmentLesions(self, inputVolume, ganCheckpoint, segCheckpoint, device: str = "auto", *, progressCallback=None, **kwargs) -> dict:
        """Blocking :meth:`startSegmentation`: ``{"segmentation", "quantificationTable", "pseudoHealthy", "difference", ...}``."""
        return self.startSegmentation(inputVolume, ganCheckpoint, segCheckpoint, device, **kwargs).wait(progressCallback)

    # -- batch -------------------------------------------------------------------------------
    def startBatch(self, inputFolder, outputFolder, ganCheckpoint, segCheckpoint, device: str = "auto", *, grow: bool = True):
        """Segment every ``.nii`` / ``.nii.gz`` CT in ``inputFolder``; masks and ``covidganseg_results.csv``
        go to ``outputFolder`` (one child process per case; CPU fallback; cancellable)."""
        self._checkDevice(device)
        gan = self.checkModel(ganCheckpoint, "gan")
        seg = self.checkModel(segCheckpoint, "seg")
        if not inputFolder or str(inputFolder) in ("", "."):
            raise ValueError("No batch input folder is selected.")
        if not outputFolder or str(outputFolder) in ("", "."):
            raise ValueError("No batch output folder is selected.")
        inputFolder, outputFolder = pathlib.Path(inputFolder), pathlib.Path(outputFolder)
        if not inputFolder.is_dir():
            raise ValueError(f"{inputFolder}: batch input folder not found")
        if outputFolder.resolve() == inputFolder.resolve():
            raise ValueError(f"{outputFolder}: choose an output folder other than the input folder (outputs are NIfTI files too)")
        files = sorted(f for f in inputFolder.iterdir() if f.is_file() and not f.name.startswith(".")
                       and (f.name.endswith(".nii") or f.name.endswith(".nii.gz")))
        if not files:
            raise ValueError(f"{inputFolder}: no NIfTI CT files (.nii, .nii.gz) in this folder")
        outputFolder.mkdir(parents=True, exist_ok=True)
        cases, seen = [], set()
        for f in files:
            caseId = f.name[:-7] if f.name.endswith(".nii.gz") else f.name[:-4]
            base, n = caseId, 2
            while caseId in seen:
                caseId, n = f"{base}_{n}", n + 1
            seen.add(caseId)
            cases.append(jobs.BatchCase(caseId, f, outputFolder / f"{caseId}_lesion.nii.gz", outputFolder / f"{caseId}_lungs.nii.gz",
                                        outputFolder / f"{caseId}_report.json"))

        def argvForCase(case, dev):
            return protocol.command_line(self.commandPrefix(), protocol.SegmentParameters(
                input=case.input, gan=gan["checkpoint_path"], seg=seg["checkpoint_path"], output=case.lesion, lungs=case.lungs,
                report=case.report, grow=grow), dev)

        return jobs.BatchJob(_("Batch segmentation"), cases, argvForCase, device=device, runner=self.processRunner,
                             env=process.childEnvironment(self.extraEnvironment), csvPath=outputFolder / "covidganseg_results.csv")

    def runBatch(self, inputFolder, outputFolder, ganCheckpoint, segCheckpoint, device: str = "auto", *, progressCallback=None,
                 grow: bool = True) -> dict:
        """Blocking :meth:`startBatch`: ``{"csv": path, "rows": [...], "failed": n}``."""
        return self.startBatch(inputFolder, outputFolder, ganCheckpoint, segCheckpoint, device, grow=grow).wait(progressCallback)

    # -- measurements ------------------------------------------------------------------------
    def quantify(self, segmentationNode, referenceVolume=None, *, tableNode=None):
        """Lesion mL, lung mL, percent involved and MosMed category of the segmentation as it is now
        (after any Segment Editor edits), in a table node (``tableNode`` is refilled if given)."""
        if segmentationNode is None:
            raise ValueError("No segmentation is selected: segment the lesions first.")
        referenceVolume = self._referenceVolume(segmentationNode, referenceVolume)
        lesion = segmentations.segmentMask(segmentationNode, segmentations.LESION_NAME, referenceVolume)
        lungs = segmentations.segmentMask(segmentationNode, segmentations.LUNGS_NAME, referenceVolume)
        quantity = self._quantifyMasks(lesion, lungs, referenceVolume)
        table = tables.newOrReusedTable(slicer.mrmlScene, tableNode, f"{segmentationNode.GetName()} quantification")
        tables.fillTable(table, tables.QUANTIFICATION_COLUMNS, [self._quantificationRow(segmentationNode, quantity)])
        return table

    def compare(self, segmentationNode, groundTruthNode, referenceVolume=None, *, tableNode=None, withHD95: bool = True):
        """Dice, sensitivity, specificity, precision, volumes and HD95 of the "Lesion" segment against a
        ground-truth segmentation or labelmap, in a table node. A ground truth on another grid is
        resampled onto the CT grid (nearest neighbour); one that does not overlap the CT is refused."""
        from CovidGANSegLib import metrics

        if segmentationNode is None:
            raise ValueError("No segmentation is selected: segment the lesions first.")
        referenceVolume = self._referenceVolume(segmentationNode, referenceVolume)
        prediction = segmentations.segmentMask(segmentationNode, segmentations.LESION_NAME, referenceVolume)
        truth, info = segmentations.groundTruthMask(groundTruthNode, referenceVolume)
        spacing = tuple(reversed(referenceVolume.GetSpacing()))  # arrays are [k, j, i]
        m = metrics.volume_metrics(prediction, truth, spacing, with_hd95=withHD95)
        difference = m["pred_ml"] - m["truth_ml"]
        row = {"Segmentation": segmentationNode.GetName(), "Ground truth": groundTruthNode.GetName(),
               "Dice": m["dice"], "Sensitivity": m["sensitivity"], "Specificity": m["specificity"], "Precision": m["precision"],
               "Segmented volume": m["pred_ml"], "Ground truth volume": m["truth_ml"], "Volume difference": difference,
               "Relative volume difference": 100.0 * difference / m["truth_ml"] if m["truth_ml"] > 0 else float("nan"),
               "HD95": m["hd95_mm"], "Ground truth resampled": "yes" if info["resampled"] else "no"}
        if info["resampled"]:
            logging.info("ground truth '%s' resampled onto the grid of '%s' (nearest neighbour)", groundTruthNode.GetName(),
                         referenceVolume.GetName())
        table = tables.newOrReusedTable(slicer.mrmlScene, tableNode, f"{segmentationNode.GetName()} vs {groundTruthNode.GetName()}")
        tables.fillTable(table, tables.COMPARISON_COLUMNS, [row])
        return table

    # -- display -----------------------------------------------------------------------------
    def showDifferenceOverlay(self, inputVolume, differenceVolume, opacity: float = 0.5, threshold: float = 100.0) -> None:
        display.styleDifferenceVolume(differenceVolume, thresholdHU=threshold)
        display.showOverlay(slicer.mrmlScene, inputVolume, differenceVolume, opacity)

    def setOverlayOpacity(self, opacity: float, foregroundVolume=None) -> None:
        """Foreground opacity in the slice views (only those showing ``foregroundVolume`` if given)."""
        display.setOverlayOpacity(slicer.mrmlScene, opacity, foregroundVolume)

    def setDifferenceThreshold(self, differenceVolume, threshold: float) -> None:
        displayNode = differenceVolume.GetDisplayNode() if differenceVolume is not None else None
        if displayNode is not None and displayNode.GetLowerThreshold() != threshold:
            displayNode.SetLowerThreshold(float(threshold))

    def showTable(self, tableNode) -> None:
        display.showTable(slicer.mrmlScene, slicer.app.applicationLogic(), tableNode)

    def prepareSegmentEditor(self, segmentationNode, sourceVolume):
        """The Segment Editor's parameter node on the segmentation, its CT as source, "Lesion" selected."""
        if segmentationNode is None:
            raise ValueError("No segmentation is selected: segment the lesions first.")
        if sourceVolume is None:
            raise ValueError("No input volume is selected: select the CT the segmentation was made from.")
        segmentations.segmentId(segmentationNode, segmentations.LESION_NAME)  # a clear error if there is no "Lesion"
        return display.prepareSegmentEditor(slicer.mrmlScene, segmentationNode, sourceVolume, segmentations.LESION_NAME)

    # -- review of Segment Editor corrections ---------------------------------------------------
    @staticmethod
    def hasAIResult(segmentationNode) -> bool:
        return review.aiResult(segmentationNode) is not None

    def compareWithAIResult(self, segmentationNode, referenceVolume=None, *, tableNode=None):
        """What the corrections changed: mL added and removed, Dice AI vs corrected, lesion components
        before and after, in a table node (``tableNode`` is refilled if given)."""
        if segmentationNode is None:
            raise ValueError("No segmentation is selected: segment the lesions first.")
        referenceVolume = self._referenceVolume(segmentationNode, referenceVolume)
        row = review.reviewRow(segmentationNode, referenceVolume)
        table = tables.newOrReusedTable(slicer.mrmlScene, tableNode, f"{segmentationNode.GetName()} corrections")
        tables.fillTable(table, review.REVIEW_COLUMNS, [row])
        return table

    def exportLesionMask(self, segmentationNode, referenceVolume=None, folder=None, studyId=None) -> pathlib.Path:
        """Write the (corrected) "Lesion" segment as ``folder/study_XXXX_mask.nii.gz`` on the CT's own grid,
        readable by ``covidganseg evaluate`` and as a MosMedData ``masks/`` file. ``studyId``: "study_0012",
        "12" or 12; by default taken from the CT's file or node name."""
        if segmentationNode is None:
            raise ValueError("No segmentation is selected: segment the lesions first.")
        referenceVolume = self._referenceVolume(segmentationNode, referenceVolume)
        return review.exportLesionMask(segmentationNode, referenceVolume, folder, studyId)

    # -- internals ---------------------------------------------------------------------------
    @staticmethod
    def _checkDevice(device: str) -> None:
        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {device!r}")

    def _startCliJob(self, name, argv, device, onSuccess, work, inputPath, inputVolume):
        job = jobs.CliJob(name, argv, device=device, onSuccess=onSuccess, runner=self.processRunner,
                          env=process.childEnvironment(self.extraEnvironment),
                          replacements={str(inputPath): f"input volume '{inputVolume.GetName()}'", str(work) + os.sep: ""})
        job.addCleanup(lambda: shutil.rmtree(work, ignore_errors=True))
        try:
            return job.start()
        except Exception:
            job.cancel()
            raise

    class _rollbackOnError:
        """``with self._rollbackOnError() as created: node = created(...)`` removes the nodes on error."""

        def __enter__(self):
            self.nodes = []

            def created(node):
                self.nodes.append(node)
                return node

            return created

        def __exit__(self, excType, exc, tb):
            if excType is not None:
                for node in reversed(self.nodes):
                    volumeio.removeNode(slicer.mrmlScene, node)
            return False

    def _styleOutputs(self, inputVolume, pseudoHealthyNode, differenceNode, threshold: float) -> None:
        if inputVolume.GetDisplayNode() is not None:
            pseudoHealthyNode.GetDisplayNode().AutoWindowLevelOff()
            pseudoHealthyNode.GetDisplayNode().SetWindowLevel(inputVolume.GetDisplayNode().GetWindow(),
                                                              inputVolume.GetDisplayNode().GetLevel())
        display.styleDifferenceVolume(differenceNode, thresholdHU=threshold)

    @staticmethod
    def _quantifyMasks(lesion, lungs, referenceVolume) -> dict:
        from CovidGANSegLib.quantify import quantify

        return quantify(lesion, lungs, tuple(reversed(referenceVolume.GetSpacing())))

    @staticmethod
    def _quantificationRow(segmentationNode, quantity) -> dict:
        return {"Segmentation": segmentationNode.GetName(), "Lesion volume": quantity["lesion_ml"], "Lung volume": quantity["lung_ml"],
                "Involvement": quantity["percent_involved"], "MosMed category": quantity["mosmed_category"]}

    def _referenceVolume(self, segmentationNode, referenceVolume):
        if referenceVolume is None:
            referenceVolume = segmentationNode.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
        if referenceVolume is None:
            raise ValueError(f"Segmentation '{segmentationNode.GetName()}' has no reference CT: select the input volume.")
        return referenceVolume


#
# CovidGANSegTest
#

class CovidGANSegTest(ScriptedLoadableModuleTest):  # noqa: F405
    """Exercises the Logic for real: input checks, quantification and comparison against hand-known
    numbers, and - when models are found (``$COVIDGANSEG_MODELS`` or ``~/.covidganseg/models``) - lesion
    segmentation and cancellation through the library's command line in a child process."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_InputChecks()
        self.setUp()
        self.test_QuantifyAndCompare()
        self.setUp()
        self.test_ReviewAndExportUnderATransform()
        self.setUp()
        self.test_SegmentAndCancel()

    # helpers
    def _phantomVolume(self, name="phantom CT"):
        """A 64 x 48 x 24 chest-like volume (air, body, two lungs, a lesion) on an oblique LPS grid."""
        import numpy as np

        k, j, i = np.mgrid[0:24, 0:48, 0:64]
        hu = np.full((24, 48, 64), -1000, dtype=np.int16)
        body = ((i - 32) / 30.0) ** 2 + ((j - 24) / 22.0) ** 2 <= 1.0
        hu[body] = 40
        lungs = (((i - 18) / 10.0) ** 2 + ((j - 24) / 14.0) ** 2 <= 1.0) | (((i - 46) / 10.0) ** 2 + ((j - 24) / 14.0) ** 2 <= 1.0)
        lungs &= (k >= 2) & (k < 22)
        hu[lungs] = -850
        lesion = lungs & (i >= 12) & (i < 22) & (j >= 20) & (j < 30) & (k >= 8) & (k < 14)
        hu[lesion] = -350
        ijkToRas = np.array([[-0.8, 0.0, 0.0, 25.0], [0.0, -0.8, 0.0, 19.0], [0.0, 0.0, 2.5, -30.0], [0, 0, 0, 1]])
        node = slicer.util.addVolumeFromArray(hu, ijkToRas, name)
        return node, lungs.astype(np.uint8), lesion.astype(np.uint8)

    def test_InputChecks(self):
        import numpy as np

        self.delayDisplay("Input checks")
        logic = CovidGANSegLogic()
        with self.assertRaisesRegex(ValueError, "No input volume"):
            logic.startPseudoHealthy(None, "model.pt")
        flat = slicer.util.addVolumeFromArray(np.zeros((1, 32, 32), dtype=np.int16), name="one slice")
        with self.assertRaisesRegex(ValueError, "2D"):
            logic.startSegmentation(flat, "gan.pt", "seg.pt")
        volume, _, _ = self._phantomVolume()
        with self.assertRaisesRegex(ValueError, "No pseudo-healthy GAN model"):
            logic.startPseudoHealthy(volume, "")
        with self.assertRaisesRegex(ValueError, "not found"):
            logic.startPseudoHealthy(volume, "/nonexistent/gan.pt")
        foreign = pathlib.Path(tempfile.mkdtemp()) / "foreign.pt"
        foreign.write_bytes(b"not a CovidGANSeg checkpoint")
        try:
            with self.assertRaisesRegex(ValueError, "not a CovidGANSeg model"):
                logic.startPseudoHealthy(volume, str(foreign))
        finally:
            shutil.rmtree(foreign.parent, ignore_errors=True)
        with self.assertRaisesRegex(ValueError, "device"):
            logic.startPseudoHealthy(volume, "gan.pt", "tpu")
        self.delayDisplay("Input checks passed")

    def test_QuantifyAndCompare(self):
        import numpy as np

        self.delayDisplay("Quantification and comparison")
        logic = CovidGANSegLogic()
        volume, lungs, lesion = self._phantomVolume()
        segmentation = segmentations.createSegmentationNode(
            slicer.mrmlScene, "known segmentation", volume,
            [(segmentations.LUNGS_NAME, lungs, segmentations.LUNGS_COLOR), (segmentations.LESION_NAME, lesion, segmentations.LESION_COLOR)])
        voxelMl = float(np.prod(volume.GetSpacing())) / 1000.0
        row = tables.tableRows(logic.quantify(segmentation, volume))[0]
        self.assertAlmostEqual(row["Lesion volume"], lesion.sum() * voxelMl, places=6)
        self.assertAlmostEqual(row["Lung volume"], lungs.sum() * voxelMl, places=6)
        self.assertAlmostEqual(row["Involvement"], 100.0 * lesion.sum() / lungs.sum(), places=6)
        # ground truth = the lesion shifted by 2 voxels along i: Dice = 2 |A & B| / (|A| + |B|)
        truth = np.roll(lesion, 2, axis=2)
        gt = slicer.util.addVolumeFromArray(truth, volumeio.ijkToRasArray(volume), "ground truth", nodeClassName="vtkMRMLLabelMapVolumeNode")
        overlap = float(np.count_nonzero(lesion & truth))
        before = slicer.mrmlScene.GetNumberOfNodes()
        row = tables.tableRows(logic.compare(segmentation, gt, volume))[0]
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before + 1)  # the table; temporary nodes removed
        self.assertAlmostEqual(row["Dice"], 2 * overlap / (lesion.sum() + truth.sum()), places=6)
        self.assertAlmostEqual(row["Sensitivity"], overlap / truth.sum(), places=6)
        self.assertAlmostEqual(row["Precision"], overlap / lesion.sum(), places=6)
        self.assertEqual(row["Ground truth resampled"], "no")
        self.delayDisplay("Quantification and comparison passed")

    def test_ReviewAndExportUnderATransform(self):
        """The correction round trip on a CT under a parent transform: AI result kept, a correction,
        "Compare with AI result" figures known by hand, the export on the CT's own grid."""
        import numpy as np

        self.delayDisplay("Review of corrections and export")
        logic = CovidGANSegLogic()
        volume, lungs, lesion = self._phantomVolume("study_0042")
        transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
        shift = np.eye(4)
        shift[:3, 3] = (10.0, -4.0, 2.0)
        transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
        volume.SetAndObserveTransformNodeID(transform.GetID())
        segmentation = segmentations.createSegmentationNode(
            slicer.mrmlScene, "AI segmentation", volume,
            [(segmentations.LUNGS_NAME, lungs, segmentations.LUNGS_COLOR), (segmentations.LESION_NAME, lesion, segmentations.LESION_COLOR)])
        review.storeAIResult(slicer.mrmlScene, segmentation, lesion, volume)
        np.testing.assert_array_equal(segmentations.segmentMask(segmentation, segmentations.LESION_NAME, volume), lesion.astype(bool))
        # the correction: the lesion's first two slices erased, a second lesion painted in the other lung
        corrected = lesion.astype(bool).copy()
        corrected[8:10] = False
        corrected[10:14, 20:26, 42:50] = True
        lesionId = segmentations.segmentId(segmentation, segmentations.LESION_NAME)
        slicer.util.updateSegmentBinaryLabelmapFromArray(corrected.astype(np.uint8), segmentation, lesionId, volume)
        row = tables.tableRows(logic.compareWithAIResult(segmentation, volume))[0]
        ai = lesion.astype(bool)
        voxelMl = float(np.prod(volume.GetSpacing())) / 1000.0
        self.assertAlmostEqual(row["Added"], (corrected & ~ai).sum() * voxelMl, places=6)
        self.assertAlmostEqual(row["Removed"], (ai & ~corrected).sum() * voxelMl, places=6)
        self.assertAlmostEqual(row["Dice AI vs corrected"], 2.0 * (ai & corrected).sum() / (ai.sum() + corrected.sum()), places=9)
        self.assertEqual((row["Lesion components (AI)"], row["Lesion components (corrected)"]), (1.0, 2.0))
        if not dependencies.isInstalled("nibabel"):
            self.delayDisplay("nibabel is not installed yet: the export part is skipped")
            return
        folder = pathlib.Path(tempfile.mkdtemp())
        try:
            path = logic.exportLesionMask(segmentation, volume, folder)
            self.assertEqual(path.name, "study_0042_mask.nii.gz")
            import nibabel as nib

            image = nib.load(str(path))
            np.testing.assert_allclose(image.affine, volumeio.ijkToRasArray(volume), atol=1e-4)
            np.testing.assert_array_equal(np.asarray(image.dataobj).transpose(2, 1, 0), corrected.astype(np.uint8))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.delayDisplay("Review of corrections and export passed")

    def test_SegmentAndCancel(self):
        import numpy as np

        logic = CovidGANSegLogic()
        gans, segs = logic.listModels(models.defaultModelsFolder())
        if not gans or not segs:
            self.delayDisplay(f"No models in {models.defaultModelsFolder()}: lesion segmentation test skipped "
                              "(set COVIDGANSEG_MODELS to a folder with a GAN and a segmenter)")
            return
        self.delayDisplay("Lesion segmentation through the library's command line")
        volume, _, _ = self._phantomVolume()
        before = slicer.mrmlScene.GetNumberOfNodes()
        job = logic.startSegmentation(volume, gans[0]["checkpoint_path"], segs[0]["checkpoint_path"], "cpu")
        job.cancel()
        self.assertEqual(job.state, jobs.JobState.CANCELLED)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)
        result = logic.segmentLesions(volume, gans[0]["checkpoint_path"], segs[0]["checkpoint_path"], "cpu")
        segmentation = result["segmentation"]
        for name in (segmentations.LUNGS_NAME, segmentations.LESION_NAME):
            mask = segmentations.segmentMask(segmentation, name, volume)
            self.assertEqual(mask.shape, slicer.util.arrayFromVolume(volume).shape)
        self.assertTrue(volumeio.sameGeometry(result["pseudoHealthy"], volume))
        self.assertTrue(volumeio.sameGeometry(result["difference"], volume))
        self.delayDisplay("Segmenting again with the Lungs segment as corrected in the Segment Editor")
        edited = segmentations.segmentMask(segmentation, segmentations.LUNGS_NAME, volume)
        edited[:, : edited.shape[1] // 8, :] = True  # a band along one side of the volume added by hand
        lungsId = segmentations.segmentId(segmentation, segmentations.LUNGS_NAME)
        slicer.util.updateSegmentBinaryLabelmapFromArray(edited.astype(np.uint8), segmentation, lungsId, volume)
        again = logic.segmentLesions(volume, gans[0]["checkpoint_path"], segs[0]["checkpoint_path"], "cpu", pseudoHealthy=False,
                                     lungSegmentation=segmentation)
        np.testing.assert_array_equal(segmentations.segmentMask(again["segmentation"], segmentations.LUNGS_NAME, volume), edited)
        self.delayDisplay("Lesion segmentation passed")

