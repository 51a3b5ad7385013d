"""Table nodes for the quantification and the comparison with a ground truth.

One row per result, one typed column per quantity (numbers stay numbers: the table can be
plotted, exported as CSV from the Data module, or read back with ``slicer.util.arrayFromTableColumn``),
each column with a unit label and a description shown as tooltip in Slicer's table view.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

#: (column name, type, unit, description)
QUANTIFICATION_COLUMNS: list[tuple[str, str, str, str]] = [
    ("Segmentation", "string", "", "segmentation node the numbers were computed from"),
    ("Lesion volume", "double", "mL", "lesion voxels inside the lungs"),
    ("Lung volume", "double", "mL", "both lungs"),
    ("Involvement", "double", "%", "lesion volume as a percentage of the lung volume"),
    ("MosMed category", "string", "", "CT-0 none, CT-1 <25 %, CT-2 25-50 %, CT-3 50-75 %, CT-4 >=75 % of lung involved"),
]

COMPARISON_COLUMNS: list[tuple[str, str, str, str]] = [
    ("Segmentation", "string", "", "segmentation compared (its Lesion segment)"),
    ("Ground truth", "string", "", "reference segmentation or labelmap"),
    ("Dice", "double", "", "2 TP / (2 TP + FP + FN) over all voxels of the CT"),
    ("Sensitivity", "double", "", "TP / (TP + FN)"),
    ("Specificity", "double", "", "TN / (TN + FP)"),
    ("Precision", "double", "", "TP / (TP + FP)"),
    ("Segmented volume", "double", "mL", "lesion volume of the segmentation"),
    ("Ground truth volume", "double", "mL", "lesion volume of the ground truth"),
    ("Volume difference", "double", "mL", "segmented minus ground-truth volume"),
    ("Relative volume difference", "double", "%", "volume difference as a percentage of the ground-truth volume"),
    ("HD95", "double", "mm", "95th-percentile symmetric Hausdorff distance"),
    ("Ground truth resampled", "string", "", "yes if the ground truth was resampled onto the CT grid (nearest neighbour)"),
]


def _column(kind: str, name: str):
    import vtk

    array = vtk.vtkDoubleArray() if kind == "double" else vtk.vtkStringArray()
    array.SetName(name)
    return array


def fillTable(tableNode, columns: Sequence[tuple[str, str, str, str]], rows: Sequence[Mapping[str, Any]]) -> None:
    """Replace the table's content with ``rows`` (missing numbers become NaN, shown empty)."""
    table = tableNode.GetTable()
    wasModifying = tableNode.StartModify()
    try:
        tableNode.RemoveAllColumns()
        arrays = []
        for name, kind, unit, description in columns:
            array = _column(kind, name)
            table.AddColumn(array)
            arrays.append((array, kind, name))
            if unit:
                tableNode.SetColumnUnitLabel(name, unit)
            tableNode.SetColumnDescription(name, description)
        table.SetNumberOfRows(len(rows))
        for r, row in enumerate(rows):
            for array, kind, name in arrays:
                value = row.get(name)
                if kind == "double":
                    array.SetValue(r, math.nan if value is None else float(value))
                else:
                    array.SetValue(r, "" if value is None else str(value))
        table.Modified()
    finally:
        tableNode.EndModify(wasModifying)


def newOrReusedTable(scene, tableNode, name: str):
    """``tableNode`` if given (its content will be replaced), else a new table node in the scene."""
    if tableNode is not None:
        return tableNode
    return scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))


def tableRows(tableNode) -> list[dict[str, Any]]:
    """The table's rows as dicts (numbers as floats) - for tests and scripts."""
    table = tableNode.GetTable()
    rows = []
    for r in range(table.GetNumberOfRows()):
        row = {}
        for c in range(table.GetNumberOfColumns()):
            array = table.GetColumn(c)
            value = array.GetValue(r)
            row[array.GetName()] = float(value) if array.IsA("vtkDataArray") else str(value)
        rows.append(row)
    return rows
