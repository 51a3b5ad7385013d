"""The 3D GAN of phases 1-2 of the paper: pseudo-healthy synthesis, difference maps, pseudo-masks.

Modules (import them directly; this package imports nothing heavy by itself):

* ``gan.networks``    -- ``GANConfig`` and its registry, the dense 3D U-Net generator (eq. 1) and the
  3D CNN discriminator.
* ``gan.training``    -- ``train_gan`` (Algorithm 1, eq. 2) with resumable checkpoints.
* ``gan.inference``   -- ``load_generator``, ``pseudo_healthy`` and ``pseudo_healthy_file`` (eq. 3 in HU).
* ``gan.pseudomasks`` -- ``make_pseudo_masks``: difference maps, binarised pseudo-masks and the
  severity groups of paper section 4.3.
* ``gan.figures``     -- matplotlib figures (loss curves, Fig. 3 triptychs, Fig. 4 box plot).
"""

#: architecture name stored in every GAN checkpoint (``checkpoints.load_checkpoint(arch=...)``)
GAN_ARCH = "dense-unet-gan-3d"
