"""The panel's whole adapt workflow on procedural phantoms, offline: annotated supports in the scene,
a short real adaptation of the bundled model through the background job, the query's result
imported, Dice against the phantom's truth. The Slicer self-test (`FSEFTSegmentTest`) and the test
suite (against slicer-core) run this one scenario, so what passes headless is what Slicer runs."""

from __future__ import annotations

import numpy as np
import slicer

from . import scene
from .labels import resolve_structure

#: Phantom seeds: supports first, the query last (fixed, so the Dice floor is reproducible).
SEEDS = (3, 4, 7)


def annotate_phantom(mrml_scene, seed: int, structure: str, name: str | None = None):
    """A phantom CT volume with a segmentation of `structure` drawn from its truth, as a clinician's
    Segment Editor annotation would be; returns (volume, truth mask in KJI order)."""
    volume, labels = scene.add_phantom_volume(mrml_scene, seed=seed, name=name or f"phantom {seed}")
    truth = labels == resolve_structure(structure).index + 1  # universal id = model channel + 1
    segmentation = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume.GetName()} annotation")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segment_id = segmentation.GetSegmentation().AddEmptySegment(structure, structure)
    slicer.util.updateSegmentBinaryLabelmapFromArray(truth.astype(np.uint8), segmentation, segment_id, volume)
    return volume, truth


def dice(predicted: np.ndarray, reference: np.ndarray) -> float:
    return float(2 * (predicted & reference).sum() / max(predicted.sum() + reference.sum(), 1))


def adapt_on_phantoms(logic, structure: str = "spleen", method: str = "linear-probe", max_epochs: int = 8,
                      device: str = "cpu", timeout_s: float = 600) -> dict:
    """Annotate two phantoms as supports and one as the query, adapt with `logic` (a `PanelLogic`)
    and score the imported query result. Returns {"dice", "job", "result"}."""
    *supports, (query, truth) = [annotate_phantom(logic.scene, seed, structure) for seed in SEEDS]
    parameters = logic.parameters
    parameters.structures = [structure]
    parameters.method = method
    parameters.device = device
    parameters.maxEpochs = max_epochs
    parameters.set_volumes("support", [volume for volume, _ in supports])
    parameters.set_volumes("query", [query])
    job = logic.start_adapt()
    logic.wait(timeout=timeout_s)
    if not logic.results:
        return {"dice": None, "job": job, "result": None}
    result = logic.results[0]["node"]
    segment_id = result.GetSegmentation().GetSegmentIdBySegmentName(structure) or result.GetSegmentation().GetNthSegmentID(0)
    predicted = slicer.util.arrayFromSegmentBinaryLabelmap(result, segment_id, query) > 0
    return {"dice": dice(predicted, truth), "job": job, "result": result}
