"""One module per stage of the recipe; each stage is a function of its config."""

from simclrv2.stages.classify import distill, evaluate, finetune, linear_eval, supervised
from simclrv2.stages.pretrain import pretrain

__all__ = ["distill", "evaluate", "finetune", "linear_eval", "pretrain", "supervised"]
