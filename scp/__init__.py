"""A DICOM C-STORE SCP: modalities and PACS send images over DICOM, radq runs them as jobs.

``spool`` keeps received files on disk until their job is recorded, ``batching`` decides
which files make one job, ``submission`` records the jobs, ``server`` is the network side.
"""
