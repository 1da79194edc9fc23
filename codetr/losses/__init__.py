"""Losses: Hungarian matcher, focal loss and the query-head set criterion."""
from codetr.losses.criterion import SetCriterion
from codetr.losses.focal import sigmoid_focal_loss
from codetr.losses.matcher import HungarianMatcher

__all__ = ["HungarianMatcher", "SetCriterion", "sigmoid_focal_loss"]
