"""Policies behind one interface, and the value head."""

from ppolm.policies.base import Policy, PolicyOutput, TorchPolicy, positions_from_mask
from ppolm.policies.hf import HFPolicy
from ppolm.policies.lstm import LSTMPolicy
from ppolm.policies.transformer import TransformerPolicy
from ppolm.policies.value import ValueHead

__all__ = ["HFPolicy", "LSTMPolicy", "Policy", "TorchPolicy", "TransformerPolicy", "ValueHead",
           "PolicyOutput", "positions_from_mask"]
