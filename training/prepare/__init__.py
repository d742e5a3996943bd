"""`minigpt-pancreas-train prepare`: public CT datasets -> model-view slice PNGs, slice records, one shared
seeded split, and the task sets of the MiniGPT-Pancreas cascade.

Modules, in the order data flows through them: `discovery` (find image/label pairs in the shipped layouts),
`readers` (NIfTI and DICOM into arrays + geometry), `volume_job` (one volume -> PNGs + records, run in worker
processes), `records` (the paper's per-slice keys), `fingerprint` (duplicate detection), `splits`, `tasks`,
`summary`, and `pipeline` (the whole run). `command` is the CLI; `files` holds errors and atomic writes.
"""
