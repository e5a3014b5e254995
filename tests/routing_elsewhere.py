"""Code that calls dropout but belongs to no routed model: test_routing.py checks that a route
taken for routing_target's model leaves it alone."""
from torch import nn


def helper_dropout(x, p):
    return nn.functional.dropout(x, p, True)
