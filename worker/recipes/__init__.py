"""Training recipes, one per task; each implements ``worker.training.Recipe``."""

from worker.recipes.custom_resnet import CustomResNetRecipe
from worker.recipes.dense import DenseRecipe
from worker.recipes.lenet import LeNetRecipe
from worker.recipes.resnet import ResNetRecipe

RECIPES = {
    "cifar10_dense": DenseRecipe,
    "mnist_lenet5": LeNetRecipe,
    "hymenoptera_resnet18": ResNetRecipe,
    "custom_resnet18": CustomResNetRecipe,
}
