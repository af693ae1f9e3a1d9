"""The data side: case zips (:mod:`.safezip`) and DICOM series (:mod:`.dicom` reads, :mod:`.dicom_write`
writes), voxel grids (:mod:`.grid`), the phantom generator (:mod:`.phantom`) and its labels
(:mod:`.labels`), downloads (:mod:`.hub`, :mod:`.fetch`), zips to tensors (:mod:`.preprocess`), the
processed format every later stage reads (:mod:`.processed`), the intensity mapping (:mod:`.intensity`)
and what a thick series measures of a thin one (:mod:`.slab`). Imports no other ctdiff package."""
