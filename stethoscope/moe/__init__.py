"""Mixture-of-experts routing health: expert load, dead experts, router entropy and router logit growth.

:mod:`stethoscope.moe.capture` finds the routers (Hugging Face Mixtral, Qwen2-/Qwen3-MoE, OLMoE and any
top-k gate with ``top_k`` / ``num_experts``) and reduces a call to one device row;
:mod:`stethoscope.moe.extension` queues the rows and judges them with :mod:`stethoscope.moe.rules`;
:mod:`stethoscope.moe.report` draws the per-layer expert-load heatmap. See docs/moe.md.
"""
