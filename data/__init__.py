"""Mock HSC data with known truth, ICL injection into real or mock cutouts, survey cutouts and
the TFDS datasets that the ICL regressor and the tidal-feature detector train on.

Modules
-------
clusters
    Mock r-band cluster cutouts (and ICL-free backgrounds) with their truth.
injection
    The ICL injection of Canepa et al. 2025 into any cutout.
survey_cutouts
    +-300 kpc cutouts of catalogued clusters from a survey coadd.
generate
    The command line ``python -m data.generate`` that writes HDF5 shards in parallel.
icl_datasets
    TFDS builders ``icl_artificial`` and ``icl_real_like``.
"""
