"""Mini CLEAR: a small FLUX teacher trained here on procedural scenes (:mod:`clear.mini.scenes`,
:mod:`clear.mini.teacher`), shipped in ``ckpt/mini``, and the whole CLEAR recipe run on it."""
