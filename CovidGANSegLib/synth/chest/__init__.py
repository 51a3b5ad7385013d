"""The analytic chest of the phantoms, one module per organ system (numpy only).

:func:`render_chest` draws, in this order: patient parameters and the table (:mod:`body`), the
body wall, the diaphragm and abdomen (:mod:`abdomen`), the lung shape (:mod:`lungs`), the
mediastinum (:mod:`mediastinum`), the lungs' parenchyma, spine, ribs and other bones
(:mod:`bones`), the pulmonary vessel trees (:mod:`vessels`) and motion blur (:mod:`noise`), all onto one
:class:`~CovidGANSegLib.synth.chest.canvas.Chest`. CT noise is added by the caller (:func:`noise.ct_noise`).
"""

from __future__ import annotations

import numpy as np

from CovidGANSegLib.synth.chest import abdomen, body, bones, lungs, mediastinum, noise, vessels
from CovidGANSegLib.synth.chest.canvas import Chest


def render_chest(rng: np.random.Generator, size: str) -> Chest:
    """Draw one chest on its anatomy grid; a pure function of ``rng``'s state."""
    c = Chest(rng, size)
    body.draw_parameters(c)
    body.draw_table(c)
    body.draw_body_wall(c)
    abdomen.draw_abdomen(c)
    lungs.draw_lung_shape(c)
    exclusion = mediastinum.draw_mediastinum(c)
    lungs.finish_lungs(c, exclusion, c.trachea)
    bones.draw_spine(c)
    bones.draw_ribs_and_bones(c)
    vessels.draw_vessel_trees(c)
    noise.draw_motion_blur(c)
    return c
