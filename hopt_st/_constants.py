"""Constants shared by every layer of hopt_st (one home, imported everywhere else)."""

from __future__ import annotations

#: Key of hopt_st's own entries in ``AnnData.uns`` (pixel sizes, embedding and prediction provenance).
UNS_KEY = "hopt_st"

#: Diameter of a Visium capture spot, µm.
VISIUM_SPOT_DIAMETER_UM = 55.0
#: Centre-to-centre distance of Visium spots, µm.
VISIUM_SPOT_DISTANCE_UM = 100.0
#: Space Ranger's ``spot_diameter_fullres`` is the width, in full-resolution pixels, of a *theoretical 65 µm*
#: spot (10x Genomics' scalefactors documentation), not of the 55 µm capture spot; checked against the 100 µm
#: spot grid of real Space Ranger output (tests/test_io.py).
SPACERANGER_SPOT_DIAMETER_FULLRES_UM = 65.0
#: Side of the square pseudo-spots used for Xenium / Visium HD samples, µm.
SQUARE_SPOT_SIDE_UM = 100.0
#: side of HEST-1k's Visium HD pseudo-spots: 16 µm bins pooled into 128 µm squares (HEST afd42c3,
#: src/hest/readers.py:148,154); HEST's Xenium pseudo-spots are SQUARE_SPOT_SIDE_UM (readers.py:904)
HEST_VISIUM_HD_SQUARE_UM = 128.0

#: µm per pixel of the patches most pathology foundation models (and the HEST-Benchmark) expect ("20x").
TARGET_MPP = 0.5
#: Side of those patches in pixels (224 px at 0.5 µm/px = 112 µm of tissue).
PATCH_SIZE = 224

#: ``obs`` column recording the fraction of each spot's patch that lies inside the image.
OBS_FRACTION_KEY = "patch_fraction_inside"

#: Coordinate system in which readers also place every element in micrometres (``Scale`` from full-res px).
MICROMETERS_CS = "micrometers"
