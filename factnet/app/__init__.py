"""The application built on the library: the ``factnet`` command (`factnet.app.cli`), the training loop
(`factnet.app.training`, `factnet.app.recipe`), image data (`factnet.app.data`), the paper's per-task
settings (`factnet.app.presets`, `factnet.app.runs`) and the embedded demo (`factnet.app.demo`).

It uses the library only through its public API (``import factnet``); the library never imports it.
"""
