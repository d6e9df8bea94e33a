"""The labels table: template order, name resolution, and terminology that Slicer/slicerio read back."""

import re

import pytest
import slicerio.segmentation as slicerio_segmentation

from FSEFTSegmentLib.errors import InputError
from FSEFTSegmentLib.labels import (
    UNIVERSAL_STRUCTURES,
    Code,
    Structure,
    novel_structure,
    resolve_structure,
    resolve_structures,
)

# Paper, section 3: channel = universal id - 1.
PAPER_TEMPLATE = [
    "spleen", "kidney_right", "kidney_left", "gallbladder", "esophagus", "liver", "stomach", "aorta",
    "inferior_vena_cava", "portal_and_splenic_vein", "pancreas", "adrenal_gland_right", "adrenal_gland_left",
    "duodenum", "urinary_bladder", "prostate_or_uterus", "liver_tumor", "kidney_tumor", "kidney_cyst",
    "celiac_trunk", "lung_right", "lung_left", "bone", "brain", "lung_tumor", "pancreas_tumor",
    "hepatic_vessel", "hepatic_vessel_tumor", "colon_tumor",
]  # fmt: skip


def test_template_has_29_structures_in_channel_order():
    assert len(UNIVERSAL_STRUCTURES) == 29
    assert [s.name for s in UNIVERSAL_STRUCTURES] == PAPER_TEMPLATE
    assert [s.index for s in UNIVERSAL_STRUCTURES] == list(range(29))


def test_names_are_unique_snake_case_and_display_names_unique():
    names = [s.name for s in UNIVERSAL_STRUCTURES]
    displays = [s.display_name for s in UNIVERSAL_STRUCTURES]
    assert len(set(names)) == len(names)
    assert len(set(displays)) == len(displays)
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", n) for n in names)


def test_colors_are_rgb_bytes():
    for s in UNIVERSAL_STRUCTURES:
        assert len(s.color) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in s.color), s.name


@pytest.mark.parametrize(
    ("alias", "expected"),
    [
        ("left kidney", "kidney_left"),
        ("lkidney", "kidney_left"),
        ("Kidney_Left", "kidney_left"),
        ("KIDNEY-LEFT", "kidney_left"),
        ("rkidney", "kidney_right"),
        ("rk", "kidney_right"),
        ("gall", "gallbladder"),
        ("gallbladder", "gallbladder"),
        ("Gall Bladder", "gallbladder"),
        ("postcava", "inferior_vena_cava"),
        ("IVC", "inferior_vena_cava"),
        ("Inferior vena cava", "inferior_vena_cava"),
        ("psv", "portal_and_splenic_vein"),
        ("portal/splenic vein", "portal_and_splenic_vein"),
        ("prost_ut", "prostate_or_uterus"),
        ("uterus", "prostate_or_uterus"),
        ("celiac_truck", "celiac_trunk"),  # the paper's code name, typo included
        ("hv", "hepatic_vessel"),
        ("hvt", "hepatic_vessel_tumor"),
        ("Liver tumour", "liver_tumor"),
        ("  right   adrenal  ", "adrenal_gland_right"),
        ("bladder", "urinary_bladder"),
    ],
)
def test_aliases_resolve(alias, expected):
    assert resolve_structure(alias).name == expected


def test_every_name_display_name_and_alias_resolves_to_its_own_structure():
    for s in UNIVERSAL_STRUCTURES:
        for spelling in (s.name, s.display_name, *s.aliases):
            assert resolve_structure(spelling) is s, spelling


def test_unknown_name_is_a_one_line_input_error_naming_the_input():
    with pytest.raises(InputError) as info:
        resolve_structure("xyzzy")
    message = str(info.value)
    assert "'xyzzy'" in message
    assert "spleen" in message and "colon_tumor" in message
    assert "\n" not in message


def test_unknown_name_suggests_the_closest():
    with pytest.raises(InputError, match=r"did you mean 'pancreas'"):
        resolve_structure("pancreaz")


def test_resolve_structures_keeps_order_and_rejects_duplicates():
    assert [s.index for s in resolve_structures(["liver", "spleen", "lkidney"])] == [5, 0, 2]
    with pytest.raises(InputError, match=r"kidney_left.*twice") as info:
        resolve_structures(["left kidney", "liver", "lkidney"])
    assert "\n" not in str(info.value)
    assert [s.name for s in resolve_structures("liver")] == ["liver"]  # a string is one name


def test_resolve_structures_reports_unknown_name():
    with pytest.raises(InputError, match="'nope'"):
        resolve_structures(["liver", "nope"])


def test_terminology_codes_are_well_formed():
    for s in UNIVERSAL_STRUCTURES:
        codes = [s.category, s.type] + [c for c in (s.type_modifier, s.region) if c is not None]
        for code in codes:
            assert code.scheme == "SCT" and code.value.isdigit() and code.meaning, (s.name, code)
            assert not set("~^|") & set(code.meaning), (s.name, code)


def test_codes_follow_slicer_for_laterality_lesions_and_examples():
    spleen = resolve_structure("spleen")
    assert spleen.category == Code("SCT", "123037004", "Anatomical Structure")
    assert spleen.type == Code("SCT", "78961009", "Spleen")
    right, left = resolve_structure("kidney_right"), resolve_structure("kidney_left")
    assert right.type == left.type == Code("SCT", "64033007", "Kidney")
    assert right.type_modifier == Code("SCT", "24028007", "Right")
    assert left.type_modifier == Code("SCT", "7771000", "Left")
    for s in UNIVERSAL_STRUCTURES:
        lesion = s.name.endswith(("_tumor", "_cyst"))
        assert (s.category.value == "49755003") == lesion, s.name
        if lesion:
            assert s.region is not None, s.name
    assert resolve_structure("liver_tumor").region == resolve_structure("liver").type


def test_terminology_string_matches_slicer_format():
    assert resolve_structure("spleen").terminology_string() == (
        "Segmentation category and type - 3D Slicer General Anatomy list"
        "~SCT^123037004^Anatomical Structure~SCT^78961009^Spleen~^^"
        "~Anatomic codes - DICOM master list~^^~^^"
    )


@pytest.mark.parametrize("structure", UNIVERSAL_STRUCTURES, ids=lambda s: s.name)
def test_terminology_round_trips_through_slicerio(structure):
    text = structure.terminology_string()
    # slicerio writes exactly our string from our dict, and parses it back to the same codes
    assert slicerio_segmentation.terminology_entry_to_string(structure.slicerio_terminology()) == text
    parsed = slicerio_segmentation.terminology_entry_from_string(text)
    assert parsed == structure.slicerio_terminology()
    assert Code(*parsed["category"]) == structure.category
    assert Code(*parsed["type"]) == structure.type
    modifier = parsed.get("typeModifier")
    assert (Code(*modifier) if modifier else None) == structure.type_modifier
    region = parsed.get("anatomicRegion")
    assert (Code(*region) if region else None) == structure.region


def test_structures_are_hashable_and_frozen():
    liver = resolve_structure("liver")
    assert {liver: 1}[resolve_structure("Liver")] == 1
    with pytest.raises(AttributeError):
        liver.name = "x"


def test_novel_structure():
    psoas = novel_structure("Left Psoas  muscle")
    assert isinstance(psoas, Structure)
    assert psoas.index == -1
    assert psoas.name == "left_psoas_muscle"
    assert psoas.display_name == "Left Psoas muscle"
    assert psoas.category == Code("SCT", "123037004", "Anatomical Structure")
    assert psoas.type.scheme == "99FSEFT" and psoas.type.meaning == "Left Psoas muscle"
    assert len(psoas.type.value) <= 16  # DICOM code value (SH)
    # deterministic: same name -> same code and colour; other name -> other code
    again = novel_structure("left psoas muscle")
    assert (again.type.value, again.color) == (psoas.type.value, psoas.color)
    assert novel_structure("right psoas muscle").type.value != psoas.type.value
    assert all(isinstance(c, int) and 0 <= c <= 255 for c in psoas.color)
    parsed = slicerio_segmentation.terminology_entry_from_string(psoas.terminology_string())
    assert Code(*parsed["type"]) == psoas.type
    assert novel_structure("Tumor X", color=(1, 2, 3)).color == (1, 2, 3)


@pytest.mark.parametrize("bad", ["", "   ", "--", "a|b", "x~y", "p^q"])
def test_novel_structure_rejects_bad_names(bad):
    with pytest.raises(InputError):
        novel_structure(bad)


@pytest.mark.parametrize("bad", [(1, 2), (0, 0, 256), (-1, 0, 0), "red", ("a", 0, 0)])
def test_novel_structure_rejects_bad_colors(bad):
    with pytest.raises(InputError, match="colour"):
        novel_structure("thing", color=bad)


def test_seg_nrrd_written_with_slicerio_keeps_the_terminology(tmp_path):
    import numpy as np
    import slicerio

    chosen = [resolve_structure("lkidney"), resolve_structure("liver_tumor"), novel_structure("Psoas")]
    voxels = np.zeros((4, 4, 4), dtype=np.uint8)
    for value, _ in enumerate(chosen, start=1):
        voxels[value, :, :] = value
    segmentation = {
        "voxels": voxels,
        "ijkToLPS": np.eye(4),
        "segments": [
            {
                "id": f"Segment_{value}",
                "labelValue": value,
                "layer": 0,
                "name": s.display_name,
                "color": [c / 255 for c in s.color],
                "terminology": s.slicerio_terminology(),
            }
            for value, s in enumerate(chosen, start=1)
        ],
    }
    path = tmp_path / "out.seg.nrrd"
    slicerio.write_segmentation(str(path), segmentation)
    header = path.read_bytes().split(b"\n\n", 1)[0].decode()
    assert f"TerminologyEntry:{chosen[0].terminology_string()}|" in header

    read = slicerio.read_segmentation(str(path), skip_voxels=True)
    for s, segment in zip(chosen, read["segments"]):
        assert segment["name"] == s.display_name
        assert segment["terminology"] == s.slicerio_terminology()
