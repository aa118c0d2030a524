"""Sinks: where a run's numbers go besides the run directory (TensorBoard), and the headline numbers they
and the framework callbacks share (:mod:`stethoscope.sinks.headline`).

Each sink is an :mod:`extension <stethoscope.extensions>`: built only when its config switch is on, its
optional dependency imported only then.
"""
