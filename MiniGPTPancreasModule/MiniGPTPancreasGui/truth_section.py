"""The ground-truth part of the panel: the structures of the chosen segmentation or label map, and the comparison of
the last run with them (IoU table, plot and green truth boxes, shown in the plot/table layout). A mixin of
MiniGPTPancreasWidget (MiniGPTPancreas.py), which provides self.ui, self.logic, self._truthChoices,
self._reportError and self._updateButtons.
"""

import slicer
from slicer.i18n import tr as _

from MiniGPTPancreasLib.ground_truth import truth_choices


class TruthSection:
    """The truth selector, its structure menu and Compare."""

    def onTruthChanged(self, truthNode):
        self._truthChoices = truth_choices(truthNode)
        self.ui.truthPartComboBox.clear()
        for title, _selection in self._truthChoices:
            self.ui.truthPartComboBox.addItem(title)
        self._updateButtons()

    def onCompare(self):
        try:
            _title, selection = self._truthChoices[self.ui.truthPartComboBox.currentIndex]
            with slicer.util.RenderBlocker():
                comparison = self.logic.compare_last_run(self.ui.truthSelector.currentNode(), **selection)
        except Exception as error:  # noqa: BLE001
            self._reportError(error)
            return
        slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpPlotTableView)
        selection = slicer.app.applicationLogic().GetSelectionNode()
        selection.SetActiveTableID(comparison.table_node.GetID())
        selection.SetActivePlotChartID(comparison.plot_chart_node.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()
        slicer.app.applicationLogic().PropagatePlotChartSelection()
        mean = "n/a" if comparison.mean_iou is None else f"{comparison.mean_iou:.3f}"
        self.ui.statusLabel.text = _("Mean IoU {mean} over {count} slices, boxes >= {threshold:.2f}; truth boxes in "
                                     "green.").format(mean=mean, count=len(comparison.rows),
                                                      threshold=comparison.threshold)
