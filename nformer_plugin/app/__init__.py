"""The application layer: what the commands (``nformer``, ``fastreid-train``) and the studies do
with the pure core, as public functions (pure: FastReID only to read its config files).

* ``evaluation``: the one refine / re-rank / export path (the FastReID evaluator and
  ``nformer eval`` / ``refine`` / ``report``).
"""
