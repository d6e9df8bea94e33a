"""The labels table: one entry per class of the foundation model's universal template.

Every output (label map, .seg.nrrd, colour table, report) and the Slicer module take names,
colours and DICOM/SNOMED CT terminology from here, so that a class looks and is coded the same
everywhere. Channel `index` = universal id - 1 (paper, section 3).

Sources of the codes and colours (checked by hand, see each entry):
- GA: Slicer's "3D Slicer General Anatomy list" (Slicer/Slicer
  `Modules/Loadable/Terminologies/Resources/SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json`,
  commit 1ef2bf1f): code, meaning and `recommendedDisplayRGBValue`. Laterality is a type modifier
  there (Right/Left), not a separate entry.
- TS: lassoan/SlicerTotalSegmentator `totalsegmentator_snomed_mapping.csv` and
  `SegmentationCategoryTypeModifier-TotalSegmentator.term.json` (structures the GA list lacks).
- DM: Slicer's DICOM master list (`SegmentationCategoryTypeModifier-DICOM-Master.json`), lesion types.
- CID: DICOM PS3.16 context groups (as published in bvdh/dicom-terminology-in-fhir).
Colours marked "ours" are not in any of these lists.

No Qt and no slicerio import here: the module is loaded inside Slicer's own Python as well.
"""

from __future__ import annotations

import colorsys
import difflib
import hashlib
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import InputError

# The TerminologyEntry tag names the list an entry comes from; Slicer writes both names even when
# the anatomic region is empty (see slicerio's `read_segmentation` docstring example).
CONTEXT_NAME = "Segmentation category and type - 3D Slicer General Anatomy list"
ANATOMIC_CONTEXT_NAME = "Anatomic codes - DICOM master list"
NOVEL_SCHEME = "99FSEFT"  # DICOM private coding schemes start with "99"

_FORBIDDEN = set("~^|")  # separators of the TerminologyEntry string and of the Tags field


@dataclass(frozen=True)
class Code:
    """A coded concept (DICOM code sequence item): scheme designator, code value, code meaning."""

    scheme: str
    value: str
    meaning: str


@dataclass(frozen=True)
class Structure:
    """One segmentable structure: the model channel plus everything a viewer needs to show it."""

    index: int  # output channel of the foundation model (universal id - 1); -1 for a novel structure
    name: str  # canonical snake_case name, used in files and on the command line
    display_name: str  # segment name shown to the user
    aliases: tuple[str, ...]  # other accepted spellings, including the paper's code names
    color: tuple[int, int, int]  # 0-255 RGB
    category: Code
    type: Code
    type_modifier: Code | None = None  # laterality, as Slicer codes it
    region: Code | None = None  # anatomic region of a lesion or of a vessel tree

    def slicerio_terminology(self) -> dict:
        """The dict slicerio.write_segmentation expects as a segment's "terminology"."""
        terminology = {
            "contextName": CONTEXT_NAME,
            "category": _parts(self.category),
            "type": _parts(self.type),
        }
        if self.type_modifier is not None:
            terminology["typeModifier"] = _parts(self.type_modifier)
        terminology["anatomicContextName"] = ANATOMIC_CONTEXT_NAME
        if self.region is not None:
            terminology["anatomicRegion"] = _parts(self.region)
        return terminology

    def terminology_string(self) -> str:
        """Slicer's segment "TerminologyEntry" tag, as Slicer 5.x writes it into .seg.nrrd.

        context~category~type~typeModifier~anatomicContext~region~regionModifier, each code as
        scheme^value^meaning and an absent one as ^^ (same output as slicerio's
        terminology_entry_to_string, without importing slicerio).
        """

        def codes(code: Code | None) -> str:
            return "^".join(_parts(code)) if code is not None else "^^"

        return "~".join(
            [
                CONTEXT_NAME,
                codes(self.category),
                codes(self.type),
                codes(self.type_modifier),
                ANATOMIC_CONTEXT_NAME,
                codes(self.region),
                codes(None),
            ]
        )


def _parts(code: Code) -> list[str]:
    return [code.scheme, code.value, code.meaning]


def _sct(value: str, meaning: str) -> Code:
    return Code("SCT", value, meaning)


# Categories (CID 7150, as in GA).
_ANATOMICAL_STRUCTURE = _sct("123037004", "Anatomical Structure")
_TISSUE = _sct("85756007", "Tissue")
_MORPHOLOGICALLY_ALTERED = _sct("49755003", "Morphologically Altered Structure")
# Laterality modifiers (CID 244, as in GA).
_RIGHT = _sct("24028007", "Right")
_LEFT = _sct("7771000", "Left")
# Lesion types (CID 7159). Tumours are "Neoplasm" (DM; TS codes liver_tumor the same way) rather
# than GA's "Mass", which is a radiological finding, not what these classes were annotated as.
_NEOPLASM = _sct("108369006", "Neoplasm")
_CYST = _sct("367643001", "Cyst")  # DM and GA, colour (205, 205, 100) from GA
# Organs reused as lesion regions (GA codes).
_LIVER = _sct("10200004", "Liver")
_KIDNEY = _sct("64033007", "Kidney")
_LUNG = _sct("39607008", "Lung")
_PANCREAS = _sct("15776009", "Pancreas")
_COLON = _sct("71854001", "Colon")


def _organ(index, name, display, aliases, color, type_, modifier=None, category=_ANATOMICAL_STRUCTURE, region=None):
    return Structure(index, name, display, tuple(aliases), color, category, type_, modifier, region)


def _lesion(index, name, display, aliases, color, region, type_=_NEOPLASM):
    return Structure(index, name, display, tuple(aliases), color, _MORPHOLOGICALLY_ALTERED, type_, None, region)


# fmt: off
UNIVERSAL_STRUCTURES: tuple[Structure, ...] = (
    _organ(0, "spleen", "Spleen", [], (157, 108, 162), _sct("78961009", "Spleen")),  # GA
    _organ(1, "kidney_right", "Right kidney", ["rkidney", "kidney right", "kidney_r", "rk", "right kidney"],
           (185, 102, 83), _KIDNEY, _RIGHT),  # GA
    _organ(2, "kidney_left", "Left kidney", ["lkidney", "kidney left", "kidney_l", "lk", "left kidney"],
           (185, 102, 83), _KIDNEY, _LEFT),  # GA
    _organ(3, "gallbladder", "Gallbladder", ["gall", "gall bladder"], (139, 150, 98), _sct("28231008", "Gallbladder")),  # GA
    _organ(4, "esophagus", "Esophagus", ["oesophagus", "eso"], (211, 171, 143), _sct("32849002", "Esophagus")),  # GA
    _organ(5, "liver", "Liver", [], (221, 130, 101), _LIVER),  # GA
    _organ(6, "stomach", "Stomach", ["sto"], (216, 132, 105), _sct("69695003", "Stomach")),  # GA
    _organ(7, "aorta", "Aorta", [], (224, 97, 76), _sct("15825003", "Aorta")),  # GA
    _organ(8, "inferior_vena_cava", "Inferior vena cava", ["postcava", "ivc", "vena cava inferior"],
           (0, 151, 206), _sct("64131007", "Inferior vena cava")),  # TS (not in the GA version checked)
    _organ(9, "portal_and_splenic_vein", "Portal and splenic vein",
           ["psv", "portal vein and splenic vein", "portal/splenic vein", "portal splenic vein"],
           (0, 151, 206), _sct("110765007", "Portal vein and splenic vein")),  # TS (not in the GA version checked)
    _organ(10, "pancreas", "Pancreas", [], (249, 180, 111), _PANCREAS),  # GA
    _organ(11, "adrenal_gland_right", "Right adrenal gland", ["right adrenal", "adrenal right", "adrenal_r"],
           (249, 186, 150), _sct("23451007", "Adrenal gland"), _RIGHT),  # GA
    _organ(12, "adrenal_gland_left", "Left adrenal gland", ["left adrenal", "adrenal left", "adrenal_l"],
           (249, 186, 150), _sct("23451007", "Adrenal gland"), _LEFT),  # GA
    _organ(13, "duodenum", "Duodenum", [], (255, 253, 229), _sct("38848004", "Duodenum")),  # GA
    _organ(14, "urinary_bladder", "Urinary bladder", ["bladder"], (222, 154, 132), _sct("89837001", "Bladder")),  # GA
    # One channel for prostate (men) or uterus (women), but a segment takes one code and no SNOMED CT
    # concept covers both. Coded as Prostate (GA code and colour), the code TS gives its pelvic organ
    # class, so segments from both tools match; the display name keeps "uterus" visible.
    _organ(15, "prostate_or_uterus", "Prostate/uterus", ["prost_ut", "prostate", "uterus"],
           (230, 158, 140), _sct("41216001", "Prostate")),
    _lesion(16, "liver_tumor", "Liver tumor", ["liver lesion"], (144, 238, 144), _LIVER),  # colour: GA "Mass"
    _lesion(17, "kidney_tumor", "Kidney tumor", ["renal tumor"], (255, 140, 0), _KIDNEY),  # colour ours
    _lesion(18, "kidney_cyst", "Kidney cyst", ["renal cyst"], (205, 205, 100), _KIDNEY, type_=_CYST),  # TS coding, GA colour
    # SNOMED CT 57850000 is in CID 12112 "Abdominopelvic Artery (Unpaired)" with meaning "Celiac Axis";
    # it is in neither GA nor TS. Colour: GA's generic "Artery".
    _organ(19, "celiac_trunk", "Celiac trunk", ["celiac_truck", "celiac truck", "celiac axis", "celiac artery"],
           (216, 101, 79), _sct("57850000", "Celiac Axis")),
    _organ(20, "lung_right", "Right lung", ["right lung", "lung right", "lung_r", "rlung"], (197, 165, 145), _LUNG, _RIGHT),  # GA
    _organ(21, "lung_left", "Left lung", ["left lung", "lung left", "lung_l", "llung"], (197, 165, 145), _LUNG, _LEFT),  # GA
    # GA files "Bone" under the Tissue category, not Anatomical Structure; followed here.
    _organ(22, "bone", "Bone", ["bones", "skeleton"], (241, 214, 145), _sct("272673000", "Bone"), category=_TISSUE),
    _organ(23, "brain", "Brain", [], (250, 250, 225), _sct("12738006", "Brain")),  # GA
    _lesion(24, "lung_tumor", "Lung tumor", ["lung lesion"], (255, 0, 255), _LUNG),  # colour ours
    _lesion(25, "pancreas_tumor", "Pancreas tumor", ["pancreatic tumor", "pancreatic_tumor"], (255, 215, 0), _PANCREAS),  # colour ours
    # Vessels inside the liver (the "vessel" label of MSD Task08 HepaticVessel): "Blood vessel" in
    # region Liver, as TS codes its liver_vessels class. Colour ours (lighter than the large veins).
    _organ(26, "hepatic_vessel", "Hepatic vessel", ["hv", "liver vessel", "liver vessels", "hepatic vessels"],
           (100, 190, 230), _sct("59820001", "Blood vessel"), region=_LIVER),
    # The "tumour" label of MSD Task08 HepaticVessel lies in the liver; coded like liver_tumor.
    _lesion(27, "hepatic_vessel_tumor", "Hepatic vessel tumor", ["hvt"], (0, 200, 120), _LIVER),  # colour ours
    _lesion(28, "colon_tumor", "Colon tumor", ["colon cancer"], (128, 0, 255), _COLON),  # colour ours
)
# fmt: on


def _key(text: str) -> str:
    """Matching key: case, spaces, underscores, hyphens and slashes do not matter; tumour = tumor."""
    return re.sub(r"[^a-z0-9]", "", text.lower().replace("tumour", "tumor"))


def _build_lookup() -> dict[str, Structure]:
    lookup: dict[str, Structure] = {}
    for structure in UNIVERSAL_STRUCTURES:
        for spelling in (structure.name, structure.display_name, *structure.aliases):
            owner = lookup.setdefault(_key(spelling), structure)
            if owner is not structure:  # a table bug, caught at import
                raise ValueError(f"'{spelling}' names both {owner.name} and {structure.name}")
    return lookup


_LOOKUP = _build_lookup()


def resolve_structure(name: str) -> Structure:
    """The universal structure called `name` (canonical name, display name or alias, loosely spelled)."""
    structure = _LOOKUP.get(_key(name))
    if structure is not None:
        return structure
    close = difflib.get_close_matches(_key(name), list(_LOOKUP), n=1, cutoff=0.75)
    hint = f" (did you mean '{_LOOKUP[close[0]].name}'?)" if close else ""
    known = ", ".join(s.name for s in UNIVERSAL_STRUCTURES)
    raise InputError(f"unknown structure '{name}'{hint}; known: {known}")


def resolve_structures(names: Iterable[str]) -> list[Structure]:
    """Resolve several names in order; two names for the same structure are an error.

    A single string is taken as one name, not as a sequence of characters.
    """
    if isinstance(names, str):
        names = [names]
    seen: dict[str, str] = {}
    result = []
    for name in names:
        structure = resolve_structure(name)
        if structure.name in seen:
            raise InputError(f"structure '{structure.name}' given twice ('{seen[structure.name]}' and '{name}')")
        seen[structure.name] = name
        result.append(structure)
    return result


def _color_from_name(name: str) -> tuple[int, int, int]:
    """A stable, fairly saturated colour, so a novel structure looks the same on every run."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    hue = int.from_bytes(digest[:2], "big") / 65536
    saturation = 0.55 + digest[2] / 255 * 0.3
    value = 0.75 + digest[3] / 255 * 0.2
    return tuple(round(c * 255) for c in colorsys.hsv_to_rgb(hue, saturation, value))


def novel_structure(name: str, color: tuple[int, int, int] | None = None) -> Structure:
    """A structure outside the universal template (a few-shot target), with a local code.

    Coded as an "Anatomical Structure" whose type uses the private scheme 99FSEFT (value derived
    from the name, meaning = the name), since no standard code is known for an arbitrary name.
    Without `color`, the colour is derived from the name, so it is the same on every run.
    """
    display = " ".join(str(name).split())
    folded = unicodedata.normalize("NFKD", display).encode("ascii", "ignore").decode("ascii")  # "glúteo" -> "gluteo"
    snake = re.sub(r"[^a-z0-9]+", "_", folded.lower()).strip("_")
    if not snake:
        raise InputError(f"invalid structure name '{name}': it needs at least one Latin letter or digit (the name is used in file names and segment ids)")
    if _FORBIDDEN & set(display):
        raise InputError(f"invalid structure name '{name}': the characters ~ ^ | are not allowed")
    if color is None:
        color = _color_from_name(snake)
    else:
        try:
            color = tuple(int(c) for c in color)
        except (TypeError, ValueError):
            color = ()
        if len(color) != 3 or not all(0 <= c <= 255 for c in color):
            raise InputError(f"invalid colour for structure '{display}': give three integers 0-255")
    value = "N" + hashlib.sha256(snake.encode("utf-8")).hexdigest()[:12].upper()  # 13 chars: fits DICOM SH (16)
    return Structure(
        index=-1,
        name=snake,
        display_name=display,
        aliases=(),
        color=color,
        category=_ANATOMICAL_STRUCTURE,
        type=Code(NOVEL_SCHEME, value, display),
    )
