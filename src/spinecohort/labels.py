"""Label ids and level names shared by every stage (SPINEPS conventions)."""

from __future__ import annotations

from typing import Final, Literal

Region = Literal["cervical", "thoracic", "lumbar"]
REGIONS: Final[tuple[Region, ...]] = ("cervical", "thoracic", "lumbar")

# Semantic mask ids (SPINEPS `seg-spine`).
ARCUS: Final = 41
SPINOUS: Final = 42
COSTAL_L: Final = 43
COSTAL_R: Final = 44
SUP_ARTICULAR_L: Final = 45
SUP_ARTICULAR_R: Final = 46
INF_ARTICULAR_L: Final = 47
INF_ARTICULAR_R: Final = 48
CORPUS: Final = 49
CORD: Final = 60
CANAL: Final = 61
ENDPLATE: Final = 62
# SPINEPS 2.x splits the endplate voxels after the instances: a vertebra's superior and inferior endplates.
ENDPLATE_SUPERIOR: Final = 52
ENDPLATE_INFERIOR: Final = 53
ENDPLATES: Final = (ENDPLATE, ENDPLATE_SUPERIOR, ENDPLATE_INFERIOR)  # before and after the split
IVD: Final = 100
SACRUM: Final = 26

VERTEBRA_PARTS: Final = (41, 42, 43, 44, 45, 46, 47, 48, 49)
SEMANTIC_LABELS: Final = (*VERTEBRA_PARTS, CORD, CANAL, *ENDPLATES, IVD, SACRUM)
SEMANTIC_NAMES: Final = {
    41: "arcus",
    42: "spinous process",
    43: "costal process L",
    44: "costal process R",
    45: "superior articular L",
    46: "superior articular R",
    47: "inferior articular L",
    48: "inferior articular R",
    49: "corpus",
    60: "spinal cord",
    61: "spinal canal",
    62: "endplate",
    52: "superior endplate",
    53: "inferior endplate",
    100: "IVD",
    26: "sacrum",
}
# Left/right partners, swapped when an image is mirrored across the midline.
LEFT_RIGHT_PAIRS: Final = ((43, 44), (45, 46), (47, 48))

# Instance ids (SPINEPS `seg-vert`): vertebrae, IVD = 100 + X, endplate = 200 + X.
IVD_OFFSET: Final = 100
ENDPLATE_OFFSET: Final = 200
VERTEBRA_IDS: Final = {
    **{f"C{i}": i for i in range(1, 8)},
    **{f"T{i}": 7 + i for i in range(1, 13)},
    "T13": 28,
    **{f"L{i}": 19 + i for i in range(1, 7)},
    "S1": 26,
}
VERTEBRA_NAMES: Final = {v: k for k, v in VERTEBRA_IDS.items()}

# Every id a valid mask may hold (0 = background), for checking references.
SEMANTIC_MASK_IDS: Final = frozenset({0, *SEMANTIC_LABELS})
INSTANCE_MASK_IDS: Final = frozenset(
    {0, *VERTEBRA_IDS.values()} | {offset + v for offset in (IVD_OFFSET, ENDPLATE_OFFSET) for v in VERTEBRA_IDS.values()}
)


def vertebra_ids(ids):
    """Where an instance mask holds a vertebra (not the sacrum, an IVD or an endplate)."""
    return (ids > 0) & (ids < IVD_OFFSET) & (ids != SACRUM)


def ivd_ids(ids):
    """Where an instance mask holds an IVD (100+X)."""
    return (ids >= IVD_OFFSET) & (ids < ENDPLATE_OFFSET)


def endplate_ids(ids):
    """Where an instance mask holds an endplate (200+X)."""
    return ids >= ENDPLATE_OFFSET


def unknown_ids(mask, allowed: frozenset[int]) -> list[int]:
    """The label ids in `mask` outside `allowed`, sorted (a reference that holds any is mislabeled)."""
    import numpy as np

    return sorted(set(np.unique(mask).tolist()) - allowed)


def level_sequence(*, thoracic: int = 12, lumbar: int = 5, first: str = "C1") -> list[int]:
    """Instance ids of a column from `first` down to the sacrum, top first.

    A 13th thoracic vertebra is T13 (id 28), a 6th lumbar vertebra L6 (id 25).

    >>> level_sequence(lumbar=6)[-3:]
    [24, 25, 26]
    >>> level_sequence(thoracic=13)[18:21]
    [19, 28, 20]
    """
    if thoracic not in (11, 12, 13) or lumbar not in (4, 5, 6):
        raise ValueError(f"unsupported vertebra count: thoracic={thoracic}, lumbar={lumbar}")
    names = [f"C{i}" for i in range(1, 8)]
    names += [f"T{i}" for i in range(1, thoracic + 1)]
    names += [f"L{i}" for i in range(1, lumbar + 1)] + ["S1"]
    ids = [VERTEBRA_IDS[n] for n in names]
    return ids[ids.index(VERTEBRA_IDS[first]) :]
