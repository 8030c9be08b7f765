"""Build output: ``anyserve.desc`` is compiled from proto/ by setup.py (build_protos)."""
