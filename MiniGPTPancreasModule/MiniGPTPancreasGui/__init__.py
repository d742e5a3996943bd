"""The parts of the MiniGPT-Pancreas panel that need the Slicer application (qt, slicer.app), split out of
MiniGPTPancreas.py to keep it readable; everything that can run without the GUI is in MiniGPTPancreasLib.

- server_section: ServerSection, the Widget's mixin for the local server, the connection and the question menu;
- truth_section: TruthSection, the Widget's mixin for the ground-truth selector and Compare;
- self_test: MiniGPTPancreasTest, the module's self-test (re-exported by MiniGPTPancreas.py).
"""
