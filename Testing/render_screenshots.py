#!/usr/bin/env python3
"""Render the documentation screenshots into Resources/Screenshots/ (`make screenshots`).

A documentation tool, not a test. It writes:

* ``slice-overlay.png`` (axial) and ``slice-overlay-coronal.png``: the real abdomen CT of
  ``../shared/data/real-ct/totalseg-abdomen`` segmented by the bundled model through the real engine
  (``python -m FSEFTSegmentLib predict ...``), loaded into a headless MRML scene (PyPI ``slicer-core``)
  with Slicer's own storage nodes, and drawn by Slicer's slice logic and segmentations displayable
  manager (outline + fill, the segments' own colours) into an offscreen VTK window (EGL / Mesa
  llvmpipe, no X server). Radiological convention as in Slicer: the patient's right is on the image
  left. Skipped, with a message, when the shared data is missing.
* ``panel.png``: the module panel, built from ``FSEFTSegment/Resources/UI/FSEFTSegment.ui`` by PySide6
  offscreen. Slicer/CTK widget classes are unknown to plain Qt, so the .ui XML is rewritten to plain
  Qt stand-ins first (generic: a class-name table, then the ``<customwidget> extends`` chain, then
  QWidget), and a few widgets get demo values. It is a Qt rendering with stand-in widgets, not
  Slicer itself.

System packages: ``libegl1 libegl-mesa0 libgl1-mesa-dri`` (offscreen VTK) and fonts (DejaVu).
Python: the project venv with slicer-core + vtk, plus ``PySide6-Essentials`` (not a test dependency).

    python Testing/render_screenshots.py [--only overlay|panel] [--out DIR] [--expand-all]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "Resources" / "Screenshots"
SHARED_DATA = ROOT.parent / "shared" / "data"
CT_PATH = SHARED_DATA / "real-ct" / "totalseg-abdomen" / "ct.nii.gz"
UI_PATH = ROOT / "FSEFTSegment" / "Resources" / "UI" / "FSEFTSegment.ui"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from headless_slicer import bootstrap_scene  # noqa: E402  (beside this file)

STRUCTURES = "liver,spleen,right kidney,left kidney,stomach,aorta"
OVERLAY_WIDTH = 800
PANEL_WIDTH = 450


def log(message: str) -> None:
    print(f"[screenshots] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# 1. Slice view with the segmentation overlay (slicer-core + VTK offscreen)
# ---------------------------------------------------------------------------------------------

def predict(ct: Path, workdir: Path) -> Path:
    """Segment `ct` with the bundled model through the real engine CLI; the .seg.nrrd written."""
    command = [sys.executable, "-m", "FSEFTSegmentLib", "predict", "--structures", STRUCTURES,
               "--largest-component", "--progress", "none", "--out", str(workdir), str(ct)]
    log("segmenting: " + " ".join(command[1:]))
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"fseft predict failed ({result.returncode}):\n{result.stderr[-3000:]}")
    outputs = sorted(workdir.glob("*.seg.nrrd"))
    if not outputs:
        raise RuntimeError(f"fseft predict wrote no .seg.nrrd into {workdir}:\n{result.stdout[-2000:]}")
    return outputs[0]


def read_node(scene, node_class: str, name: str, storage, path: Path):
    """A node of `node_class` read from `path` by `storage` (a Slicer storage node), with its display."""
    node = scene.AddNewNodeByClass(node_class, name)
    storage.SetFileName(str(path))
    scene.AddNode(storage)
    if not storage.ReadData(node):
        raise RuntimeError(f"Slicer could not read {path}")
    node.SetAndObserveStorageNodeID(storage.GetID())
    node.CreateDefaultDisplayNodes()
    return node


def load_ct(slicer, scene, path: Path):
    node = read_node(scene, "vtkMRMLScalarVolumeNode", "CT abdomen", slicer.vtkMRMLVolumeArchetypeStorageNode(), path)
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
    display.SetAutoWindowLevel(False)
    display.SetWindowLevel(400, 40)  # Slicer's "CT abdomen" preset
    return node


def load_segmentation(slicer, scene, path: Path, ct):
    node = read_node(scene, "vtkMRMLSegmentationNode", "Segmentation", slicer.vtkMRMLSegmentationStorageNode(), path)
    node.SetReferenceImageGeometryParameterFromVolumeNode(ct)
    display = node.GetDisplayNode()
    display.SetVisibility2DFill(True)
    display.SetVisibility2DOutline(True)
    display.SetSliceIntersectionThickness(2)  # Segmentations module "Outline thickness"; 1 px is faint at 800 px
    return node


def best_slices(slicer, segmentation, ct):
    """RAS points (axial, coronal) through the slices that show the most structures (ties: most voxels)."""
    import numpy as np
    from slicer.util import arrayFromSegmentBinaryLabelmap

    segments = segmentation.GetSegmentation()
    masks = [arrayFromSegmentBinaryLabelmap(segmentation, segments.GetNthSegmentID(i), ct) > 0
             for i in range(segments.GetNumberOfSegments())]
    masks = [m for m in masks if m.any()]
    if not masks:
        raise RuntimeError("the segmentation is empty")
    stack = np.stack(masks)  # (segment, k, j, i)
    union = stack.any(axis=0)
    center = np.argwhere(union).mean(axis=0)  # (k, j, i)

    def pick(axis):  # axis of (k, j, i)
        others = tuple(a + 1 for a in range(3) if a != axis)
        present = stack.any(axis=others).sum(axis=0)
        area = union.sum(axis=tuple(a for a in range(3) if a != axis))
        return int(np.lexsort((area, present))[-1])

    ijk_to_ras = np.eye(4)
    matrix = slicer.vtkMatrix4x4() if hasattr(slicer, "vtkMatrix4x4") else __import__("vtk").vtkMatrix4x4()
    ct.GetIJKToRASMatrix(matrix)
    for r in range(4):
        for c in range(4):
            ijk_to_ras[r, c] = matrix.GetElement(r, c)
    points = {}
    for name, axis in (("Axial", 0), ("Coronal", 1)):
        kji = center.copy()
        kji[axis] = pick(axis)
        ras = ijk_to_ras @ np.array([kji[2], kji[1], kji[0], 1.0])
        points[name] = ras[:3]
    return points


def render_slice(slicer, vtk, scene, app_logic, ct, orientation: str, ras_point, out: Path) -> None:
    """One slice view: background CT + segmentation overlay, drawn by Slicer's logic and DM."""
    slice_logic = slicer.vtkMRMLSliceLogic()
    slice_logic.SetMRMLApplicationLogic(app_logic)
    slice_logic.SetMRMLScene(scene)
    logics = vtk.vtkCollection()
    logics.AddItem(slice_logic)
    app_logic.SetSliceLogics(logics)
    app_logic.SetViewLogics(vtk.vtkCollection())
    slice_node = slice_logic.AddSliceNode({"Axial": "Red", "Coronal": "Green", "Sagittal": "Yellow"}[orientation])
    slice_node.SetOrientation(orientation)
    slice_logic.GetSliceCompositeNode().SetBackgroundVolumeID(ct.GetID())

    # Window shaped like the volume's extent in this orientation, OVERLAY_WIDTH wide.
    bounds = [0.0] * 6
    ct.GetRASBounds(bounds)
    extent_r = bounds[1] - bounds[0]
    extent_other = (bounds[3] - bounds[2]) if orientation == "Axial" else (bounds[5] - bounds[4])
    width = OVERLAY_WIDTH
    height = int(round(width * extent_other / extent_r / 2)) * 2
    slice_node.SetDimensions(width, height, 1)
    slice_logic.FitSliceToBackground(width, height)
    slice_node.JumpSliceByOffsetting(*[float(x) for x in ras_point])

    render_window = vtk.vtkRenderWindow()
    render_window.SetOffScreenRendering(1)
    render_window.SetSize(width, height)
    renderer = vtk.vtkRenderer()
    renderer.SetBackground(0, 0, 0)
    render_window.AddRenderer(renderer)
    interactor = vtk.vtkRenderWindowInteractor()  # must be Initialize()d before group.Initialize
    interactor.SetRenderWindow(render_window)
    interactor.Initialize()

    image_mapper = vtk.vtkImageMapper()
    image_mapper.SetInputConnection(slice_logic.GetImageDataConnection())
    image_mapper.SetColorWindow(255)
    image_mapper.SetColorLevel(127.5)
    image_actor = vtk.vtkActor2D()
    image_actor.SetMapper(image_mapper)
    image_actor.GetProperty().SetDisplayLocationToBackground()  # else it hides the overlay
    renderer.AddViewProp(image_actor)

    factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
    factory.SetMRMLApplicationLogic(app_logic)
    if not factory.IsDisplayableManagerRegistered("vtkMRMLSegmentationsDisplayableManager2D"):
        factory.RegisterDisplayableManager("vtkMRMLSegmentationsDisplayableManager2D")
    group = slicer.vtkMRMLDisplayableManagerGroup()
    group.Initialize(factory, renderer)
    group.SetMRMLDisplayableNode(slice_node)

    slice_logic.GetImageDataConnection().GetProducer().Update()
    group.RequestRender()
    render_window.Render()
    render_window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(render_window)
    grab.SetInputBufferTypeToRGB()
    grab.ReadFrontBufferOff()
    grab.Update()
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(out))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()
    log(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out} ({width}x{height}, "
        f"{orientation.lower()} slice through R {ras_point[0]:.0f}, A {ras_point[1]:.0f}, S {ras_point[2]:.0f} mm)")
    group.SetMRMLDisplayableNode(None)
    render_window.Finalize()


def render_overlay(out_dir: Path, ct_path: Path = CT_PATH) -> bool:
    if not ct_path.is_file():
        log(f"SKIP slice-overlay.png: the shared CT {ct_path} is missing "
            f"(see ../shared/data/README.md; real-ct/totalseg-abdomen/ct.nii.gz)")
        return False
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")  # no X server needed
    if os.environ["VTK_DEFAULT_OPENGL_WINDOW"] == "vtkEGLRenderWindow":
        import ctypes.util

        if not ctypes.util.find_library("EGL"):
            log("SKIP slice-overlay.png: no libEGL for offscreen VTK; "
                "sudo apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri")
            return False
    try:
        import slicer
        import vtk
    except ImportError as error:
        log(f"SKIP slice-overlay.png: slicer-core / vtk not importable ({error}); install the project venv")
        return False
    with tempfile.TemporaryDirectory(prefix="fseft-screenshots-") as workdir:
        start = time.monotonic()
        seg_path = predict(ct_path, Path(workdir))
        log(f"segmented in {time.monotonic() - start:.1f} s")
        scene, app_logic, _ = bootstrap_scene(slicer)
        ct = load_ct(slicer, scene, ct_path)
        segmentation = load_segmentation(slicer, scene, seg_path, ct)
        segments = segmentation.GetSegmentation()
        log("segments: " + ", ".join(segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())))
        points = best_slices(slicer, segmentation, ct)
        render_slice(slicer, vtk, scene, app_logic, ct, "Axial", points["Axial"], out_dir / "slice-overlay.png")
        render_slice(slicer, vtk, scene, app_logic, ct, "Coronal", points["Coronal"], out_dir / "slice-overlay-coronal.png")
        scene.Clear(1)
    return True


# ---------------------------------------------------------------------------------------------
# 2. Module panel from the .ui file (PySide6 offscreen, plain-Qt stand-ins)
# ---------------------------------------------------------------------------------------------

#: Slicer/CTK class -> (plain Qt stand-in, {Slicer property: stand-in property}). Classes not listed
#: fall back to their <customwidget><extends> chain, then to QWidget.
STAND_INS: dict[str, tuple[str, dict[str, str]]] = {
    "qMRMLWidget": ("QWidget", {}),
    "qSlicerWidget": ("QWidget", {}),
    "qSlicerAbstractModuleWidget": ("QWidget", {}),
    "ctkCollapsibleButton": ("QGroupBox", {"text": "title"}),
    "ctkCollapsibleGroupBox": ("QGroupBox", {}),
    "qMRMLCollapsibleButton": ("QGroupBox", {"text": "title"}),
    "qMRMLNodeComboBox": ("QComboBox", {}),
    "qMRMLCheckableNodeComboBox": ("QComboBox", {}),
    "qMRMLSubjectHierarchyComboBox": ("QComboBox", {}),
    "qMRMLSegmentSelectorWidget": ("QComboBox", {}),
    "qMRMLColorTableComboBox": ("QComboBox", {}),
    "qMRMLLayoutComboBox": ("QComboBox", {}),
    "ctkCheckableComboBox": ("QComboBox", {}),
    "ctkComboBox": ("QComboBox", {}),
    "ctkSliderWidget": ("QDoubleSpinBox", {}),
    "qMRMLSliderWidget": ("QDoubleSpinBox", {}),
    "ctkDoubleSpinBox": ("QDoubleSpinBox", {}),
    "qMRMLSpinBox": ("QDoubleSpinBox", {}),
    "ctkSpinBox": ("QSpinBox", {}),
    "ctkDoubleSlider": ("QSlider", {}),
    "ctkRangeWidget": ("QSlider", {}),
    "ctkRangeSlider": ("QSlider", {}),
    "ctkPathLineEdit": ("QLineEdit", {"currentPath": "text"}),
    "ctkSearchBox": ("QLineEdit", {}),
    "qMRMLCoordinatesWidget": ("QLineEdit", {}),
    "ctkCoordinatesWidget": ("QLineEdit", {}),
    "ctkDirectoryButton": ("QPushButton", {"directory": "text"}),
    "ctkMenuButton": ("QPushButton", {}),
    "ctkColorPickerButton": ("QPushButton", {}),
    "ctkPushButton": ("QPushButton", {}),
    "ctkExpandButton": ("QToolButton", {}),
    "ctkCheckBox": ("QCheckBox", {}),
    "ctkFittedTextBrowser": ("QTextBrowser", {}),
    "ctkConsole": ("QPlainTextEdit", {}),
    "qMRMLTableView": ("QTableWidget", {}),
    "qMRMLSegmentsTableView": ("QTableWidget", {}),
    "ctkTableWidget": ("QTableWidget", {}),
    "qMRMLSubjectHierarchyTreeView": ("QTreeWidget", {}),
    "qMRMLTreeView": ("QTreeWidget", {}),
    "qMRMLPlotView": ("QFrame", {}),
    "qMRMLPlotWidget": ("QFrame", {}),
    "qMRMLSliceWidget": ("QFrame", {}),
    "qMRMLThreeDWidget": ("QFrame", {}),
    "qMRMLThreeDView": ("QFrame", {}),
    "qMRMLSegmentEditorWidget": ("QFrame", {}),
}
#: Frame-like stand-ins for views that draw something big: a visible box with some height.
VIEW_CLASSES = {"qMRMLPlotView", "qMRMLPlotWidget", "qMRMLSliceWidget", "qMRMLThreeDWidget", "qMRMLThreeDView",
                "qMRMLSegmentEditorWidget"}
#: Properties that uic/QUiLoader handle although they are no Q_PROPERTY of the class.
FAKE_PROPERTIES = {"buddy"}
NODE_NAMES = {"vtkMRMLScalarVolumeNode": "CT abdomen", "vtkMRMLVolumeNode": "CT abdomen",
              "vtkMRMLLabelMapVolumeNode": "CT abdomen-label", "vtkMRMLSegmentationNode": "Segmentation",
              "vtkMRMLTableNode": "Table", "vtkMRMLModelNode": "Model", "vtkMRMLMarkupsNode": "F",
              "vtkMRMLPlotChartNode": "PlotChart"}
#: Demo contents by objectName (all optional: names the .ui lacks are ignored). A str is one item
#: (a checkable combo shows its checked items joined like this), a list is several.
DEMO_ITEMS: dict[str, str | list[str]] = {
    "batchVolumesSelector": "None",
    "supportVolumesSelector": "case01, case02, case03",
    "queryVolumesSelector": "CT abdomen",
    "segmentVolumesSelector": "CT abdomen",
    "structuresComboBox": "pancreas (K = 3)",
    "deviceComboBox": ["auto", "cpu", "cuda"],
}
#: Demo text for line edits and labels that the .ui leaves empty, by objectName.
DEMO_TEXT = {
    "structuresLineEdit": "liver, spleen, kidney_right, kidney_left",
    "adaptStructureLineEdit": "pancreas",
    "modelStatusLabel": "Ready.",
    "deviceInfoLabel": "CPU (no CUDA device found)",
    "kLabel": "K = 3 support volume(s) of 3 annotated with pancreas",
    "methodCostLabel": "linear-probe: the fastest method, good on a CPU.",
    "statusLabel": "Done: 4 segments added to the scene in 21 s.",
    "resultsLabel": "CT abdomen \u2013 liver, spleen, kidney_right, kidney_left (fseft-mini)",
}
DEMO_STRUCTURES = ["liver", "spleen", "kidney_right", "kidney_left", "stomach", "aorta"]
DEMO_LOG = ("Segmenting CT abdomen with fseft-mini on cpu\n"
            "sliding window: 12/12 windows\n"
            "Imported 4 segments in 21.3 s")


def ui_classes(root: ET.Element) -> dict[str, str]:
    """<customwidget> class -> extends."""
    return {cw.findtext("class", "").strip(): cw.findtext("extends", "").strip()
            for cw in root.iter("customwidget")}


def stand_in_for(cls: str, extends: dict[str, str], qt_classes: set[str]) -> tuple[str, dict[str, str]]:
    seen = set()
    while cls and cls not in seen:
        seen.add(cls)
        if cls in STAND_INS:
            return STAND_INS[cls]
        if cls in qt_classes:
            return cls, {}
        cls = extends.get(cls, "")
    return "QWidget", {}


def convert_ui(text: str, qt_classes: set[str], has_property) -> tuple[bytes, dict[str, dict]]:
    """The .ui rewritten to plain Qt classes; and per converted widget {class, nodeTypes, collapsed}."""
    root = ET.fromstring(text)
    extends = ui_classes(root)
    info: dict[str, dict] = {}
    for widget in root.iter("widget"):
        original = widget.get("class", "")
        if original in qt_classes and original not in STAND_INS:
            continue
        target, renames = stand_in_for(original, extends, qt_classes)
        name = widget.get("name", "")
        entry = info[name] = {"class": original, "standIn": target, "nodeTypes": [], "collapsed": False}
        widget.set("class", target)
        for prop in list(widget.findall("property")):
            pname = prop.get("name", "")
            if pname == "nodeTypes":
                entry["nodeTypes"] = [s.text or "" for s in prop.iter("string")]
            if pname == "collapsed":
                entry["collapsed"] = (prop.findtext("bool", "false").strip() == "true")
            if pname in renames:
                prop.set("name", renames[pname])
                pname = renames[pname]
            if pname in FAKE_PROPERTIES or has_property(target, pname):
                # Enum values of Slicer classes mean nothing to the stand-in.
                for enum in list(prop.iter("enum")) + list(prop.iter("set")):
                    if enum.text and "::" in enum.text and enum.text.split("::")[0] not in qt_classes | {"Qt"}:
                        widget.remove(prop)
                        break
                continue
            widget.remove(prop)
    # Slicer-only signals/slots (mrmlSceneChanged, setMRMLScene...): nothing to connect in plain Qt.
    for connections in root.findall("connections"):
        root.remove(connections)
    for custom in root.findall("customwidgets"):
        root.remove(custom)
    return ET.tostring(root, encoding="utf-8"), info


def table_headers_from_module() -> dict[str, list[str]]:
    """Column titles that the module sets at run time (`self.ui.X.setHorizontalHeaderLabels(EXPR)`),
    where EXPR evaluates with only `list`/`tuple` and the engine's `panel` module. Best effort: {} on any doubt."""
    import re

    source = ROOT / "FSEFTSegment" / "FSEFTSegment.py"
    try:
        text = source.read_text(encoding="utf-8")
    except OSError:
        return {}
    namespace: dict[str, object] = {"list": list, "tuple": tuple, "__builtins__": {}}
    try:
        from FSEFTSegmentLib import panel as engine_panel  # Qt-free; needs slicer-core
        namespace["panel"] = engine_panel
    except Exception:  # noqa: BLE001
        pass
    headers = {}
    for name, expression in re.findall(r"\.ui\.(\w+)\.setHorizontalHeaderLabels\((.+)\)\s*$", text, re.M):
        try:
            value = eval(expression, namespace)  # noqa: S307 - our own source, no builtins
            headers[name] = [str(v) for v in value]
        except Exception:  # noqa: BLE001
            continue
    return headers


def demo_cell(header: str, row: int) -> str:
    h = header.lower().strip()
    structures = ["pancreas", "gallbladder", "adrenal_left"]
    if h in ("k", "shots") or h.startswith("k "):
        return str(3 + 2 * row)
    if "dice" in h and "loss" in h:
        return f"{0.91 - 0.05 * row:.2f} / {0.12 + 0.04 * row:.2f}"
    if "dice" in h or "score" in h:
        return f"{0.91 - 0.05 * row:.2f}"
    if "loss" in h:
        return f"{0.12 + 0.04 * row:.3f}"
    if "model" in h:
        return "fseft-mini"
    if "method" in h:
        return ("linear-probe", "lora", "spatial-adapter")[row % 3]
    if "created" in h or "date" in h:
        return f"2026-12-0{row + 1} 10:{12 + 7 * row:02d}"
    if "ml" in h:
        return ("1532.4", "212.8", "171.0")[row % 3]
    if "size" in h or "mb" in h:
        return f"{0.2 + 0.3 * row:.1f} MB"
    if "time" in h or h.endswith("(s)"):
        return f"{12.4 + 3.1 * row:.1f}"
    if "status" in h or "state" in h:
        return "done"
    if h in ("segments", "labels", "annotations"):
        return ", ".join(["pancreas", "liver", "spleen"][: 3 - row % 2])
    if any(k in h for k in ("structure", "segment", "label", "organ", "name")):
        return structures[row % 3]
    if any(k in h for k in ("volume", "case", "image", "study", "input")):
        return f"case{row + 1:02d}"
    return ""


def demo_curve(QtCore, QtGui, width: int, height: int):
    """A pixmap of a made-up decreasing training-loss curve (the module draws the real one)."""
    import math

    pixmap = QtGui.QPixmap(width, height)
    pixmap.fill(QtGui.QColor("white"))
    painter = QtGui.QPainter(pixmap)
    painter.setRenderHint(QtGui.QPainter.Antialiasing)
    left, bottom, top, right = 34, height - 20, 8, width - 8
    painter.setPen(QtGui.QPen(QtGui.QColor("#888888"), 1))
    painter.drawLine(left, top, left, bottom)
    painter.drawLine(left, bottom, right, bottom)
    painter.setPen(QtGui.QColor("#555555"))
    painter.drawText(QtCore.QRect(left, bottom + 2, right - left, 16), QtCore.Qt.AlignCenter, "epoch")
    painter.drawText(QtCore.QRect(0, top, left - 4, 16), QtCore.Qt.AlignRight, "loss")
    for color, scale, noise in (("#1f77b4", 1.0, 0.03), ("#ff7f0e", 0.8, 0.0)):
        points = []
        for i in range(60):
            t = i / 59
            v = 0.15 + 0.75 * math.exp(-4.5 * t) * scale + noise * math.sin(11 * t * math.pi)
            points.append(QtCore.QPointF(left + t * (right - left), bottom - v * (bottom - top)))
        painter.setPen(QtGui.QPen(QtGui.QColor(color), 2))
        painter.drawPolyline(points)
    painter.end()
    return pixmap


def fill_demo_values(QtCore, QtGui, QtWidgets, panel, info: dict[str, dict]) -> None:
    """Plausible contents for the widgets the .ui leaves empty (each looked up by name, all optional)."""
    model_names = ["fseft-mini"]
    try:
        registry = json.loads((ROOT / "Resources" / "models.json").read_text(encoding="utf-8"))
        model_names = [m["name"] for m in registry.get("models", [])] or model_names
    except (OSError, ValueError, KeyError):
        pass
    methods = ("linear-probe", "spatial-adapter", "adapter-1x1", "bitfit", "affine-ln", "lora", "adaptformer", "full")
    try:
        from FSEFTSegmentLib.jobs import ADAPTATION_METHODS as methods  # noqa: N811
    except Exception:  # noqa: BLE001 - the fallback list above is fine for a picture
        pass

    for combo in panel.findChildren(QtWidgets.QComboBox):
        name, lower = combo.objectName(), combo.objectName().lower()
        if combo.count():
            continue
        meta = info.get(name, {})
        checkable = "Checkable" in meta.get("class", "")
        if name in DEMO_ITEMS:
            items = DEMO_ITEMS[name]
            combo.addItems([items] if isinstance(items, str) else list(items))
        elif meta.get("nodeTypes"):
            combo.addItem(NODE_NAMES.get(meta["nodeTypes"][0], "None"))
        elif "model" in lower:
            combo.addItems(model_names)
        elif "method" in lower:
            combo.addItems(list(methods))
        elif "device" in lower:
            combo.addItems(["auto", "cpu", "cuda"])
        elif "precision" in lower:
            combo.addItems(["auto", "fp32", "bf16", "fp16"])
        elif "segment" in lower or "structure" in lower:
            combo.addItems([", ".join(DEMO_STRUCTURES[:2])] if checkable else DEMO_STRUCTURES)
        else:
            combo.addItem("None")

    for widget_class in (QtWidgets.QLineEdit, QtWidgets.QLabel):
        for widget in panel.findChildren(widget_class):
            text = DEMO_TEXT.get(widget.objectName())
            if text and not widget.text():
                widget.setText(text)
                if widget_class is QtWidgets.QLineEdit:
                    widget.setCursorPosition(0)

    headers_by_name = table_headers_from_module()
    for table in panel.findChildren(QtWidgets.QTableWidget):
        if table.rowCount():
            continue
        headers = [table.horizontalHeaderItem(c).text() if table.horizontalHeaderItem(c) else ""
                   for c in range(table.columnCount())]
        if not any(headers):
            headers = headers_by_name.get(table.objectName()) or ["structure", "volume (mL)"]
            table.setColumnCount(len(headers))
            table.setHorizontalHeaderLabels(headers)
        rows = 3
        table.setRowCount(rows)
        for r in range(rows):
            for c, header in enumerate(headers):
                table.setItem(r, c, QtWidgets.QTableWidgetItem(demo_cell(header, r)))
        table.verticalHeader().setVisible(False)
        table.resizeColumnsToContents()
        table.horizontalHeader().setStretchLastSection(True)
        table.resizeRowsToContents()
        height = (table.horizontalHeader().sizeHint().height() + sum(table.rowHeight(r) for r in range(rows))
                  + 2 * table.frameWidth() + (table.horizontalScrollBar().sizeHint().height()
                                              if table.horizontalHeader().length() > table.viewport().width() else 0))
        table.setMinimumHeight(height)
        table.setMaximumHeight(height)

    for editor in panel.findChildren(QtWidgets.QPlainTextEdit) + panel.findChildren(QtWidgets.QTextEdit):
        if not editor.toPlainText().strip():
            editor.setPlainText(DEMO_LOG)
            editor.setMaximumHeight(90)

    for button in panel.findChildren(QtWidgets.QPushButton):  # the demo inputs are all set
        button.setEnabled(True)

    # A finished run: full progress bar (shown only if the .ui shows it).
    for bar in panel.findChildren(QtWidgets.QProgressBar):
        bar.setValue(bar.maximum())

    # Plot areas (plot-view stand-ins, or empty frames named like a plot): a made-up loss curve.
    for frame in panel.findChildren(QtWidgets.QFrame):
        name = frame.objectName()
        meta = info.get(name, {})
        is_view = meta.get("class") in VIEW_CLASSES
        if not (is_view or ("plot" in name.lower() and type(frame) is QtWidgets.QFrame)):
            continue
        if frame.findChildren(QtWidgets.QWidget):
            continue
        frame.setFrameShape(QtWidgets.QFrame.StyledPanel)
        height = max(frame.minimumHeight(), 140)
        frame.setMinimumHeight(height)
        if "plot" in name.lower() or "plot" in meta.get("class", "").lower():
            layout = frame.layout() or QtWidgets.QVBoxLayout(frame)
            layout.setContentsMargins(1, 1, 1, 1)
            label = QtWidgets.QLabel(frame)
            label.setPixmap(demo_curve(QtCore, QtGui, PANEL_WIDTH - 50, height - 4))
            label.setAlignment(QtCore.Qt.AlignCenter)
            layout.addWidget(label)


def render_panel(out_dir: Path, expand_all: bool = False, ui_path: Path = UI_PATH) -> bool:
    if not ui_path.is_file():
        log(f"SKIP panel.png: {ui_path} is missing")
        return False
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    try:
        from PySide6 import QtCore, QtGui, QtWidgets
        from PySide6.QtUiTools import QUiLoader
    except ImportError as error:
        log(f"SKIP panel.png: PySide6 is not installed ({error}); pip install PySide6-Essentials")
        return False

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(["render_screenshots"])
    app.setStyle("Fusion")
    app.setFont(QtGui.QFont("DejaVu Sans", 9))
    loader = QUiLoader()
    qt_classes = set(loader.availableWidgets()) | {"Line"}

    probes: dict[str, object] = {}

    def has_property(cls: str, name: str) -> bool:
        if cls == "Line":
            return True
        if cls not in probes:
            probes[cls] = loader.createWidget(cls, None, "") if cls in qt_classes else None
        probe = probes[cls]
        return probe is not None and probe.metaObject().indexOfProperty(name) >= 0

    xml, info = convert_ui(ui_path.read_text(encoding="utf-8"), qt_classes, has_property)
    converted = {k: f"{v['class']}->{v['standIn']}" for k, v in info.items()}
    log(f"stand-ins: {', '.join(sorted(set(converted.values())))}")
    buffer = QtCore.QBuffer()
    buffer.setData(QtCore.QByteArray(xml))
    buffer.open(QtCore.QIODevice.ReadOnly)
    panel = loader.load(buffer, None)
    if panel is None:
        raise RuntimeError(f"QUiLoader could not load the converted .ui: {loader.errorString()}")

    # Collapsible buttons: an arrow in the title like CTK's; collapsed ones show only their header.
    for name, meta in info.items():
        if meta["standIn"] != "QGroupBox":
            continue
        box = panel.findChild(QtWidgets.QGroupBox, name)
        if box is None:
            continue
        collapsed = meta["collapsed"] and not expand_all
        if meta["class"] != "ctkCollapsibleGroupBox" or collapsed:
            box.setTitle(("\u25b8 " if collapsed else "\u25be ") + box.title())
        if collapsed:
            for child in box.findChildren(QtWidgets.QWidget, options=QtCore.Qt.FindDirectChildrenOnly):
                child.hide()
            box.setStyleSheet("QGroupBox { border: none; }")
            box.setMaximumHeight(box.fontMetrics().height() + 8)
    fill_demo_values(QtCore, QtGui, QtWidgets, panel, info)

    # As tall as the contents need at this width (the .ui's bottom spacer collapses to nothing).
    panel.setFixedWidth(PANEL_WIDTH)
    panel.adjustSize()
    layout = panel.layout()
    height = panel.minimumSizeHint().height()
    if layout is not None and layout.hasHeightForWidth():
        height = max(height, layout.minimumHeightForWidth(PANEL_WIDTH))
    panel.resize(PANEL_WIDTH, height)
    panel.setAttribute(QtCore.Qt.WA_DontShowOnScreen, True)
    panel.show()
    app.processEvents()
    pixmap = panel.grab()
    out = out_dir / "panel.png"
    if not pixmap.save(str(out), "PNG"):
        raise RuntimeError(f"could not write {out}")
    log(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out} ({pixmap.width()}x{pixmap.height()}; "
        f"Qt rendering of the .ui with stand-in widgets, not Slicer)")
    panel.close()
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("overlay", "panel"), help="render just one kind")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"output folder (default: {OUT_DIR.relative_to(ROOT)})")
    parser.add_argument("--ct", type=Path, default=CT_PATH, help="CT to segment (default: the shared abdomen CT)")
    parser.add_argument("--ui", type=Path, default=UI_PATH, help="Qt Designer file of the panel (default: the module's)")
    parser.add_argument("--expand-all", action="store_true", help="draw collapsed sections of the panel expanded")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    if args.only in (None, "panel"):
        render_panel(args.out, args.expand_all, args.ui)
    if args.only in (None, "overlay"):
        render_overlay(args.out, args.ct)
    log(f"done in {time.monotonic() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
