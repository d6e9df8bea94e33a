"""FSEFT Segment: adapt a CT foundation model to the structures you annotate, and segment with it.

A thin face: every decision lives in `FSEFTSegmentLib.panel` (Qt-free, tested against real MRML);
this file copies its answers into Qt widgets and the user's clicks back into the parameter node.
The engine runs in its own PythonSlicer process (torch never enters Slicer's), followed by `jobs.py`."""

import os
import sys
import tempfile

import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "FSEFTSegmentLib")) and _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)  # a source checkout: the engine sits beside this folder

from FSEFTSegmentLib import adapter_library, panel
from FSEFTSegmentLib.jobs import TORCH_REQUIREMENT, JobState, missing_requirements, protected_pins


class FSEFTSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        parent.title = "FSEFT Segment"
        parent.categories = ["Segmentation"]
        parent.contributors = ["FSEFTSegment developers (https://github.com/fseft)"]
        parent.helpText = (
            "Teaches a CT foundation model the structures you annotate on a few volumes (Adapt), then segments"
            " any loaded volume with the adapted model or the model itself. The engine runs in a separate process;"
            ' buttons turn into Cancel while it runs. See the <a href="https://github.com/fseft/SlicerFSEFTSegment#readme">README</a>.')
        parent.acknowledgementText = (
            "Method and model: J. Silva-Rodríguez, J. Dolz, I. Ben Ayed. Towards Foundation Models and Few-Shot"
            " Parameter-Efficient Fine-Tuning for Volumetric Organ Segmentation. Medical Image Analysis 103 (2025) 103596.")


class FSEFTSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Widgets <-> `panel`: `refresh()` shows the panel's decisions, the handlers write the user's choices."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.jobButton = None  # the button that is Cancel while its job runs
        self.jobButtonText = ""
        self._updating = False
        self._logShown = 0  # log lines already in the log pane
        self._answers = -1  # the engine answers shown (EngineQueries.version)
        self.timer = qt.QTimer()
        self.timer.setInterval(250)  # drains job events and engine answers; never a processEvents() loop
        self.timer.timeout.connect(self.onTimer)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FSEFTSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = FSEFTSegmentLogic()
        self.ui.adaptersTable.setHorizontalHeaderLabels(list(panel.ADAPTER_COLUMNS))
        self.ui.supportsTable.setHorizontalHeaderLabels(["volume", "segments"])
        self.plot = slicer.qMRMLPlotWidget()
        self.plot.setMRMLScene(slicer.mrmlScene)
        self.ui.lossPlotFrame.layout().addWidget(self.plot)
        ui = self.ui
        for widget, signal in ((ui.modelComboBox, "currentIndexChanged(int)"), (ui.deviceComboBox, "currentIndexChanged(int)"),
                               (ui.methodComboBox, "currentIndexChanged(int)"), (ui.tuneDecoderCheckBox, "toggled(bool)"),
                               (ui.sizePriorCheckBox, "toggled(bool)"), (ui.softmaxHeadCheckBox, "toggled(bool)"), (ui.seedSpinBox, "valueChanged(int)"),
                               (ui.maxEpochsSpinBox, "valueChanged(int)"), (ui.structuresComboBox, "checkedIndexesChanged()"),
                               (ui.supportsTable, "itemChanged(QTableWidgetItem*)"), (ui.queryVolumesSelector, "checkedNodesChanged()"),
                               (ui.segmentVolumesSelector, "checkedNodesChanged()"), (ui.structuresLineEdit, "editingFinished()"),
                               (ui.adaptersTable, "itemSelectionChanged()")):
            widget.connect(signal, self.onUserChange)
        for button, handler in ((ui.adaptButton, self.onAdapt), (ui.applyButton, self.onSegment),
                                (ui.predictAdapterButton, self.onPredictWithAdapter), (ui.downloadButton, self.onDownload),
                                (ui.importModelButton, self.onImportModel), (ui.deleteAdapterButton, self.onDeleteAdapter),
                                (ui.exportAdapterButton, self.onExportAdapter), (ui.importAdapterButton, self.onImportAdapter),
                                (ui.refreshAdaptersButton, self.refreshAdapters)):
            button.connect("clicked(bool)", lambda checked=False, handler=handler: handler())
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        for event in (slicer.mrmlScene.NodeAddedEvent, slicer.mrmlScene.NodeRemovedEvent):
            self.addObserver(slicer.mrmlScene, event, self.onSceneChanged)
        self.refreshAdapters()
        self.timer.start()

    def cleanup(self):
        self.logic.panel.stop()  # no engine process outlives the module
        self.timer.stop()
        self.removeObservers()

    def enter(self):
        self.refresh()

    def onSceneStartClose(self, caller, event):
        self.logic.panel.stop()  # its volumes are about to go: nothing to import into

    def onSceneEndClose(self, caller, event):
        self.refresh()

    def onSceneChanged(self, caller, event):
        qt.QTimer.singleShot(0, self.refresh)  # after the node is fully added or removed

    # -- the panel's decisions into the widgets

    def refresh(self):
        """Show the panel's current decisions. Cheap: the engine's answers arrive in the background."""
        if self._updating or self.logic is None:
            return
        self._updating = True
        try:
            self._refresh()
        finally:
            self._updating = False

    def _refresh(self):
        ui, logic, p = self.ui, self.logic.panel, self.logic.panel.parameters
        missing = panel.dependencies_problem()
        ask = (lambda *args: None) if missing else logic.queries.get  # the engine cannot answer before its install
        self._answers = logic.queries.version
        models = panel.model_rows(ask("models", "list"))
        model = panel.chosen_model(p)
        _fill(ui.modelComboBox, [row["label"] for row in models], next((i for i, r in enumerate(models) if r["name"] == model), 0))
        modelIssue = missing or panel.model_problem(models, model) or logic.queries.error("models", "list")
        ui.modelStatusLabel.text = modelIssue or "Ready."
        ui.downloadButton.enabled = panel.downloadable(models, model) or self.jobButton == "downloadButton"
        device = panel.device_summary(ask("device"), p.device)
        ui.deviceInfoLabel.text = logic.queries.error("device") or device["text"]
        ui.deviceComboBox.setCurrentText(p.device)

        annotations = logic.annotations()
        choices = panel.structure_choices(annotations)
        _fillChecked(ui.structuresComboBox, [f"{name} (K = {k})" for name, k in choices], [name in p.structures for name, _ in choices])
        candidates = panel.support_candidates(annotations, p.structures)
        supportIds = {v.GetID() for v in p.volumes("support")}
        ui.supportsTable.setRowCount(len(candidates))
        for row, annotation in enumerate(candidates):
            item = qt.QTableWidgetItem(annotation.volume.GetName())
            item.setFlags(qt.Qt.ItemIsUserCheckable | qt.Qt.ItemIsEnabled)
            item.setCheckState(qt.Qt.Checked if annotation.volume.GetID() in supportIds else qt.Qt.Unchecked)
            item.setData(qt.Qt.UserRole, annotation.volume.GetID())
            ui.supportsTable.setItem(row, 0, item)
            ui.supportsTable.setItem(row, 1, qt.QTableWidgetItem(", ".join(annotation.segment_names)))
        supports = p.volumes("support")
        ui.kLabel.text = f"K = {len(supports)} support volume(s) of {len(candidates)} annotated with {', '.join(p.structures) or '—'}"

        methods = panel.method_rows(ask(*panel.methods_query(model, len(p.structures), p.tuneDecoder)), device)
        _fill(ui.methodComboBox, [row["label"] for row in methods], next((i for i, r in enumerate(methods) if r["method"] == p.method), 0))
        method = next((r for r in methods if r["method"] == p.method), methods[0])
        ui.methodCostLabel.text = method.get("note", "") + ("" if method.get("fits") is not False else
                                                            "  — more than the GPU's free memory: expect the CPU fallback or pick a lighter method")
        ui.tuneDecoderCheckBox.checked, ui.seedSpinBox.value, ui.maxEpochsSpinBox.value = p.tuneDecoder, p.seed, p.maxEpochs
        ui.softmaxHeadCheckBox.checked = p.softmaxHead
        ui.sizePriorCheckBox.enabled = panel.size_prior_allowed(method["black_box"], p.tuneDecoder)
        ui.sizePriorCheckBox.checked = p.sizePrior and ui.sizePriorCheckBox.enabled
        for selector, role in ((ui.queryVolumesSelector, "query"), (ui.segmentVolumesSelector, "segment")):
            checked = {v.GetID() for v in p.volumes(role)}
            for node in panel.scalar_volumes(slicer.mrmlScene):
                selector.setCheckState(node, qt.Qt.Checked if node.GetID() in checked else qt.Qt.Unchecked)
        ui.structuresLineEdit.text = p.predictStructures

        running = logic.running
        adapt = panel.adapt_readiness(running=running, model_issue=modelIssue, structures=p.structures, supports=supports,
                                      method=p.method, size_prior=p.sizePrior, black_box=method["black_box"],
                                      queries=p.volumes("query"))
        segment = panel.segment_readiness(running=running, volumes=p.volumes("segment"), model_issue=modelIssue)
        predict = panel.segment_readiness(running=running, volumes=p.volumes("segment"), adapter=self.selectedAdapter() or "")
        for name, readiness in (("adaptButton", adapt), ("applyButton", segment), ("predictAdapterButton", predict)):
            getattr(ui, name).enabled = readiness.ok or self.jobButton == name
            getattr(ui, name).toolTip = readiness.reason
        for name in ("importModelButton", "importAdapterButton", "deleteAdapterButton", "exportAdapterButton"):
            needsAdapter = name in ("deleteAdapterButton", "exportAdapterButton")
            getattr(ui, name).enabled = self.jobButton == name or (not running and (not needsAdapter or bool(self.selectedAdapter())))
        ui.statusLabel.text = "" if running else next((r.reason for r in (adapt, segment) if not r.ok), "")

    def refreshAdapters(self):
        rows = panel.adapter_rows(self.logic.panel.adapters_root)
        table = self.ui.adaptersTable
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, text in enumerate(row["cells"]):
                item = qt.QTableWidgetItem(text)
                item.setData(qt.Qt.UserRole, row["path"])
                item.setFlags(qt.Qt.ItemIsSelectable | qt.Qt.ItemIsEnabled)
                table.setItem(r, c, item)
        table.resizeColumnsToContents()

    def selectedAdapter(self):
        items = self.ui.adaptersTable.selectedItems()
        return items[0].data(qt.Qt.UserRole) if items else None

    # -- the user's choices into the parameter node

    def onUserChange(self, *args):
        if self._updating:
            return
        ui, logic = self.ui, self.logic.panel
        p = logic.parameters
        models = panel.model_rows(logic.queries.get("models", "list"))
        if 0 <= ui.modelComboBox.currentIndex < len(models):
            p.model = models[ui.modelComboBox.currentIndex]["name"]
        p.device = ui.deviceComboBox.currentText
        choices = panel.structure_choices(logic.annotations())
        structures = [choices[index.row()][0] for index in ui.structuresComboBox.checkedIndexes() if index.row() < len(choices)]
        if structures != p.structures:  # new targets: supports and queries follow them
            p.structures = structures
            annotations = logic.annotations()
            p.set_volumes("support", [a.volume for a in panel.support_candidates(annotations, structures)])
            p.set_volumes("query", panel.default_queries(slicer.mrmlScene, annotations, structures))
        else:
            checked = [ui.supportsTable.item(r, 0) for r in range(ui.supportsTable.rowCount)]
            p.set_volumes("support", [slicer.mrmlScene.GetNodeByID(i.data(qt.Qt.UserRole)) for i in checked
                                      if i is not None and i.checkState() == qt.Qt.Checked])
            p.set_volumes("query", list(ui.queryVolumesSelector.checkedNodes()))
        p.set_volumes("segment", list(ui.segmentVolumesSelector.checkedNodes()))
        p.method = panel.ADAPTATION_METHODS[ui.methodComboBox.currentIndex] if ui.methodComboBox.currentIndex >= 0 else p.method
        p.tuneDecoder, p.sizePrior, p.softmaxHead = ui.tuneDecoderCheckBox.checked, ui.sizePriorCheckBox.checked, ui.softmaxHeadCheckBox.checked
        p.seed, p.maxEpochs, p.predictStructures = ui.seedSpinBox.value, ui.maxEpochsSpinBox.value, ui.structuresLineEdit.text
        self.refresh()

    # -- jobs

    def startJob(self, buttonName, start):
        """The button of the running job cancels it; otherwise start one (dependencies first)."""
        if self.logic.panel.running:
            self.logic.panel.cancel()
            return
        with slicer.util.tryWithErrorDisplay("Could not start:", waitCursor=True):
            if buttonName != "downloadButton" and not self.logic.ensureDependencies():
                return
            start()
            self.jobButton, self.jobButtonText = buttonName, getattr(self.ui, buttonName).text
            getattr(self.ui, buttonName).text = "Cancel"
            if buttonName == "adaptButton":
                self.showLossCurve()
        self.onTimer()

    def showLossCurve(self):
        """Point the embedded plot at the panel's loss chart (its view node is made once per scene)."""
        viewNode = slicer.mrmlScene.GetSingletonNode("FSEFTSegmentLoss", "vtkMRMLPlotViewNode")
        if viewNode is None:
            viewNode = slicer.vtkMRMLPlotViewNode()
            viewNode.SetSingletonTag("FSEFTSegmentLoss")
            viewNode = slicer.mrmlScene.AddNode(viewNode)
        self.plot.setMRMLPlotViewNode(viewNode)
        viewNode.SetPlotChartNodeID(self.logic.panel.curve.chart.GetID())
        self.ui.lossCollapsibleButton.collapsed = False

    def onAdapt(self):
        self.startJob("adaptButton", self.logic.panel.start_adapt)

    def onSegment(self):
        self.startJob("applyButton", self.logic.panel.start_segment)

    def onPredictWithAdapter(self):
        self.startJob("predictAdapterButton", lambda: self.logic.panel.start_segment(self.selectedAdapter()))

    def onDownload(self):
        self.startJob("downloadButton", lambda: self.logic.panel.start_download(panel.chosen_model(self.logic.panel.parameters)))

    def onImportModel(self):
        path = qt.QFileDialog.getOpenFileName(None, "Import a model checkpoint", "", "Checkpoints (*.pth *.pt *.safetensors)")
        name = path and qt.QInputDialog.getText(None, "Import a model", "Name for this model:", qt.QLineEdit.Normal,
                                                os.path.splitext(os.path.basename(path))[0])
        if path and name:
            self.startJob("importModelButton", lambda: self.logic.panel.start_model_import(path, name))

    def onImportAdapter(self):
        path = qt.QFileDialog.getOpenFileName(None, "Import an adapter", "", "Adapter (*.zip)")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("Not an adapter this module can import:"):
            metadata = adapter_library.read_zip_metadata(path)
            if slicer.util.confirmOkCancelDisplay("Import this adapter?\n\n" + panel.adapter_summary(metadata)):
                self.startJob("importAdapterButton", lambda: self.logic.panel.start_adapter_import(path))

    def onExportAdapter(self):
        adapter = self.selectedAdapter()
        path = adapter and qt.QFileDialog.getSaveFileName(None, "Export the adapter", os.path.basename(adapter) + ".zip", "Adapter (*.zip)")
        if path:
            with slicer.util.tryWithErrorDisplay("Export failed:"):
                adapter_library.export_adapter(adapter, path)
                slicer.util.infoDisplay(f"Adapter exported to {path}")

    def onDeleteAdapter(self):
        adapter = self.selectedAdapter()
        if adapter and slicer.util.confirmYesNoDisplay(f"Delete the adapter {os.path.basename(adapter)} from disk?"):
            with slicer.util.tryWithErrorDisplay("Delete failed:"):
                adapter_library.delete_adapter(adapter, self.logic.panel.adapters_root)
            self.refreshAdapters()

    def onTimer(self):
        logic = self.logic.panel
        events = logic.poll()
        for line in logic.log_since(self._logShown):
            self.ui.logTextEdit.appendPlainText(line)
        self._logShown = logic.log_count
        if logic.record is not None:
            job = logic.record.job
            self.ui.progressBar.visible = not job.state.finished
            self.ui.progressBar.value = round(100 * job.fraction)
            self.ui.progressLabel.text = panel.progress_text(job)
            if job.state.finished and self.jobButton:
                getattr(self.ui, self.jobButton).text = self.jobButtonText
                self.jobButton = None
                self.ui.resultsLabel.text = "\n".join([r["name"] for r in logic.results] + [f for r in logic.results for f in r["flags"]])
                self.refreshAdapters()
                if job.state is JobState.FAILED:
                    slicer.util.errorDisplay(f"{logic.record.kind} failed: {job.message}", detailedText="\n".join(logic.log[-200:]))
        if events or logic.queries.version != self._answers:
            self.refresh()


def _fill(combo, labels, current):
    """Replace a combo box's items without emitting a change per item."""
    combo.blockSignals(True)
    if [combo.itemText(i) for i in range(combo.count)] != labels:
        combo.clear()
        combo.addItems(labels)
    combo.setCurrentIndex(current)
    combo.blockSignals(False)


def _fillChecked(combo, labels, checked):
    combo.blockSignals(True)
    if [combo.itemText(i) for i in range(combo.count)] != labels:
        combo.clear()
        combo.addItems(labels)
    for row, on in enumerate(checked):
        combo.setCheckState(combo.model().index(row, 0), qt.Qt.Checked if on else qt.Qt.Unchecked)
    combo.blockSignals(False)


class FSEFTSegmentLogic(ScriptedLoadableModuleLogic):
    """Slicer's logic: the Qt-free `PanelLogic` on this application's scene, plus what needs Slicer's
    GUI helpers (dependency installation). Scripts use `.panel` directly."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.panel = panel.PanelLogic(slicer.mrmlScene, work_root=slicer.app.temporaryPath)

    def ensureDependencies(self):
        """PyTorch through SlicerPyTorch (it picks the build for the GPU driver), then the engine's other
        packages after consent, pinned so that Slicer's own numpy/SimpleITK are never upgraded; False
        when the user declines. On the main thread, as pip must be."""
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise RuntimeError("FSEFT Segment needs the PyTorch extension: install it from the Extensions Manager, then restart Slicer.") from None
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():  # reads package metadata, does not import torch
            if torchLogic.installTorch(askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT.removeprefix("torch")) is None:
                return False
        missing = missing_requirements()
        if missing and not slicer.util.confirmOkCancelDisplay(
                "FSEFT Segment needs these Python packages (a one-time download):\n\n" + "\n".join(missing) + "\n\nInstall them now?"):
            return False
        if missing:
            constraints = os.path.join(tempfile.mkdtemp(dir=slicer.app.temporaryPath), "constraints.txt")
            with open(constraints, "w", encoding="utf-8") as file:
                file.write("\n".join(protected_pins()) + "\n")
            try:
                slicer.util.pip_install(" ".join(f'"{m}"' for m in missing) + f' -c "{constraints}"')
            except Exception as error:
                raise RuntimeError(f"Installing {', '.join(missing)} failed ({error}). Check the network connection and"
                                   " try again, or install them from Slicer's Python console with slicer.util.pip_install.") from None
        return True


class FSEFTSegmentTest(ScriptedLoadableModuleTest):
    """Self-test, offline: phantoms annotated as supports, a short real adaptation of the bundled model
    through the background job, the query's result imported and scored against the phantom's truth
    (under a minute on a CPU). The test suite runs this class headless, against slicer-core."""

    #: Spleen Dice of the linear probe on the query phantom: DICE measured headless, minus a margin.
    PHANTOM_SPLEEN_DICE_FLOOR = 0.5

    def runTest(self):
        slicer.mrmlScene.Clear()
        self.test_adapt_on_phantoms()

    def test_adapt_on_phantoms(self):
        if missing_requirements():
            self.delayDisplay("Skipped: install the engine's packages first (press Adapt once)")
            return
        from FSEFTSegmentLib.phantom_workflow import adapt_on_phantoms

        self.logic = FSEFTSegmentLogic()
        self.outcome = adapt_on_phantoms(self.logic.panel)
        self.assertIs(self.outcome["job"].state, JobState.COMPLETED, self.outcome["job"].message)
        self.assertGreater(self.outcome["dice"], self.PHANTOM_SPLEEN_DICE_FLOOR)
        self.delayDisplay(f"Adapted on two phantoms: spleen Dice {self.outcome['dice']:.2f} on the third")
