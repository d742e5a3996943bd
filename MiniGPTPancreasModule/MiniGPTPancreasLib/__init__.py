"""GUI-free helpers of the MiniGPT-Pancreas Slicer module.

Everything here imports with the `slicer-core` wheel alone (MRML nodes, no Qt, no `slicer.app`), so the pytest
suite exercises it outside the Slicer application; MiniGPTPancreas.py holds only the Module, Widget and Test.

- prompts: the question presets (upstream's exact prompt strings, copied: the module never imports the backend);
- volume_geometry: a volume node -> voxel array + world IJK-to-RAS (parent transforms included) -> model view;
- boxes_to_markups: boxes on model-view slices -> thin locked ROI markups, grouped per run;
- ground_truth: a segmentation or label map -> per-slice truth boxes, IoU per slice in a table node;
- logic: MiniGPTPancreasLogic, the module's logic (network calls are synchronous; the Widget runs them in a worker);
- summaries: one-line status texts for answers, sweeps and server health;
- worker: a thread plus a result queue that the Widget drains with a timer.
"""
