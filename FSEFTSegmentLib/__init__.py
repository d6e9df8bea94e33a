"""FSEFTSegment engine: few-shot, parameter-efficient adaptation of a CT segmentation foundation model.

No Qt here: importable inside 3D Slicer's Python and outside it. The CLI (`fseft`) and the Slicer
module are thin faces over the same functions.
"""

__version__ = "0.1.0"
