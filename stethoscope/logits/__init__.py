"""Output-logit divergence: the LM head's logits drifting away from zero (``logits.divergence``).

See :mod:`stethoscope.logits.extension` for the capture and :mod:`stethoscope.logits.rules` for the rule.
"""
