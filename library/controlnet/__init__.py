"""ControlNet for the U-Net families (SD 1.x/2.x, SDXL): the model, its files, its training target.

* :mod:`library.controlnet.loading`: ``load_controlnet(path, unet)`` (a Diffusers folder, a Diffusers-layout
  single file, or an original lllyasviel/LDM-layout file) and ``controlnet_from_unet(unet)``.
* :mod:`library.controlnet.saving`: ``save_controlnet`` (Diffusers state-dict layout ``.safetensors`` /
  ``.ckpt`` / ``.pt``, or a Diffusers folder), atomically.
* :mod:`library.controlnet.control`: ``UNetControl``, how a ControlNet feeds the U-Net in training steps
  and preview images (the family's ``unet_control`` hook).
* :mod:`library.controlnet.target`: ``ControlNetTarget`` / ``SDXLControlNetTarget``, the
  :class:`~library.training.targets.TrainingTarget` of ``train_control_net.py`` and
  ``sdxl_train_control_net.py``.
* :mod:`library.controlnet.args`: the two scripts' parsers.

The model is diffusers' ``ControlNetModel``; user guide: ``docs/train_control_net.md``.
"""
