"""Losses: Hungarian matcher, focal loss and the query-head set criterion."""
from codetr.losses.criterion import SetCriterion
from codetr.losses.focal import quality_focal_loss, sigmoid_focal_loss
from codetr.losses.matcher import HungarianMatcher

__all__ = ["HungarianMatcher", "SetCriterion", "quality_focal_loss", "sigmoid_focal_loss"]
