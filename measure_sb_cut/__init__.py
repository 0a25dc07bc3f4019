"""Surface-brightness threshold measurement of the ICL fraction (Canepa et al. 2025, SPEC Part A).

``measure_icl_fraction_canepa2025`` is the original code's automatic measurement, step by step
(the one that labelled the artificial training set), and ``measure_icl_fraction_manual_canepa2025``
its manual variant for real clusters; ``measure_icl_fraction`` and
``measure_icl_fraction_manual`` are this project's redesign of both. ``python -m measure_sb_cut
--help`` measures cutouts from FITS and HDF5 files (the original's method by default).
"""

from measure_sb_cut.canepa2025 import (
    measure_icl_fraction_canepa2025,
    measure_icl_fraction_manual_canepa2025,
)
from measure_sb_cut.measure import SBMeasurement, measure_icl_fraction
from measure_sb_cut.measure_manual import measure_icl_fraction_manual

__all__ = [
    "SBMeasurement",
    "measure_icl_fraction",
    "measure_icl_fraction_canepa2025",
    "measure_icl_fraction_manual",
    "measure_icl_fraction_manual_canepa2025",
]
