"""Surface-brightness threshold measurement of the ICL fraction (Canepa et al. 2025, SPEC Part A).

``measure_icl_fraction`` is the automatic measurement that labels the artificial training set;
``measure_icl_fraction_manual`` adds the masking of non-member galaxies and stars used for real
clusters. ``python -m measure_sb_cut --help`` measures cutouts from FITS and HDF5 files.
"""

from measure_sb_cut.measure import SBMeasurement, measure_icl_fraction
from measure_sb_cut.measure_manual import measure_icl_fraction_manual

__all__ = ["SBMeasurement", "measure_icl_fraction", "measure_icl_fraction_manual"]
