"""Gated delta rule (Gated DeltaNet): reference token loop, chunked WY form, single-token step."""
from .chunked import gated_delta_rule_chunked
from .interface import gated_delta_rule, gated_delta_rule_step
from .reference import gated_delta_rule_reference, gated_delta_step_reference

__all__ = ["gated_delta_rule", "gated_delta_rule_step", "gated_delta_rule_chunked", "gated_delta_rule_reference",
           "gated_delta_step_reference"]
