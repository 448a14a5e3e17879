"""Recipes: whole jobs as plain data (``configs/*.yaml``) run over the project's own parts.

A recipe names synthetic datasets (``make-data`` settings) and an ordered list of training stages, each a
``distill.config.TrainConfig`` run by the one Trainer (``method: vae | ocr | teacher | lcm | pcm``) from the
previous stage's model or a named model (``testbed``). Stages are cached under a key of their settings, their
inputs and the code that trains them (:mod:`.stages`), so a rerun rebuilds only what changed.

* :mod:`.testbed` — ``anytext2-lcm testbed``: the CPU-scale AnyText2 that writes legible text, from nothing
  (``configs/testbed.yaml``), with its autoencoder gate and the fp16 weights that ship in the package;
* :mod:`.demo` — ``anytext2-lcm demo``: an LCM-LoRA student distilled from the shipped testbed teacher and the
  OCR / fidelity report of teacher vs student (``configs/demo.yaml``);
* ``benchmarks/text_quality.py`` — LCM, PCM and CFG-free PCM students with the same budget, measured in one run.
"""
