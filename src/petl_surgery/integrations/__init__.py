"""Glue for training frameworks, one module each, imported only on request (``import petl_surgery`` never
imports them, so their frameworks stay optional dependencies):

- :mod:`petl_surgery.integrations.transformers`: a ``TrainerCallback`` that keeps the delta with every
  checkpoint of transformers' ``Trainer`` and restores it on resume and for ``load_best_model_at_end``.
"""
