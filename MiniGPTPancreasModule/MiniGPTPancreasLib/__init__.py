"""GUI-free helpers of the MiniGPT-Pancreas Slicer module.

Everything here imports with the `slicer-core` wheel alone (MRML nodes, no Qt, no `slicer.app`), so the pytest
suite (Testing/test_slicer_*.py) exercises it outside the Slicer application; MiniGPTPancreas.py and
MiniGPTPancreasGui/ hold the Module, Widget and Test.

- logic: MiniGPTPancreasLogic, the module's logic (network calls are synchronous; the Widget runs them in a worker);
- local_server: start, reuse and stop a `minigpt-pancreas serve` child process;
- prompts: menu titles and box names for the questions the server offers (/api/v1/info);
- volume_geometry: a volume node -> voxel array + world IJK-to-RAS (parent transforms included) -> model view;
- volume_requests: a volume node -> the self-contained slice and sweep requests (a tilted volume's resampled grid);
- boxes_to_markups: boxes on model-view slices -> thin locked ROI markups, grouped per run with its provenance;
- fusion: the confidence threshold and the fused 3D box of a run;
- results: a run's results table and its export as .mrk.json and CSV;
- ground_truth: a segmentation or label map -> per-slice truth boxes, IoU per slice in a table and a plot, the
  comparison of a run's boxes with them;
- chat: the conversation about one slice;
- summaries: one-line status texts for answers, sweeps, server health and model info;
- worker: a thread plus a result queue, and the task runner the Widget drains with a timer.
"""
