"""The report's sections that belong to no feature package: one module each, registered with
:func:`stethoscope.report.registry.register_section` (memory, attention and preflight live beside their
features: ``stethoscope/memory/report.py``, ``stethoscope/attention/report.py``, ``stethoscope/checks/report.py``).
"""
