"""Framework integrations: thin callbacks over the one :class:`~stethoscope.Monitor`.

* :mod:`stethoscope.integrations.hf` — ``StethoscopeCallback`` for the Hugging Face ``Trainer``;
* :mod:`stethoscope.integrations.lightning` — ``StethoscopeCallback`` for Lightning's ``Trainer``.

Each module imports its framework, so import the one you use (docs/integrations.md).
"""
