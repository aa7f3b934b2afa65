"""Mini CLEAR: a small FLUX teacher trained here on procedural scenes (:mod:`clear.mini.scenes`,
:mod:`clear.mini.teacher`), shipped in ``ckpt/mini``, the whole CLEAR recipe run on it
(:mod:`clear.mini.recipe`) and its SDEdit cascade to 512 px (:mod:`clear.mini.highres`)."""
