"""Demo data with a known answer (spatial samples, whole slides), and writers of on-disk layouts (HEST-1k, HEST-Benchmark, Space Ranger, TIFF)."""

from ._hest_layout import write_hest_layout
from ._hest_visium_hd import write_hest_visium_hd
from ._hest_xenium import write_hest_xenium
from ._mil import synthetic_mil_cohort
from ._slide import synthetic_slide, synthetic_slide_truth
from ._spaceranger import write_spaceranger_outs
from ._subspot_truth import subspot_truth_test
from ._synthetic import synthetic_visium
from ._tiff import write_pyramidal_tiff
from ._visium_hd import bin_truth, synthetic_visium_hd, write_visium_hd_outs
from ._xenium import cell_truth, write_xenium_outs

__all__ = [
    "synthetic_mil_cohort",
    "bin_truth",
    "cell_truth",
    "subspot_truth_test",
    "synthetic_visium_hd",
    "write_visium_hd_outs",
    "write_xenium_outs",
    "synthetic_slide",
    "synthetic_slide_truth",
    "synthetic_visium",
    "write_hest_layout",
    "write_hest_visium_hd",
    "write_hest_xenium",
    "write_pyramidal_tiff",
    "write_spaceranger_outs",
]
