"""CovidGANSegLib: self-supervised COVID-19 lesion segmentation in chest CT.

The science behind the CovidGANSeg 3D Slicer extension: CT I/O and preprocessing, a 3D GAN that
synthesises pseudo-healthy CT, pseudo-masks from difference maps, a TransUNet segmenter trained on
those pseudo-masks, and honest evaluation. Importable without Slicer, Qt or VTK; torch is imported
only by the modules that need it (``gan``, ``seg``, ``checkpoints``).

Data flows one way::

    nifti -> preprocessing (lungmask) -> gan -> pseudo-masks -> seg -> metrics / evaluation
"""

__version__ = "0.1.0"
