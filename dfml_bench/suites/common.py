"""Building blocks shared by the built-in suites: backbones, zoo recipes, episode specs."""

from __future__ import annotations

from ..backbones import BackboneSpec
from ..zoo import TrainRecipe

CONV4 = BackboneSpec("conv4", 32)

# Literature recipes (field-survey section 2.2): Conv4 Adam 0.01 x 60 epochs; ResNets SGD momentum 0.9,
# wd 5e-4, milestones [30, 50, 80], gamma 0.2; best held-out checkpoint kept.
PAPER_CONV4 = TrainRecipe(epochs=60, optimizer="adam", lr=0.01, batch_size=128, augment="flip_crop")
PAPER_RESNET = TrainRecipe(epochs=100, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4,
                           milestones=(30, 50, 80), gamma=0.2, batch_size=128, augment="flip_crop")
# CPU scale: glyph instances are already jittered, so no augmentation; a few epochs suffice on 5-way tasks.
CPU_CONV4 = TrainRecipe(epochs=12, optimizer="adam", lr=0.005, batch_size=50)
