"""Mock HSC data with known truth, ICL injection into real or mock cutouts, survey cutouts and
the TFDS datasets that the ICL regressor and the tidal-feature detector train on.

Modules
-------
profiles
    Building blocks of the mocks: Sersic profiles, the Moffat PSF, the cosmology, previews.
clusters
    Mock r-band cluster cutouts (and ICL-free backgrounds) with their truth.
injection
    The ICL injection of Canepa et al. 2025 into any cutout.
survey_cutouts
    +-300 kpc cutouts of catalogued clusters from a survey coadd.
shards
    Mock cutouts rendered by worker processes into HDF5 shards.
generate
    The command line ``python -m data.generate`` (on :mod:`data.shards`).
icl_datasets
    TFDS builders ``icl_artificial`` and ``icl_real_like``.
"""
