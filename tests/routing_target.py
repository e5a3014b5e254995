"""Model code for tests/test_routing.py: it reaches torch's functional dropout in each of the
ways real model code does (through the global nn, through F, by a name imported from
torch.nn.functional), plus the spellings a route does not reach."""
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.functional import dropout3d


def routed_calls(x, p, training=True):
    """Four calls a route reaches: dropout, dropout1d, dropout2d, dropout3d."""
    a = nn.functional.dropout(x, p=p, training=training)
    b = F.dropout1d(x.view(4, 8, -1), p, training)
    c = F.dropout2d(x.view(2, 4, 4, -1), p=p, training=training)
    d = dropout3d(x.view(2, 4, 2, 2, -1), p, training=training)
    return a, b, c, d


def unrouted_calls(x, p):
    """Not reached: the alpha variants, and a call spelled through the global ``torch``."""
    return (F.alpha_dropout(x, p, True), F.feature_alpha_dropout(x.view(4, 8, -1), p, True),
            torch.nn.functional.dropout(x, p, True))


def attention(q, k, v, p, training):
    weights = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
    weights = nn.functional.dropout(weights, p=p, training=training)
    return weights @ v


class Block(nn.Module):
    """A residual block with a functional attention dropout and a dropout module."""

    def __init__(self, width=32, p=0.3):
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.drop = nn.Dropout(p)
        self.p = p

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return x + self.drop(self.out(attention(q, k, v, self.p, self.training)))
