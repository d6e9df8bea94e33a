"""Real MRML without the Slicer application (PyPI `slicer-core`): one bootstrap for the test suite's
`mrml_scene` fixture and the screenshot tool, as shared/notes/slicer-facts.md (section A) describes."""

from __future__ import annotations

import types


def bootstrap_scene(slicer):
    """A scene with the application, Colors, Volumes, Segmentations and SubjectHierarchy logics
    registered, and the `slicer.mrmlScene` / `slicer.modules` stand-ins that slicer.util's array
    helpers need. Returns (scene, application logic, {name: logic}); the caller restores `slicer`."""
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    colors = app_logic.GetColorLogic()
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    app_logic.SetModuleLogic("Colors", colors)
    logics = {"Colors": colors}
    for name, cls in (("Volumes", slicer.vtkSlicerVolumesLogic),
                      ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),  # its SetMRMLScene registers the converters
                      ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic)):
        logic = cls()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app_logic)
        app_logic.SetModuleLogic(name, logic)
        logics[name] = logic

    def module(logic):
        return types.SimpleNamespace(logic=lambda: logic)

    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(**{name.lower(): module(logic) for name, logic in logics.items()})
    scene.app_logic = app_logic  # keep the application logic alive as long as the scene
    return scene, app_logic, logics
