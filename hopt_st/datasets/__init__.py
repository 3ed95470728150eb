"""Demo data with a known answer, and writers of the HEST on-disk layouts."""

from ._hest_layout import write_hest_layout
from ._synthetic import synthetic_visium

__all__ = ["synthetic_visium", "write_hest_layout"]
